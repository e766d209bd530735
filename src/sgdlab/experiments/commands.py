"""CLI hook: ``sgdlab sweep``, ``sgdlab report`` and ``sgdlab study`` (added to ``sgdlab.cli``'s parser)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

__all__ = ["add_parsers"]


def _default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _cmd_sweep(args) -> int:
    from .sweep import grid_points, parse_grid, run_sweep

    grid = parse_grid(args.grid or [])
    out = args.out or str(Path("runs") / ("sweep-" + Path(args.config).stem))
    config = args.config
    if args.overrides:  # key=value overrides of the base config, as for `sgdlab run`
        from ..train.config import apply_overrides, read_raw_config

        config = apply_overrides(read_raw_config(Path(args.config)), args.overrides)
    m = run_sweep(config, grid_points(grid) if grid else None, args.seeds, out, jobs=args.jobs,
                  backend=args.backend, address=args.address, progress=not args.quiet)
    c = m["counts"]
    print(f"{out}: {len(m['trials'])} trials; ran {c.get('ran', 0)}, resumed {c.get('resumed', 0)}, "
          f"skipped {c.get('skipped', 0)}, failed {c.get('failed', 0)}")
    for t in m["trials"]:
        if t.get("status") == "failed":
            print(f"  failed: {t['name']}: {t.get('message', '')}")
    if not args.no_report:
        from .report import write_report

        paths = write_report(out, baseline=args.baseline)
        print(f"report: {paths['html']}")
    return 1 if c.get("failed") else 0


def _cmd_report(args) -> int:
    from .report import write_report

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    kw = {"metrics": metrics} if metrics else {}
    paths = write_report(args.dir, args.out, baseline=args.baseline, strict_metrics=True, **kw)
    print(f"{paths['markdown']}\n{paths['html']}")
    return 0


def _cmd_study(args) -> int:
    import sys

    from rich.console import Console

    from . import studies

    console = Console(width=None if sys.stdout.isatty() else 150)
    if args.name == "all":
        res = studies.run_all(quick=args.quick, out=args.out, jobs=args.jobs, progress=not args.quiet,
                              console=console)
        console.print(studies.verdict_table(res["verdicts"], title=f"Verdicts ({'quick' if args.quick else 'full'}"
                                                                   f", {res['seconds']:.0f} s)"))
        console.print(f"summary: {res['summary']['html']}")
        return 0
    if args.name not in studies.STUDIES:
        raise ConfigError(f"unknown study {args.name!r}; known: {', '.join(studies.names())}, all")
    res = studies.run_study(args.name, quick=args.quick, out=args.out, jobs=args.jobs, progress=not args.quiet)
    console.print(studies.verdict_table(res["verdicts"], title=f"{args.name} ({res['seconds']:.0f} s)"))
    console.print(f"report: {res['report']['html']}")
    return 0


def add_parsers(sub) -> None:
    """Register ``sweep``, ``report`` and ``study`` on the ``sgdlab`` subparsers."""
    s = sub.add_parser("sweep", help="run a config over a grid x seeds in parallel (resumable)")
    s.add_argument("config", nargs="?", help="base YAML config")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base config")
    s.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="dotted key and values (YAML), repeatable; the sweep runs their cross product")
    s.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per grid point (default 1)")
    s.add_argument("--jobs", type=int, default=_default_jobs(), help="parallel worker processes")
    s.add_argument("--out", help="sweep directory (default runs/sweep-<config name>)")
    s.add_argument("--backend", choices=["process", "ray"], default="process")
    s.add_argument("--address", help="Ray cluster address (default: a local instance)")
    s.add_argument("--baseline", help="group for differences in the report, key=value or label=NAME")
    s.add_argument("--no-report", action="store_true", help="skip writing report.md/html")
    s.add_argument("--quiet", action="store_true", help="no progress display")
    s.set_defaults(fn=_cmd_sweep)

    r = sub.add_parser("report", help="Markdown + HTML report (PNG figures) of a sweep or a single run")
    r.add_argument("dir", help="sweep directory (holds sweep.json) or run directory (holds config.yaml)")
    r.add_argument("--baseline", help="group to compare against: key=value (e.g. sampler.name=epoch) or label=NAME")
    r.add_argument("--metrics", help="comma-separated final metrics (default test_error,test_loss,...; "
                   "an unknown name lists the valid ones)")
    r.add_argument("--out", help="where to write the report (default: the sweep directory)")
    r.set_defaults(fn=_cmd_report)

    t = sub.add_parser("study", help="test a paper's claim on MNIST-1D: sweep, analyses, report, verdict")
    t.add_argument("name", help="srs, shake, random_gradient, importance, batch_size, scaling, optimal_batch, or all")
    t.add_argument("--quick", action="store_true", help="few seeds, short runs (about a minute per study)")
    t.add_argument("--out", help="output directory (default runs/studies/NAME[-quick]; for all: runs/studies)")
    t.add_argument("--jobs", type=int, default=_default_jobs(), help="parallel worker processes")
    t.add_argument("--quiet", action="store_true", help="no progress display")
    t.set_defaults(fn=_cmd_study)
