"""CLI hook: ``sgdlab sweep``, ``sgdlab report``, ``sgdlab study`` and ``sgdlab ledger`` (added to ``sgdlab.cli``'s parser)."""

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
                  backend=args.backend, address=args.address, progress=not args.quiet,
                  baseline=None if args.no_report else args.baseline)
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


def _committed(results) -> dict[tuple[str, str], str]:
    """``{(study, claim id): verdict}`` committed under ``results`` (default ./results, else the source tree's)."""
    import json

    from .protocol import studies_dir

    roots = [Path(results)] if results else [Path("results")] + (
        [studies_dir().parent / "results"] if studies_dir() is not None else [])
    out: dict = {}
    for root in roots:
        for f in sorted(root.glob("*/verdicts.json")) if root.is_dir() else []:
            data = json.loads(f.read_text())
            for c in data.get("verdicts", []):
                out.setdefault((c["study"], c["id"]), c["verdict"])
    return out


def _cmd_study(args) -> int:
    import sys

    from rich.console import Console

    from . import studies
    from .ledger import rich_table

    console = Console(width=None if sys.stdout.isatty() else 150)
    kw = dict(quick=args.quick, results=args.results, jobs=args.jobs, progress=not args.quiet)
    if args.name == "all":
        done = studies.run_all(out=args.out, console=console, **kw)
    else:
        done = [studies.run_study(args.name, out=args.out, **kw)]
    claims = [c for r in done for c in r["verdicts"]]
    seconds = sum(r["seconds"] for r in done)
    if args.quick:
        committed = _committed(args.results)
        for c in claims:
            c["committed"] = committed.get((c["study"], c["id"]))
        console.print(rich_table(claims, title=f"Quick mode ({seconds:.0f} s): pilot estimates beside the "
                                               f"committed verdicts", pilot=True))
    else:
        console.print(rich_table(claims, title=f"Verdicts ({seconds:.0f} s)"))
    for r in done:
        console.print(f"{r['name']}: {r['artifacts'] / 'report.md'}")
    return 0


def _cmd_ledger(args) -> int:
    from .ledger import history_markdown, ledger_markdown, load, refresh, rich_table

    root = Path(args.results)
    if args.recompute:
        refresh(root)
    if args.history:
        print(history_markdown(root), end="")
        return 0
    if args.markdown:
        print(ledger_markdown(root), end="")
        return 0
    from rich.console import Console

    claims = load(root)
    if not claims:
        print(f"{root}: no study results (run `sgdlab study NAME`)")
        return 0
    Console(width=150).print(rich_table(claims))
    return 0


def add_parsers(sub) -> None:
    """Register ``sweep``, ``report``, ``study`` and ``ledger`` on the ``sgdlab`` subparsers."""
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

    t = sub.add_parser("study", help="run a study protocol (pre-registered claim test): sweep, verdicts, report")
    t.add_argument("name", help="a shipped study (srs, shake, random_gradient, importance, batch_size, scaling, "
                                "optimal_batch), 'all', or a protocol file path.yaml")
    t.add_argument("--quick", action="store_true", help="pilot seeds, short runs: pilot estimates, not verdicts")
    t.add_argument("--out", help="sweep folder (default runs/studies/NAME[-quick]; for all: its parent)")
    t.add_argument("--results", help="where full runs write their artifacts (default ./results)")
    t.add_argument("--jobs", type=int, default=_default_jobs(), help="parallel worker processes")
    t.add_argument("--quiet", action="store_true", help="no progress display")
    t.set_defaults(fn=_cmd_study)

    g = sub.add_parser("ledger", help="the claims ledger: every study's verdicts, recomputed from results/")
    g.add_argument("--results", default="results", help="results folder (default ./results)")
    g.add_argument("--markdown", action="store_true", help="print the Markdown table (the README's ledger)")
    g.add_argument("--recompute", action="store_true",
                   help="rewrite every verdicts.json and report.md from the committed tables")
    g.add_argument("--history", action="store_true",
                   help="list every study's earlier (superseded) runs, their verdicts and why they were replaced")
    g.set_defaults(fn=_cmd_ledger)
