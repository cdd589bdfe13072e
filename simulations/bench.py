"""``fedtune bench NAME [--quick]``: the benchmark registry, their shared helpers and ``BENCHMARKS.md``.

Each benchmark is a module ``simulations/bench_<name>.py`` whose ``run(quick) -> Path`` runs the
compared arms side by side, prints a table and writes ``results/<name>.json``, ``results/<name>.md``
and ``results/<name>_*.png`` (see :mod:`fedtune.simulations.benchmarking`). ``--quick`` is a few-minute
validation on tiny data; the full mode is the configuration the issue asks for. Working folders
(each federated arm's ``--out`` and log) go under ``results/work/<name>/``.

Benchmark modules are imported lazily, so ``fedtune bench report`` and the CLI stay fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fedtune.common.files import write_json_atomic
from fedtune.common.records import RoundRecord
from fedtune.common.run_folder import RunFolder

from .benchmarking import RESULTS, Arm, console, simulate_arm

if TYPE_CHECKING:  # heavy imports only where a benchmark trains in-process
    from fedtune.common.config import FedConfig
    from fedtune.common.data import TextDataset
    from fedtune.common.local_plan import Schedule
    from fedtune.common.train import TrainResult

DESCRIPTIONS: dict[str, str] = {
    "quality": "Model quality on ICD-10 chapter coding under a fair protocol: federated vs centralized PEFT "
    "on the pooled data vs each site alone, each at its best validation point and at the default budget, "
    "over IID, Dirichlet and specialty partitions.",
    "rounds": "How the macro-F1 gap between FedAvg and centralized PEFT (and the lift over local-only) "
    "changes over 20 rounds, at equal examples seen.",
    "tuning": "The local recipe (label-skew correction, local work, learning rate and schedule), the server "
    "optimiser and LoRA variant, chosen on the sites' validation splits at Dirichlet 0.3.",
    "diabetes": "Pima diabetes split over hospitals by age: federated vs each single site vs centralized, "
    "ROC AUC with bootstrap 95% CIs.",
    "methods": "LoRA r=4/8/16 vs prefix tuning 10/20 virtual tokens: trainable share, bytes per site per "
    "round, macro-F1, time per round.",
    "comm": "Bytes on the wire per site per round for each PEFT method, with and without SecAgg+, against "
    "full fine-tuning of the same base model.",
    "secagg": "Round time with SecAgg+ vs plain aggregation at growing site counts, and the aggregate's "
    "error.",
    "overhead": "Framework overhead: a federated round vs the same PEFT training loop run directly.",
    "scale": "10 to 1,000 simulated hospitals, 10 sampled per round: peak memory and seconds per round.",
    "privacy": "Membership-inference AUC and empirical epsilon vs the accountant's epsilon for "
    "epsilon = inf, 8, 2, with the accuracy cost.",
    "deploy": "A real deployment (SuperLink + SuperNodes over TLS with node authentication) vs a simulation "
    "of the same run, and the one-off base-model transfer to sites that lack the model.",
}
NAMES: tuple[str, ...] = tuple(DESCRIPTIONS)


def _loader(name: str) -> Callable[[bool], Path]:
    def run(quick: bool) -> Path:
        if not console.is_terminal:  # a log file: do not squeeze the result table into 80 columns
            console.width = max(console.width, 200)
        return importlib.import_module(f"fedtune.simulations.bench_{name}").run(quick)

    run.__name__ = run.__qualname__ = f"bench_{name}"
    run.__doc__ = DESCRIPTIONS[name]
    return run


BENCHMARKS: dict[str, Callable[[bool], Path]] = {name: _loader(name) for name in NAMES}


def get_benchmark(name: str) -> Callable[[bool], Path]:
    """Look a benchmark up by name.

    Raises
    ------
    KeyError
        On an unknown name; the message lists every valid one (and ``report``).
    """
    if name not in BENCHMARKS:
        raise KeyError(
            f"Unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)} "
            "(or `report` to assemble BENCHMARKS.md)."
        )
    return BENCHMARKS[name]


# --- working folders and federated arms ------------------------------------------------------------


def work_dir(name: str) -> Path:
    """``results/work/<name>/`` (created): the benchmark's arms' ``--out`` folders and logs."""
    path = RESULTS / "work" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def arms_dir(name: str) -> Path:
    """``results/arms/<name>/`` (created, kept in git): one small JSON result per computed arm.

    A long grid run in parts, over sessions or machines, is assembled from these files (see
    :func:`cached`); the arms' working folders stay in :func:`work_dir`.
    """
    path = RESULTS / "arms" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def federated_arm(
    bench: str, label: str, num_clients: int, run_config: Mapping[str, Any], timeout: float = 3 * 3600
) -> Arm:
    """Run one ``fedtune simulate`` arm into a fresh ``results/work/<bench>/<label>/``."""
    out = work_dir(bench) / label
    shutil.rmtree(out, ignore_errors=True)  # a previous bench run's folder: start clean
    return simulate_arm(out, num_clients, dict(run_config), timeout=timeout)


def cached(path: Path, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Reuse an arm's result saved at ``path`` when ``FEDTUNE_BENCH_RESUME=1`` and its ``key`` matches.

    Long benchmarks can so be run in parts (a subset of arms per invocation) and assembled by a last
    run with every arm and ``FEDTUNE_BENCH_RESUME=1``. Without the variable every arm is recomputed.
    """
    if os.environ.get("FEDTUNE_BENCH_RESUME") == "1":
        result = saved(path, key)
        if result is not None:
            return result
    result = compute()
    # atomic: a benchmark killed while saving leaves the previous file or none, never half of one
    write_json_atomic(path, {"key": _jsonable(key), "result": json.loads(json.dumps(result, default=float))})
    return result


def saved(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The arm result saved at ``path`` by :func:`cached` if its key equals ``key``, else ``None``."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(
            f"Saved arm {path} is not valid JSON ({err}): delete it to recompute the arm."
        ) from None
    return entry["result"] if entry.get("key") == _jsonable(key) else None


def saved_only() -> bool:
    """``FEDTUNE_BENCH_SAVED_ONLY=1``: assemble the table from saved arms only, computing nothing.

    A grid run in parts over several sessions can so be reported as it stands; the arms not saved
    yet are listed in the results.
    """
    return os.environ.get("FEDTUNE_BENCH_SAVED_ONLY") == "1"


def _jsonable(key: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(key, default=str))


def resolved(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting an arm with these overrides runs with, defaults included (not its output folder).

    Part of a saved arm's key, so that an arm computed before a default changed is not reused.
    """
    from fedtune.common.config import key_of, parse_run_config

    full = parse_run_config(dict(run_config)).to_run_config()
    return {k: v for k, v in full.items() if k != key_of("out_dir")}


def env_list(var: str, default: Sequence[Any], cast: Callable[[str], Any] = str) -> list[Any]:
    """A comma-separated override of a benchmark's arms from the environment, else ``default``.

    Raises
    ------
    ValueError
        On a value ``cast`` rejects (names the variable).
    """
    raw = os.environ.get(var, "").strip()
    if not raw:
        return list(default)
    try:
        return [cast(x.strip()) for x in raw.split(",") if x.strip()]
    except ValueError as err:
        raise ValueError(f"${var}={raw!r}: {err}") from None


def choose(var: str, requested: Sequence[str], valid: Sequence[str]) -> list[str]:
    """Check arm names picked with ``var`` against the ``valid`` ones.

    Raises
    ------
    ValueError
        Naming the unknown arm(s) and listing the valid ones.
    """
    unknown = [x for x in requested if x not in valid]
    if unknown:
        raise ValueError(f"${var}: unknown {', '.join(unknown)}; valid: {', '.join(valid)}.")
    return list(requested)


# --- statistics --------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def pm(mean: float, std: float, digits: int = 3) -> str:
    """``"0.812 ± 0.010"``."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """ROC AUC and its percentile bootstrap CI over ``resamples`` seeded resamples of the test set.

    A resample holding a single class has no AUC and is drawn again (so exactly ``resamples`` count).

    Returns
    -------
    tuple[float, float, float]
        ``(auc, low, high)``.

    Raises
    ------
    ValueError
        When ``labels`` does not hold both classes.
    """
    from sklearn.metrics import roc_auc_score

    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if len(np.unique(labels)) != 2:
        raise ValueError(f"ROC AUC needs both classes in the test set, got {np.unique(labels).tolist()}.")
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    while len(aucs) < resamples:
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():
            aucs.append(float(roc_auc_score(labels[idx], scores[idx])))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(roc_auc_score(labels, scores)), float(low), float(high)


def skewed_split(values: Sequence[float], num_sites: int) -> list[np.ndarray]:
    """Cut examples into ``num_sites`` contiguous blocks of a feature's sorted order.

    The indices are sorted by ``values`` (stable: ties keep their order) and cut into blocks of
    ``len // num_sites`` or one more, so site 0 holds the smallest values (e.g. the youngest
    patients) and the last site the largest.

    Raises
    ------
    ValueError
        When ``num_sites`` is not in ``1 .. len(values)``.
    """
    if not 1 <= num_sites <= len(values):
        raise ValueError(f"num_sites must be in 1..{len(values)}, got {num_sites}.")
    order = np.argsort(np.asarray(values, dtype=float), kind="stable").astype(np.int64)
    return [np.asarray(b) for b in np.array_split(order, num_sites)]


def feature_value(text: str, name: str) -> float:
    """The value of ``name`` in a row serialised as ``"name: value; ..."``.

    Raises
    ------
    ValueError
        When the row has no such feature.
    """
    match = re.search(rf"(?:^|;\s*){re.escape(name)}:\s*([-+0-9.eE]+)", text)
    if match is None:
        raise ValueError(f"No `{name}: <number>` in {text[:80]!r}.")
    return float(match.group(1))


# --- in-process PEFT training (centralized and single-site arms) --------------------------------------


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (``None``: leave torch's setting)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_threads() -> int:
    """Torch CPU threads of the in-process arms: ``$FEDTUNE_BENCH_THREADS``, default 1.

    1 is what a simulated site gets (one Ray actor with ``num_cpus=1``); on a shared CPU more threads
    than free cores can make PyTorch many times slower, and these arms report quality, not time.
    """
    return int(os.environ.get("FEDTUNE_BENCH_THREADS", "1"))


def fresh_model(cfg: FedConfig, num_labels: int):  # noqa: ANN201 - a PeftModel
    """The PEFT model of ``cfg`` at the seeded initialisation the coordinator starts from."""
    from fedtune.common.model import PeftSpec, build_peft_model, resolve_model_dir

    return build_peft_model(PeftSpec.from_config(cfg, resolve_model_dir(cfg.base_model), num_labels))


def concat(parts: Sequence[TextDataset]) -> TextDataset:
    """One dataset holding every example of ``parts`` (same label names), in order."""
    return dataclasses.replace(
        parts[0],
        texts=tuple(t for p in parts for t in p.texts),
        labels=np.concatenate([p.labels for p in parts]),
    )


def central_schedule(cfg: FedConfig, examples: int, epochs: int) -> Schedule:
    """Centralized training's learning-rate schedule: the run config's, over all of its ``epochs``."""
    from fedtune.common.local_plan import Schedule

    total = epochs * math.ceil(examples / cfg.batch_size)
    return Schedule(cfg.lr_schedule, total=total, warmup=round(cfg.lr_warmup * total))


def train_central(
    cfg: FedConfig,
    model: Any,
    train: TextDataset,
    *,
    epochs: int,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train`` in-process for ``epochs`` with a site's settings of ``cfg``.

    Same optimiser, batch size, learning rate, max length, device and seed as a federated site; the
    learning-rate schedule runs over all ``epochs`` and ``label-skew`` uses ``train``'s own label prior.
    """
    from fedtune.common.model import load_tokenizer, resolve_model_dir
    from fedtune.common.train import recipe, select_device
    from fedtune.common.train import train as train_loop

    with torch_threads(bench_threads()):
        return train_loop(
            model,
            load_tokenizer(resolve_model_dir(cfg.base_model)),
            train,
            epochs=epochs,
            device=select_device(cfg.device),
            seed=cfg.seed,
            schedule=central_schedule(cfg, len(train), epochs),
            on_epoch_end=on_epoch_end,
            **recipe(cfg, train),
        )


def train_and_score(
    cfg: FedConfig,
    train: TextDataset,
    test: TextDataset,
    *,
    epochs: int,
    keep_probs: bool = False,
    curve_at: Sequence[int] = (),
) -> dict[str, Any]:
    """Train a fresh PEFT model of ``cfg`` on ``train`` with :func:`train_central`; score it on ``test``.

    ``curve_at``: epochs after which the model is also scored on ``test`` (one run, the optimiser's
    state kept), returned as ``curve``: one ``{"epoch", "accuracy", "macro_f1"}`` per such epoch.
    """
    from fedtune.common.model import load_tokenizer, resolve_model_dir
    from fedtune.common.train import predict_proba, score, select_device

    model = fresh_model(cfg, len(train.label_names))
    tokenizer = load_tokenizer(resolve_model_dir(cfg.base_model))
    device = select_device(cfg.device)
    num_labels = len(test.label_names)

    def probs() -> np.ndarray:
        return predict_proba(
            model, tokenizer, test, batch_size=cfg.batch_size, max_length=cfg.max_length, device=device
        )

    curve: list[dict[str, float]] = []

    def on_epoch_end(epoch: int) -> None:
        if epoch in curve_at:
            m = score(probs(), test.labels, num_labels).as_metrics()
            curve.append({"epoch": epoch, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})

    res = train_central(cfg, model, train, epochs=epochs, on_epoch_end=on_epoch_end if curve_at else None)
    with torch_threads(bench_threads()):
        final = probs()
    scored = score(final, test.labels, num_labels)
    console.print(
        f"[dim]in-process arm: {len(train)} examples x {epochs} epochs in {res.seconds:.0f} s, "
        f"held-out macro-F1 {scored.macro_f1:.3f}[/dim]"
    )
    out: dict[str, Any] = {
        **scored.as_metrics(),
        "train_examples": len(train),
        "examples_seen": res.examples,
        "train_seconds": res.seconds,
    }
    if curve_at:
        out["curve"] = curve
    if keep_probs:
        out["probs"] = final
    return out


def adapter_tensors(out: Path) -> dict[str, np.ndarray]:
    """The final shared adapter of a run (``OUT/adapter/adapter_model.safetensors``) as numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(str(RunFolder(out).adapter_weights))


def shared_adapter_probs(cfg: FedConfig, out: Path, test: TextDataset) -> np.ndarray:
    """Class probabilities of a finished run's shared adapter on ``test`` (for a bootstrap CI)."""
    import torch
    from fedtune.common.model import load_tokenizer, resolve_model_dir
    from fedtune.common.train import predict_proba, select_device
    from peft import set_peft_model_state_dict

    model = fresh_model(cfg, len(test.label_names))
    state = {k: torch.from_numpy(v) for k, v in adapter_tensors(out).items()}
    set_peft_model_state_dict(model, state)
    tokenizer = load_tokenizer(resolve_model_dir(cfg.base_model))
    with torch_threads(bench_threads()):
        return predict_proba(
            model,
            tokenizer,
            test,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            device=select_device(cfg.device),
        )


def per_site_mean(record: RoundRecord, key: str) -> float:
    """Mean over sites of a per-site byte count (``bytes_up_per_site`` / ``bytes_down_per_site``)."""
    values = list((getattr(record, key) or {}).values())
    return float(sum(values) / len(values)) if values else math.nan


def mean_over_rounds(records: Sequence[RoundRecord], fn: Callable[[RoundRecord], float]) -> float:
    """Mean of ``fn(record)`` over the rounds (round 0, the initial adapter, left out)."""
    values = [fn(r) for r in records if r.round > 0]
    return float(sum(values) / len(values)) if values else math.nan


def run_meta(out: Path) -> dict[str, Any]:
    """``OUT/adapter/fedtune.json``: adapter bytes, trainable share, base-model bytes, ..."""
    return json.loads(RunFolder(out).adapter_metadata.read_text())


# --- plots -------------------------------------------------------------------------------------------


def new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1):  # noqa: ANN201 - (figure, axes)
    """A matplotlib figure with ``ncols`` axes side by side, on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def save_figure(fig: Any, name: str, suffix: str) -> Path:
    """Save ``fig`` as ``results/<name>_<suffix>.png`` and close it."""
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}_{suffix}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- BENCHMARKS.md -----------------------------------------------------------------------------------


def collect(results_dir: str | Path = RESULTS, out: str | Path = "BENCHMARKS.md") -> Path:
    """Assemble ``BENCHMARKS.md`` from ``results_dir/<name>.md``, its PNGs and the exact command.

    Benchmarks are listed in registry order; one without results says how to produce them. Plot
    paths are written relative to ``out``'s folder so the images render on GitHub.

    Returns
    -------
    Path
        ``out``.
    """
    results_dir, out = Path(results_dir), Path(out)
    base = out.resolve().parent
    lines = [
        "# Benchmarks",
        "",
        "Written by `fedtune bench report` from `results/` (each benchmark: `fedtune bench NAME`; "
        "`--quick` runs are small validation runs, not the figures the issue asks for). Every table "
        "records the machine it ran on; ratios are taken against the baseline measured in the same run.",
        "",
    ]
    lines += [f"- [{n}](#{n}): {DESCRIPTIONS[n]}" for n in NAMES]
    for name in NAMES:
        md, js = results_dir / f"{name}.md", results_dir / f"{name}.json"
        lines.append("")
        if not md.is_file():
            lines += [f"## {name}", "", f"Not run yet: `fedtune bench {name}`.", ""]
            continue
        meta = json.loads(js.read_text()) if js.is_file() else {}
        command = meta.get("command", f"fedtune bench {name}")
        body = md.read_text().rstrip("\n").splitlines()
        if body and body[0].startswith("## "):
            body = body[1:]
        lines += [f"## {name}", "", DESCRIPTIONS[name], ""]
        if meta.get("quick"):
            lines += [
                "> Quick validation run: tiny data and few arms; rerun without `--quick` for the "
                "figures the issue asks for.",
                "",
            ]
        lines += ["```bash", command, "```", *body, ""]
        for png in sorted(results_dir.glob(f"{name}_*.png")):
            rel = os.path.relpath(png.resolve(), base)
            lines += [f"![{name}: {png.stem.removeprefix(name + '_')}]({rel})", ""]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))  # one blank line between blocks
    out.write_text(text.rstrip("\n") + "\n")
    return out
