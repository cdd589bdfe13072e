"""Bad input fails before any Flower process starts: one line naming the input and the fix, exit 2."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from fedtune.common import sites
from fedtune.common.base_files import packaged_model_dir
from fedtune.common.config import parse_run_config
from fedtune.common.preflight import PreflightError, check_out_dir, check_simulation, check_site_file
from fedtune.common.site_config import SiteConfig
from fedtune.simulations.cli import main

GOOD = "text,label\n" + "".join(f"note {i} about a thing,{'ab'[i % 2]}\n" for i in range(60))
# name -> (file name, its bytes, what the message must name)
BAD_FILES: dict[str, tuple[str, bytes, str]] = {
    "header only": ("h.csv", b"text,label\n", "h.csv, line 1: only a header row"),
    "empty": ("e.csv", b"", "e.csv, line 1: file is empty"),
    "one row": ("r.csv", b"text,label\nabc,x\n", "only one class ('x')"),
    "one class": (
        "c.csv",
        b"text,label\na,x\nb,x\nc,x\n",
        "c.csv, lines 2-4, column `label`: only one class",
    ),
    "not UTF-8": ("l.csv", b"text,label\n\xff\xfe bad,x\nok,y\n", "l.csv: not UTF-8 text"),
    "binary": ("b.csv", bytes(range(256)) * 2, "b.csv: not UTF-8 text"),
    "broken JSONL": (
        "j.jsonl",
        b'{"text":"a","label":"x"}\n{"text":"b",\n{"text":"c","label":"y"}\n',
        "j.jsonl, line 2, column 1: invalid JSON",
    ),
    "no label column": (
        "n.csv",
        b"note,diagnosis\na,x\nb,y\n",
        "n.csv, line 1 (header): no label column `label`",
    ),
}


@pytest.fixture
def no_flower(monkeypatch) -> list[object]:
    """Record any start of Flower's simulation (none may happen on bad input)."""
    import flwr.simulation

    started: list[object] = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **k: started.append(a))
    return started


def _simulate(tmp_path: Path, run_config: str, *extra: str) -> list[str]:
    return ["simulate", "--out", str(tmp_path / "run"), "--run-config", run_config, *extra]


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_data_file_is_one_line_naming_it_before_flower_starts(
    case: str, tmp_path: Path, capsys, no_flower: list[object]
) -> None:
    # Prepare
    name, content, expected = BAD_FILES[case]
    (tmp_path / name).write_bytes(content)

    # Execute
    rc = main(_simulate(tmp_path, f"task=csv data-path={tmp_path / name}", "--num-clients", "2"))

    # Assert: exit 2, one line naming the file, nothing started or written
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert err.count("\n") == 1 and err.startswith("fedtune simulate: ")
    assert no_flower == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("run_config", "clients", "expected"),
    [
        ("task=csv data-path={d}/missing.csv", "2", "missing.csv: file not found"),
        ("task=csv data-path={d}/good.csv test-data-path={d}/new.csv", "2", "label 'c' is not one of"),
        ("task=csv data-path={d}/good.csv", "300", "`--num-clients` 300 exceeds the 51 examples"),
        ("max-length=100000", "2", "`max-length` 100000 exceeds the 512 positions"),
        ("base-model={d}/no-weights", "2", "no *.safetensors or pytorch_model*.bin weights"),
        ("task=csv data-path={d}/tiny.csv", "2", "held-out test set is empty"),
        ("dirichlet-alpha=0", "2", "`dirichlet-alpha` must be > 0.0, got 0.0"),
    ],
)
def test_config_data_and_model_are_checked_together_before_flower_starts(
    run_config: str, clients: str, expected: str, tmp_path: Path, capsys, no_flower: list[object]
) -> None:
    # Prepare
    (tmp_path / "good.csv").write_text(GOOD)
    (tmp_path / "tiny.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "new.csv").write_text("text,label\nn1,a\nn2,b\nn3,c\n")
    (tmp_path / "no-weights").mkdir()
    shutil.copy(packaged_model_dir() / "config.json", tmp_path / "no-weights")

    # Execute
    rc = main(_simulate(tmp_path, run_config.format(d=tmp_path), "--num-clients", clients))

    # Assert
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and err.count("\n") == 1, err
    assert no_flower == [] and not (tmp_path / "run").exists()


def test_out_pointing_at_a_file_is_refused(tmp_path: Path, capsys, no_flower: list[object]) -> None:
    # Prepare
    (tmp_path / "afile").write_text("x")

    # Execute
    rc = main(["simulate", "--out", str(tmp_path / "afile" / "run"), "--num-clients", "2"])

    # Assert
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err and no_flower == []
    check_out_dir(tmp_path / "new" / "folder")  # a folder not made yet is fine


def test_every_simulated_site_is_built_as_the_run_will(tmp_path: Path, monkeypatch) -> None:

    # Prepare: site 7 of 10 cannot be built
    (tmp_path / "good.csv").write_text(GOOD)
    cfg = parse_run_config({"task": "csv", "data-path": str(tmp_path / "good.csv"), "partitioning": "iid"})
    calls: list[tuple[int, int]] = []

    def site(cfg: object, i: int, n: int) -> None:
        calls.append((i, n))
        if i == 7:
            raise ValueError("Simulated site 7 has no training examples")

    monkeypatch.setattr(sites, "simulated_site", site)

    # Execute / Assert: the sites are checked in order, with the run's number of sites
    with pytest.raises(PreflightError, match="^simulated site 7: Simulated site 7 has no training"):
        check_simulation(cfg, 10)
    assert calls == [(i, 10) for i in range(8)]


def test_simulated_sites_with_files_of_their_own_have_those_files_checked(tmp_path: Path) -> None:
    # Prepare: a csv task without a pooled `data-path`; site i reads site-i.csv (as a benchmark gives
    # them), the coordinator its own test file; site 1's file is broken
    for name, text in (("site-0.csv", GOOD), ("test.csv", GOOD)):
        (tmp_path / name).write_text(text)
    (tmp_path / "site-1.csv").write_bytes(b"text,label\n\xff,x\n")
    cfg = parse_run_config(
        {
            "task": "csv",
            "test-data-path": str(tmp_path / "test.csv"),
            "labels": "a,b",
            "out-dir": str(tmp_path / "o"),
        }
    )

    def own_file(site: SiteConfig) -> SiteConfig:
        return dataclasses.replace(site, data_path=str(tmp_path / f"site-{site.partition_id}.csv"))

    # Execute / Assert: site 0's file passes, site 1's is named
    check_simulation(cfg, 1, own_file)
    with pytest.raises(PreflightError, match=r"site-1\.csv: not UTF-8 text"):
        check_simulation(cfg, 2, own_file)


def test_a_deployed_site_checks_its_own_file(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "site.csv").write_bytes(b"text,label\n\xff,x\n")
    (tmp_path / "ok.csv").write_text(GOOD)
    cfg = parse_run_config({"task": "csv", "data-path": str(tmp_path / "ok.csv")})

    # Execute / Assert
    with pytest.raises(PreflightError, match=r"site\.csv: not UTF-8 text"):
        check_site_file(cfg, tmp_path / "site.csv")
    data = check_site_file(cfg, tmp_path / "ok.csv")
    assert len(data.train) + len(data.test) == 60
