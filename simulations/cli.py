"""The ``fedtune`` command line."""

from __future__ import annotations

import argparse
import sys

from fedtune.common.config import ConfigError, parse_overrides

from .presets import PRESETS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune", description="Federated PEFT tuning of a frozen base model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="Simulate a multi-hospital federation on this machine.")
    sim.add_argument("--preset", default="default", choices=sorted(PRESETS), help="Scenario preset.")
    sim.add_argument(
        "--num-clients", type=int, default=None, help="Simulated hospitals (default: the preset's)."
    )
    sim.add_argument(
        "--run-config", default="", help='Overrides, e.g. "num-server-rounds=5 peft-method=prefix".'
    )
    sim.add_argument("--out", default=None, help="Output folder (default: fedtune-out/<date-time>).")
    sim.add_argument("--overwrite", action="store_true", help="Allow an --out folder that holds a run.")
    sim.add_argument("--verbose", action="store_true", help="Show Flower's and the sites' logs.")
    aud = sub.add_parser("audit", help="Write OUT/audit/report.md and report.json for a finished run.")
    aud.add_argument("out", help="The run folder (a simulation's --out, or a deployment's gathered folders).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedtune`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        from .simulate import resolve, simulate

        try:
            cfg, num_clients = resolve(
                args.preset, args.num_clients, parse_overrides(args.run_config), args.out
            )
        except (ConfigError, ValueError, KeyError) as err:
            print(f"fedtune simulate: {err}", file=sys.stderr)
            return 2
        simulate(cfg, num_clients, verbose=args.verbose)
    elif args.command == "audit":
        from fedtune.common.audit_report import AuditError, write_report

        try:
            report = write_report(args.out)
        except AuditError as err:
            print(f"fedtune audit: {err}", file=sys.stderr)
            return 2
        print(
            f"Audit written to {args.out}/audit/report.md (only adapter left sites: "
            f"{report['only_adapter_left_sites']}; SecAgg+ masked: {report['secagg']['masked']})."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
