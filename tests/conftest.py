"""Test options: end-to-end simulations run only with ``--run-e2e`` (or ``-m e2e``)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-e2e", action="store_true", help="also run the end-to-end Flower simulations")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-e2e") or "e2e" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="end-to-end simulation: run with --run-e2e")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
