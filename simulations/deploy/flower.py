"""The Flower side of ``fedtune deploy-local``: app copy, CLI connection, environment, node config.

The app copy is what ``flwr run`` submits; the connection and environment are the ``flwr`` CLI's
and the processes'; the node config is each SuperNode's. The deployment's errors are defined here.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import tomli
import tomli_w
from fedtune.common.site_config import SiteConfig

CONNECTION = "fedtune-local"  # name of the SuperLink connection in OUT/flwr/cli/config.toml
_QUIET_FLOWER = {
    "FLWR_TELEMETRY_ENABLED": "0",  # no network: no telemetry events ...
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # ... and no update check
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    # Flower's SuperExec looks for a message to start a ClientApp process for once a second by default;
    # on one machine a tenth of that costs nothing and saves about half a second per message
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


class DeployError(RuntimeError):
    """A deployment step failed; the message names the step, the log to read and the fix."""


class DeployInputError(DeployError):
    """The deployment was refused before anything started: bad sites' files, config or folders."""


def tool(name: str) -> str:
    """Path of a Flower console script of this environment (``flwr``, ``flower-superlink`` ...)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise DeployError(f"`{name}` not found beside {sys.executable} nor on PATH; `pip install flwr`.")
    return found


def flower_env(
    flwr_home: Path, base: Mapping[str, str] | None = None, threads: int | None = None
) -> dict[str, str]:
    """Environment of a Flower process: its own ``FLWR_HOME``, this environment's scripts first on PATH.

    ``threads`` caps the CPU threads of torch/BLAS (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) unless
    already set: sites sharing one machine would otherwise oversubscribe its cores.
    """
    env = dict(os.environ if base is None else base)
    for key, value in _QUIET_FLOWER.items():
        env.setdefault(key, value)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# --- files the deployment needs -------------------------------------------------------------------------
def repo_pyproject() -> Path:
    """The fedtune checkout's ``pyproject.toml`` (the Flower app; fedtune is installed editable)."""
    path = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not path.is_file():
        raise DeployError(
            f"{path} not found: deploy-local submits the fedtune Flower app from its source checkout; "
            "install it with `pip install -e .`."
        )
    return path


def write_app(app_dir: Path, pyproject: Path | None = None) -> Path:
    """Copy the app's ``pyproject.toml`` to ``app_dir`` without ``[tool.flwr.federations]``.

    ``flwr run`` 1.42 moves a ``[tool.flwr.federations]`` table into the Flower config and comments it
    out in place: on a copy, the repository's file is never rewritten.
    """
    source = pyproject or repo_pyproject()
    kept: list[str] = []
    dropping = False
    for line in source.read_text(encoding="utf-8").splitlines(keepends=True):
        header = re.match(r"\s*\[+\s*([^\]]+?)\s*\]", line)
        if header:
            dropping = header.group(1).startswith("tool.flwr.federations")
        if not dropping:
            kept.append(line)
    text = "".join(kept)
    config = tomli.loads(text)
    if "components" not in config.get("tool", {}).get("flwr", {}).get("app", {}):
        raise DeployError(f"{source} has no [tool.flwr.app.components]: it is not a Flower app.")
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(text, encoding="utf-8")
    return app_dir


def write_connection(flwr_home: Path, address: str, root_certificates: Path) -> Path:
    """Write the Flower config of ``flwr`` (1.42: ``$FLWR_HOME/config.toml``) naming the TLS SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": address, "root-certificates": str(root_certificates.resolve())},
        }
    }
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def node_config(site: SiteConfig) -> str:
    """``--node-config`` text: ``key='value'`` pairs (TOML literal strings, kebab-case keys).

    Raises
    ------
    DeployError
        A value contains a single quote or a line break (Flower's parser cannot carry it).
    """
    items = []
    for key, text in site.node_config().items():
        if "'" in text or "\n" in text:
            raise DeployError(f"Node config `{key}` {text!r} contains a quote or line break; rename it.")
        items.append(f"{key}='{text}'")
    return " ".join(items)
