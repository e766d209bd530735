"""``sgdlab`` command line: a thin layer over :mod:`sgdlab.train` and :mod:`sgdlab.experiments`.

Errors the user can fix (bad config, missing data, a locked or unwritable folder, a corrupt
checkpoint) print one line and exit with code 2, without a traceback; a run stopped by a non-finite
loss exits with code 3; a run or sweep stopped by SIGTERM, SIGINT or SIGUSR1 saves its state and exits
with 128 + the signal's number (143, 130, 138). See docs/robustness.md.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from .errors import NonFiniteLossError, SgdlabError

__all__ = ["main", "default_config_path"]


def default_config_path() -> Path:
    """The packaged default experiment (cnn1d on MNIST-1D)."""
    return Path(str(resources.files("sgdlab.train").joinpath("default.yaml")))


def _cmd_run(args) -> int:
    from . import train

    config = args.config if args.config else default_config_path()
    summary = train.run(config, args.out, overrides=args.overrides, quiet=args.quiet)
    final = summary.get("final", {})
    if "test_acc" in final:
        print(f"final test accuracy: {final['test_acc']:.4f}")
    return 0


def _cmd_resume(args) -> int:
    from . import train

    summary = train.resume(args.run_dir, overrides=args.overrides or None, quiet=args.quiet)
    final = summary.get("final", {})
    if "test_acc" in final:
        print(f"final test accuracy: {final['test_acc']:.4f}")
    return 0


def _cmd_check(args) -> int:
    from .train.check import check_config

    failures = 0
    for path in args.configs:
        ok, lines = check_config(path, overrides=args.overrides)
        status = "ok" if ok else "FAILED"
        print(f"{path}: {status}")
        for line in lines:
            print(f"  {line}")
        if not ok:
            print(f"sgdlab: error: {path}: {lines[-1]}", file=sys.stderr)
        failures += not ok
    return 2 if failures else 0


def _cmd_analyze(args) -> int:
    from rich.console import Console

    from .experiments.analyze import main as analyze_main

    where = ", ".join(str(d) for d in args.run_dirs)
    with Console(stderr=True).status(f"sgdlab analyze {args.kind}: {where} (Hessian and sharpness "
                                     "take about a minute on a CPU)"):
        result = analyze_main(args.kind, args.run_dirs)
    if isinstance(result, dict) and result.get("written"):
        for p in result["written"]:
            print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgdlab", description="Stochastic training of deep networks: sampling, "
                                "noise injection and diagnostics of SGD solutions.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train from a config (default: cnn1d on MNIST-1D)")
    r.add_argument("config", nargs="?", help="YAML config (omit for the default experiment)")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05")
    r.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("resume", help="continue an interrupted run to its configured end")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", help="keys a resume may change, e.g. duration='300 epochs' eval.every=100")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_resume)

    c = sub.add_parser("check", help="validate configs and instantiate their model and data pipeline")
    c.add_argument("configs", nargs="+")
    c.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    c.set_defaults(fn=_cmd_check)

    a = sub.add_parser("analyze", help="diagnostics of trained runs (JSON + PNG into the run directory)")
    a.add_argument("kind", choices=["sharpness", "hessian", "interpolate", "noise"])
    a.add_argument("run_dirs", nargs="+")
    a.set_defaults(fn=_cmd_analyze)

    try:
        from .experiments import commands as exp_commands
    except ImportError:
        exp_commands = None
    if exp_commands is not None:
        exp_commands.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # `sgdlab run key=value ...` without a config file: the first key=value is an override too.
    if getattr(args, "command", None) == "run" and args.config and "=" in args.config \
            and not Path(args.config).exists():
        args.overrides = [args.config] + list(args.overrides)
        args.config = None
    from .train.guard import RunInterrupted, exit_code, os_error_line

    try:
        return args.fn(args) or 0
    except RunInterrupted as e:
        print(f"sgdlab: {e}", file=sys.stderr)
        return exit_code(e.signum)
    except NonFiniteLossError as e:
        print(f"sgdlab: {e}", file=sys.stderr)
        return 3
    except SgdlabError as e:
        print(f"sgdlab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk, --out naming a file, ...
        if e.errno is None and e.filename is None:
            raise
        print(f"sgdlab: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sgdlab: interrupted; resume with 'sgdlab resume RUN_DIR' (a sweep: run the same command again)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
