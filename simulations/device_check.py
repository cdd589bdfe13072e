"""Check a site's training path on each device: device selection, mixed precision, frozen base, speed.

Runs the same seeded local training (``fedtune.common.train``, what a site runs each round)
on every requested device, side by side, and writes ``OUT/device_check.json`` and
``OUT/device_check.md``. Each device first trains, untimed, on two batches (CUDA context, kernel
loading), and the adapter is reset after it, so the first device measured does not pay for start-up.
Needs no Flower::

    python -m fedtune.simulations.device_check --devices auto,cpu --out results/device
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from fedtune.common.adapters import get_adapter_arrays, set_adapter_arrays
from fedtune.common.config import parse_overrides, parse_run_config
from fedtune.common.data import split
from fedtune.common.model import bring_up, frozen_state_fingerprint, select_device
from fedtune.common.sites import load_configured
from fedtune.common.train import autocast_dtype, evaluate, train_local


def check(devices: list[str], run_config: dict[str, str]) -> list[dict]:
    """Train and evaluate once per device from the same initial adapter; return one row per device."""
    cfg = parse_run_config(run_config)
    data = load_configured(cfg)
    train_set, test_set = split(data, cfg.test_fraction, cfg.seed)
    parts = bring_up(cfg, len(data.label_names))
    model, tokenizer = parts.model, parts.tokenizer
    initial, frozen = get_adapter_arrays(model), frozen_state_fingerprint(model)
    warm_up = train_set.subset(np.arange(min(len(train_set), 2 * cfg.batch_size)))
    rows = []
    for name in devices:
        device = select_device(name)
        train_local(model, tokenizer, warm_up, cfg, device=device, seed=cfg.seed, server_round=1)
        set_adapter_arrays(model, initial)
        fit = train_local(
            model,
            tokenizer,
            train_set,
            cfg,
            device=device,
            seed=cfg.seed,
            server_round=1,
        )
        res = evaluate(
            model, tokenizer, test_set, batch_size=cfg.batch_size, max_length=cfg.max_length, device=device
        )
        rows.append(
            {
                "requested": name,
                "device": str(device),
                "device_name": torch.cuda.get_device_name()
                if device.type == "cuda"
                else platform.processor(),
                "autocast": str(autocast_dtype(device)),
                "train_examples_per_second": fit.examples / fit.seconds,
                "train_seconds": fit.seconds,
                "train_loss": fit.loss,
                "frozen_base_unchanged": frozen_state_fingerprint(model) == frozen,
                **{f"test_{k}": v for k, v in res.as_metrics().items()},
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="auto,cpu", help="Comma-separated: auto, cuda, cpu.")
    parser.add_argument("--run-config", default="task=diabetes max-examples=0 local-epochs=3 batch-size=32")
    parser.add_argument("--out", default="results/device")
    args = parser.parse_args(argv)
    rows = check(args.devices.split(","), parse_overrides(args.run_config))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "run_config": args.run_config}
    (out / "device_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += [
        "| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
        for r in rows
    ]
    if len(rows) > 1:
        ratio = rows[0]["train_examples_per_second"] / rows[-1]["train_examples_per_second"]
        lines.append(f"\nTraining speed {rows[0]['device']} / {rows[-1]['device']}: {ratio:.2f}x")
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
