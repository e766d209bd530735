"""``sgdlab`` command line: a thin layer over :mod:`sgdlab.train` and :mod:`sgdlab.experiments`.

Errors the user can fix (bad config, missing data, a locked or unwritable folder, a corrupt
checkpoint) print one line and exit with code 2, without a traceback; a run stopped by a non-finite
loss exits with code 3; a run or sweep stopped by SIGTERM, SIGINT or SIGUSR1 saves its state and exits
with 128 + the signal's number (143, 130, 138). See docs/robustness.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import NonFiniteLossError, SgdlabError
from .files import is_existing_path

__all__ = ["main"]


def _is_override(token: str) -> bool:
    """``key=value`` (a dotted config key), as opposed to a path or an option."""
    return "=" in token and not token.startswith("-") and not is_existing_path(token)


def _threads_override(args) -> list[str]:
    return [f"threads={args.threads}"] if getattr(args, "threads", None) is not None else []


def _cmd_run(args) -> int:
    from . import train

    # no config: the Config defaults, the same experiment as an empty config file
    summary = train.run(args.config, args.out, overrides=args.overrides + _threads_override(args), quiet=args.quiet)
    final = summary.get("final", {})
    if "test_acc" in final:
        print(f"final test accuracy: {final['test_acc']:.4f}")
    return 0


def _cmd_resume(args) -> int:
    from . import train

    summary = train.resume(args.run_dir, overrides=args.overrides or None, quiet=args.quiet, threads=args.threads)
    final = summary.get("final", {})
    if "test_acc" in final:
        print(f"final test accuracy: {final['test_acc']:.4f}")
    return 0


def _cmd_check(args) -> int:
    from .train.check import check_config

    failures = 0
    for path in args.configs:
        ok, lines = check_config(path, overrides=args.overrides + _threads_override(args))
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .experiments.analyze import format_results
    from .experiments.analyze import main as analyze_main

    opts = {k: v for k, v in {
        "k": args.k, "eps": args.eps, "max_examples": args.examples, "split": args.split, "seed": args.seed,
        "num_samples": args.samples, "trace_method": args.trace_method, "blocks": args.blocks,
        "curvature": args.curvature, "data_resamples": args.resamples, "num_pairs": args.pairs,
        "noise_batch_sizes": args.noise_batch_sizes, "batch_size": args.batch_size, "threads": args.threads,
    }.items() if v is not None}
    where = ", ".join(str(d) for d in args.run_dirs)
    console = Console(stderr=True)
    # progress on a terminal only: redirected or captured stderr keeps just the one-line errors
    bar = Progress(SpinnerColumn(), TextColumn(f"analyze {args.kind} {where}:"), TextColumn("{task.description}"),
                   BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task("loading", total=None)

    def progress(done: int, total: int, stage: str) -> None:
        bar.update(task, completed=done, total=total, description=stage)

    try:
        with bar:
            result = analyze_main(args.kind, args.run_dirs, progress=progress, **opts)
    except (ValueError, FileNotFoundError) as e:  # bad option or run directory: one line, exit 2
        print(f"sgdlab: error: {e}", file=sys.stderr)
        return 2
    print(format_results(result))
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _two_ints(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B_SMALL,B_BIG (two integers), got {text!r}") from None
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgdlab", description="Stochastic training of deep networks: sampling, "
                                "noise injection and diagnostics of SGD solutions.")
    p.add_argument("--version", action="version", version=f"sgdlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train from a config (default: cnn1d on MNIST-1D)")
    r.add_argument("config", nargs="?", help="YAML config (omit for the default experiment)")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05")
    r.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    r.add_argument("--threads", type=int, help="torch CPU threads (the config key 'threads'; default auto)")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("resume", help="continue an interrupted run to its configured end")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", help="keys a resume may change, e.g. duration='300 epochs' eval.every=100")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: the run's own setting)")
    s.set_defaults(fn=_cmd_resume)

    c = sub.add_parser("check", help="validate configs and instantiate their model and data pipeline")
    c.add_argument("configs", nargs="+", help="YAML configs, then any key=value overrides for all of them")
    c.add_argument("--set", dest="set_overrides", action="append", default=[], help=argparse.SUPPRESS)
    c.add_argument("--threads", type=int, help="check with this 'threads' setting")
    c.set_defaults(fn=_cmd_check)

    a = sub.add_parser("analyze", help="diagnostics of trained runs (JSON + PNG into the run directory)")
    a.add_argument("kind", choices=["sharpness", "hessian", "interpolate", "noise"])
    a.add_argument("run_dirs", nargs="+")
    a.add_argument("-k", type=int, help="hessian: number of top eigenvalues (default 5)")
    a.add_argument("--eps", type=_floats, help="sharpness: box sizes, comma-separated (default 1e-3,5e-4)")
    a.add_argument("--examples", type=int, help="use a seeded subset of this many examples (default: all)")
    a.add_argument("--split", choices=["train", "test"], help="data to evaluate on (default train)")
    a.add_argument("--batch-size", type=int, help="evaluation batch size (results do not depend on it)")
    a.add_argument("--seed", type=int, help="seed of the subset, probes and pairs (default 0)")
    a.add_argument("--samples", type=int, help="hessian: products for the trace estimate (default 99)")
    a.add_argument("--trace-method", choices=["hutch++", "xtrace", "krylov", "hutchinson", "exact"], help="default hutch++")
    a.add_argument("--blocks", nargs="?", const="layers", choices=["layers", "stages"],
                   help="hessian: also print trace and top eigenvalue per layer (or per stage)")
    a.add_argument("--curvature", choices=["hessian", "ggn"], help="hessian: matrix to analyse")
    a.add_argument("--resamples", type=int, help="hessian: bootstrap resamples of the data for error bars")
    a.add_argument("--pairs", type=int, help="noise: batch pairs of the two-batch estimate (default 200)")
    a.add_argument("--noise-batch-sizes", type=_two_ints, help="noise: B_SMALL,B_BIG (default 16,256)")
    a.add_argument("--threads", type=int, help="torch CPU threads (default: the run's own setting, as 'run' "
                   "applies it)")
    a.set_defaults(fn=_cmd_analyze)

    try:
        from .experiments import commands as exp_commands
    except ImportError:
        exp_commands = None
    if exp_commands is not None:
        exp_commands.add_parsers(sub)
    return p


def _regroup(parser: argparse.ArgumentParser, args, extra: list[str]) -> None:
    """One grammar for every command that takes a config: ``CONFIG [key=value ...]`` with options anywhere.

    argparse leaves positionals that follow an option unparsed; they are sorted here into the config
    slot and the overrides, and anything else is an error as usual.
    """
    command = getattr(args, "command", None)
    if command == "resume":  # RUN_DIR [key=value ...]: the keys a resume may change
        bad = [t for t in extra if not _is_override(t)]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides) + extra
        return
    takes_overrides = command in ("run", "check", "sweep")
    if not takes_overrides:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return
    if command == "check":
        tokens = list(args.configs) + extra
        args.configs = [t for t in tokens if not _is_override(t)]
        args.overrides = [t for t in tokens if _is_override(t)] + list(args.set_overrides)
        bad = [t for t in args.configs if t.startswith("-")]
        if bad or not args.configs:
            parser.error(f"unrecognized arguments: {' '.join(bad)}" if bad else "check: give at least one config")
        return
    tokens = ([args.config] if args.config else []) + list(args.overrides) + extra
    bad = [t for t in tokens if t.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    configs = [t for t in tokens if not _is_override(t)]
    if len(configs) > 1:
        parser.error(f"{command}: one config file, then key=value overrides; got {', '.join(configs)}")
    args.config = configs[0] if configs else None
    args.overrides = [t for t in tokens if _is_override(t)]
    if command == "sweep" and args.config is None:
        parser.error("sweep: give the base config file")


def _take_imports(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``--import MODULE`` / ``--import=MODULE`` (anywhere on the line) from the other arguments."""
    rest, modules, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--import" and i + 1 < len(argv):
            modules.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--import="):
            modules.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return rest, modules


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                        help="import MODULE first (your data.register / models.register code); repeatable, "
                             "accepted anywhere on the line and recorded in the run's config")
    argv, modules = _take_imports(list(sys.argv[1:] if argv is None else argv))
    if modules:
        from .train.config import add_cli_imports

        try:
            add_cli_imports(modules)
        except SgdlabError as e:
            print(f"sgdlab: error: {e}", file=sys.stderr)
            return 2
    args, extra = parser.parse_known_args(argv)
    _regroup(parser, args, extra)
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
