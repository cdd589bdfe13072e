"""``fedtune bench NAME [--quick]``: the benchmarks, one driver module each, and their registry.

Each benchmark is a module ``simulations/benchmarks/<name>.py`` that declares one
:class:`~.spec.Benchmark` named ``BENCHMARK``: its settings, how it measures its arms, its table's
columns, its plot and its targets. :meth:`~.spec.Benchmark.run` runs the compared arms side by side,
prints the table and writes ``results/<name>.json``, ``results/<name>.md`` and
``results/<name>_*.png``. ``--quick`` is a few-minute validation on tiny data; the full mode is the
configuration the issue asks for. Working folders (each federated arm's ``--out`` and log) go under
``results/work/<name>/``.

Shared parts: :mod:`.spec` (the description and its run), :mod:`.harness` (subprocess arms, peak
memory, result files), :mod:`.arms` (working folders, saved arms, arm selection), :mod:`.training`
(in-process PEFT arms), :mod:`.stats`, :mod:`.data`, :mod:`.figures`, :mod:`.curves` (validation
curves) and :mod:`.report` (``BENCHMARKS.md``). Driver modules are imported lazily, so
``fedtune bench report`` and the CLI stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from .harness import console

DESCRIPTIONS: dict[str, str] = {
    "quality": "Model quality on ICD-10 chapter coding under a fair protocol: federated vs centralized PEFT "
    "on the pooled data vs each site alone, each at its best validation point and at the default budget, "
    "over IID, Dirichlet and specialty partitions.",
    "rounds": "How the macro-F1 gap between FedAvg and centralized PEFT (and the lift over local-only) "
    "changes over 20 rounds, at equal examples seen.",
    "tuning": "The local recipe (label-skew correction, local work, learning rate and schedule), the server "
    "optimiser and LoRA variant, chosen on the sites' validation splits at Dirichlet 0.3.",
    "head": "The shared head averaged from the sites' heads vs `head-fit=lda` (solved by LDA from the sites' "
    "securely aggregated feature statistics after every round), and the averaged run's encoder with a solved "
    "head: where the federated gap is.",
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
    "llm": "Generative ICD-10-CM coding on the packaged SmolLM2-135M: federated LoRA vs centralized vs "
    "each site alone vs zero-shot (exact, category and valid-code match), bytes per site per round vs the "
    "full model.",
    "deploy": "A real deployment (SuperLink + SuperNodes over TLS with node authentication) vs a simulation "
    "of the same run, and the one-off base-model transfer to sites that lack the model.",
}


NAMES: tuple[str, ...] = tuple(DESCRIPTIONS)


def _loader(name: str) -> Callable[[bool], Path]:
    def run(quick: bool) -> Path:
        if not console.is_terminal:  # a log file: do not squeeze the result table into 80 columns
            console.width = max(console.width, 200)
        return importlib.import_module(f"fedtune.simulations.benchmarks.{name}").BENCHMARK.run(quick)

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
