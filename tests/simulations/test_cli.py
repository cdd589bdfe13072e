"""The ``fedtune`` CLI contract, packaging and the Flower app declaration (no simulation run)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from fedtune.common.config import VALID_KEYS
from fedtune.simulations.cli import main
from fedtune.simulations.simulate import resolve

PYPROJECT = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--run-config", "no-such-key=1"], "Valid keys: " + ", ".join(VALID_KEYS)),
        (["--run-config", "peft-method=ia3"], "valid values: lora, prefix"),
        (["--run-config", "task=csv"], "`task=csv` needs `data-path`"),
        (["--num-clients", "1"], "`--num-clients` 1"),
        (["--run-config", "broken"], "is not `key=value`"),
    ],
)
def test_simulate_rejects_bad_input_with_a_message_naming_the_fix(argv, expected, capsys) -> None:
    # Execute
    rc = main(["simulate", *argv])

    # Assert
    assert rc == 2
    assert expected in capsys.readouterr().err


def test_preset_then_overrides_then_out_resolve_into_one_config() -> None:
    # Execute
    cfg, n = resolve("prefix", 7, {"num-server-rounds": "9"}, "somewhere")

    # Assert
    assert (n, cfg.peft_method, cfg.num_server_rounds, cfg.out_dir) == (7, "prefix", 9, "somewhere")


def test_flower_components_point_at_the_apps() -> None:
    # Prepare
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    components = PYPROJECT["tool"]["flwr"]["app"]["components"]

    # Execute
    loaded = {}
    for key, ref in components.items():
        module, attr = ref.split(":")
        loaded[key] = getattr(importlib.import_module(module), attr)

    # Assert
    assert isinstance(loaded["serverapp"], ServerApp) and isinstance(loaded["clientapp"], ClientApp)


def test_the_wheel_holds_only_fedtune_namespaced_packages(tmp_path: Path) -> None:
    # Execute: build the wheel a user would install
    root = Path(__file__).parents[2]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fedtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()

    # Assert: nothing lands in site-packages as a bare `server`, `common`, ...
    assert {n.split("/")[0] for n in names} == {
        "fedtune",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    for sub in ("server", "client", "common", "simulations"):
        assert f"fedtune/{sub}/__init__.py" in names
    assert "fedtune/common/config.py" in names and "fedtune/server/app.py" in names


def test_common_never_imports_flower() -> None:
    # Assert
    for path in (Path(__file__).parents[2] / "common").glob("*.py"):
        text = path.read_text()
        assert "import flwr" not in text and "from flwr" not in text, path.name


def test_a_finished_run_is_never_overwritten_without_asking(tmp_path: Path, capsys) -> None:
    # Prepare
    (tmp_path / "metrics.json").write_text("[]")

    # Execute
    rc = main(["simulate", "--out", str(tmp_path)])

    # Assert
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert resolve("smoke", None, {}, str(tmp_path), overwrite=True)[0].out_dir == str(tmp_path)


def test_default_output_is_a_fresh_timestamped_folder() -> None:
    # Execute
    cfg, _ = resolve("smoke")

    # Assert
    assert Path(cfg.out_dir).parent == Path("fedtune-out") and Path(cfg.out_dir).name[:2] == "20"


def _killed_run(folder: Path, num_clients: int = 3) -> Path:
    """A run folder as `fedtune simulate` leaves it when killed before its first checkpoint."""
    from fedtune.common.config import FedConfig

    FedConfig(num_server_rounds=3, learning_rate=0.01, out_dir=str(folder)).save(folder / "run_config.json")
    (folder / "simulation.json").write_text(f'{{"num_clients": {num_clients}}}\n')
    return folder


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--preset", "smoke"], "drop --preset, --out and --overwrite"),
        (["--out", "elsewhere"], "drop --preset, --out and --overwrite"),
        (["--run-config", "learning-rate=0.02"], "`learning-rate` is 0.01 in"),
        (["--num-clients", "4"], "`--num-clients` 4 differs from the 3 hospitals"),
        (["--run-config", "learning-rate=0.01"], "no complete checkpoint"),  # an equal override is fine
    ],
)
def test_resume_refuses_a_changed_setting_naming_it(
    tmp_path: Path, argv: list[str], expected: str, capsys
) -> None:
    # Prepare
    run = _killed_run(tmp_path)

    # Execute
    rc = main(["simulate", "--resume", str(run), *argv])

    # Assert
    assert rc == 2
    assert expected in capsys.readouterr().err


def test_resume_of_a_folder_that_holds_no_run_says_so(tmp_path: Path, capsys) -> None:
    # Execute
    rc = main(["simulate", "--resume", str(tmp_path)])

    # Assert
    assert rc == 2 and "has no run_config.json" in capsys.readouterr().err


def test_flowers_run_simulation_notice_is_dropped_and_other_flower_logs_kept() -> None:
    import logging

    from fedtune.simulations.simulate import _not_run_simulation_notice

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("flwr", logging.WARNING, "", 0, msg, ("x",), None)

    # Execute / Assert
    assert not _not_run_simulation_notice(
        record("DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed %s")
    )
    assert _not_run_simulation_notice(record("Round %s failed"))
