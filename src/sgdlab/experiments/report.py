"""``sgdlab report DIR``: a self-contained Markdown + HTML report of a sweep or of one run, PNG figures beside them.

Contents: learning curves per group (median across seeds with the 25-75% band; test error and
training loss against epochs and against wall-clock time, as in the SRS paper's Figs. 2-3 and the
importance-sampling paper's loss-vs-time plots), a table of final metrics per group (median, mean,
95% bootstrap interval, n; shake-shake's Table 1 is such a table) and, for a baseline group, each
group's difference from it with its bootstrap interval (:mod:`sgdlab.experiments.aggregate`).
Studies append their own sections (verdicts, analyses) through ``sections``. Every report states the
settings that all its trials share ("Held fixed"), labels a run by its config ``name`` (else its
directory), and draws SRS-style samplers against *effective* epochs (steps x batch / N).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import ConfigError
from ..files import save_figure, write_text
from ..train.config import read_raw_config
from . import aggregate as agg

__all__ = ["Block", "Section", "curves_figure", "fmt", "render", "write_report", "metric_names", "monitor_figure",
           "monitor_sections"]

METRIC_NAMES = {
    "test_error": "test error", "test_acc": "test accuracy", "test_loss": "test loss",
    "train_eval_loss": "training loss (full train set)", "train_loss": "training loss (mini-batch)",
    "train_loss_auc": "mean training loss over the run", "best_test_acc": "best test accuracy",
    "wall_time": "training time (s)", "sharpness": "sharpness",
}
DEFAULT_METRICS = ("test_error", "test_loss", "train_eval_loss", "train_loss_auc", "wall_time")
# final metrics every run can have (aggregate.trial_metrics); studies add their own (e.g. sharpness)
FINAL_METRICS = ("test_error", "test_acc", "test_loss", "best_test_acc", "train_loss", "train_eval_loss",
                 "train_eval_acc", "train_loss_auc", "wall_time", "steps")
# samplers with true epochs; the others (srs, replacement, importance, ...) count effective epochs
_EPOCH_SAMPLERS = ("epoch",)
# keys that never describe the experiment (bookkeeping) and so are left out of "Held fixed"
_BOOKKEEPING = ("log.", "checkpoint.every", "eval.batch_size", "name", "notes", "seed", "device", "threads")


@dataclass
class Block:
    """One piece of a report: ``kind`` is ``h``, ``p``, ``table`` (``headers``, ``rows``) or ``img`` (``path``)."""

    kind: str
    text: str = ""
    headers: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    path: str = ""


@dataclass
class Section:
    """A titled list of blocks."""

    title: str
    blocks: list[Block] = field(default_factory=list)


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits (every number of a report goes through here); else text."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


_MD_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _md_text(text: str) -> str:
    """``text`` as one Markdown line: control characters and line breaks become spaces (so a label cannot
    start a heading or a list of its own), and ``<`` is written ``&lt;`` (no raw HTML)."""
    return _MD_BREAKS.sub(" ", str(text)).replace("<", "&lt;")


def _md_cell(v: Any) -> str:
    return _md_text(fmt(v)).replace("|", "\\|")


def render(title: str, sections: Sequence[Section]) -> tuple[str, str]:
    """``(markdown, html)`` of the sections; images are referenced by relative path."""
    md = [f"# {_md_text(title)}", ""]
    h = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
         ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
         "th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
         ".supported{color:#1a7f37;font-weight:bold}.contradicted{color:#c62828;font-weight:bold}"
         ".inconclusive{color:#8a6d00}</style>"), "</head><body>", f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        md += [f"## {_md_text(s.title)}", ""]
        h.append(f"<h2>{html.escape(s.title)}</h2>")
        for b in s.blocks:
            if b.kind == "h":
                md += [f"### {_md_text(b.text)}", ""]
                h.append(f"<h3>{html.escape(b.text)}</h3>")
            elif b.kind == "p":
                md += [_md_text(b.text), ""]
                h.append(f"<p>{html.escape(b.text)}</p>")
            elif b.kind == "table":
                md.append("| " + " | ".join(_md_cell(x) for x in b.headers) + " |")
                md.append("|" + "|".join("---" for _ in b.headers) + "|")
                for r in b.rows:
                    md.append("| " + " | ".join(_md_cell(x) for x in r) + " |")
                md.append("")
                h.append("<table><tr>" + "".join(f"<th>{html.escape(str(x))}</th>" for x in b.headers) + "</tr>")
                for r in b.rows:
                    cells = []
                    for x in r:
                        text = html.escape(fmt(x))
                        cls = f" class='{x}'" if x in ("supported", "contradicted", "inconclusive") else ""
                        cells.append(f"<td{cls}>{text}</td>")
                    h.append("<tr>" + "".join(cells) + "</tr>")
                h.append("</table>")
            elif b.kind == "img":
                md += [f"![{_md_text(b.text)}]({b.path})", ""]
                h.append(f"<figure><img src='{html.escape(b.path)}' alt='{html.escape(b.text)}'>"
                         f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
            else:
                raise ValueError(f"block kind must be h, p, table or img, got {b.kind!r}")
    h.append("</body></html>")
    return "\n".join(md) + "\n", "\n".join(h) + "\n"


def _groups(trials: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for t in trials:
        out.setdefault(t["label"], []).append(t)
    return out


def _log_axis(ax, values) -> None:
    """Log y axis with plain tick labels (0.02, 0.05, 0.1), minor ones labelled when it spans < 1 decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    label = FuncFormatter(lambda v, _pos: fmt(float(v), 2))
    ax.yaxis.set_major_formatter(label)
    finite = np.asarray([v for v in values if np.isfinite(v) and v > 0])
    narrow = finite.size > 0 and finite.max() / finite.min() < 10
    if narrow:
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_formatter(label)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _trial_config(t: dict) -> dict:
    if isinstance(t.get("config"), dict):
        return t["config"]
    path = Path(t.get("dir", "")) / "config.yaml"
    if path.is_file():
        return read_raw_config(path)  # ConfigError naming the file if it is damaged
    return {}


def epoch_label(trials: list[dict]) -> str:
    """``epochs``, ``effective epochs`` (samplers without epochs, e.g. SRS), or both when they are mixed."""
    names = {(_trial_config(t).get("sampler") or {}).get("name", "epoch") for t in trials}
    effective = sorted(n for n in names if n not in _EPOCH_SAMPLERS)
    if not effective:
        return "epochs"
    if len(effective) == len(names):
        return "effective epochs (steps x batch / N)"
    return f"epochs (effective epochs for {', '.join(effective)})"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    from ..train.config import _flatten as flatten  # one definition of the dotted-key view of a config

    return flatten(d, prefix)


def held_fixed(trials: list[dict]) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every setting that all trials share (what the comparison holds fixed)."""
    flats = [_flatten(_trial_config(t)) for t in trials]
    flats = [f for f in flats if f]
    if not flats:
        return []
    common = []
    for k, v in flats[0].items():
        if any(k == b or k.startswith(b) for b in _BOOKKEEPING if b.endswith(".")) or k in _BOOKKEEPING:
            continue
        if all(k in f and f[k] == v for f in flats[1:]):
            common.append((k, v))
    return common


def curves_figure(trials: list[dict], y: str, x: str, path: Path, *, title: str | None = None,
                  logy: bool = False) -> bool:
    """One panel of learning curves: per group the median across seeds and the 25-75% band.

    Returns False (and writes nothing) when no trial logged ``y``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    plotted: list[float] = []
    for label, ts in _groups([t for t in trials if t["status"] == "completed"]).items():
        c = agg.curve(ts, y, x)
        if c is None:
            continue
        grid, ys = c
        med = np.median(ys, axis=0)
        plotted.extend(np.asarray(ys).ravel().tolist())
        # a series of one point (a one-epoch run's test error) is invisible as a line: draw it as a marker
        line, = ax.plot(grid, med, label=f"{label} (n={len(ys)})" if len(ys) > 1 else label,
                        marker="o" if len(grid) == 1 else None)
        if len(ys) > 1:
            q1, q3 = np.quantile(ys, [0.25, 0.75], axis=0)
            ax.fill_between(grid, q1, q3, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    xlabel = {"epoch": epoch_label(trials), "time": "wall-clock time (s)", "step": "steps"}.get(x, x)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_NAMES.get(y, y))
    if logy:
        _log_axis(ax, plotted)
    ax.set_title(title or f"{METRIC_NAMES.get(y, y)} vs {xlabel.split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


def _parse_baseline(baseline: str | None, trials: list[dict]) -> str | None:
    """The label of the baseline group: ``label=<group label>`` or ``key=value`` matching one grid point."""
    if baseline is None:
        return None
    if "=" not in baseline:
        raise ConfigError(f"--baseline {baseline!r}: expected key=value (e.g. sampler.name=epoch) or label=NAME")
    key, value = baseline.split("=", 1)
    labels = list(_groups(trials))
    if key in ("label", "group"):
        if value not in labels:
            raise ConfigError(f"--baseline: no group labelled {value!r}; groups: {', '.join(labels)}")
        return value
    want = yaml.safe_load(value)
    hits = sorted({t["label"] for t in trials if key in t["overrides"] and t["overrides"][key] == want})
    if not hits:
        raise ConfigError(f"--baseline {baseline!r}: no group has {key}={value}; groups: {', '.join(labels)}")
    if len(hits) > 1:
        raise ConfigError(f"--baseline {baseline!r} matches several groups ({', '.join(hits)}); "
                          f"name one with label=NAME")
    return hits[0]


def metric_tables(trials: list[dict], metrics: Sequence[str], baseline: str | None = None) -> list[Block]:
    """Final-metric table per metric (median, mean, 95% CI, n) and, with a baseline, the differences."""
    blocks: list[Block] = []
    for m in metrics:
        vals = agg.group_values(trials, m)
        if not any(vals.values()):
            continue
        rows = []
        for label, by_seed in vals.items():
            if not by_seed:
                rows.append([label, "", "", "", 0])
                continue
            s = agg.summarize(list(by_seed.values()))
            rows.append([label, s.median, s.mean, f"[{fmt(s.ci_low)}, {fmt(s.ci_high)}]", s.n])
        blocks.append(Block("h", METRIC_NAMES.get(m, m)))
        blocks.append(Block("table", headers=["group", "median", "mean", "95% CI of mean", "n"], rows=rows))
        if baseline is not None and vals.get(baseline):
            rows = []
            for label, by_seed in vals.items():
                if label == baseline or not by_seed:
                    continue
                d = difference(vals, label, baseline)
                rows.append([label, d.estimate, f"[{fmt(d.ci_low)}, {fmt(d.ci_high)}]",
                             "paired" if d.paired else "unpaired", f"{d.n_treatment}/{d.n_baseline}"])
            if rows:
                blocks.append(Block("p", f"Difference from the baseline '{baseline}' (group minus baseline):"))
                blocks.append(Block("table", headers=["group", "difference of means", "95% CI", "bootstrap",
                                                      "n"], rows=rows))
    return blocks


def difference(vals: dict[str, dict[int, float]], treatment: str, baseline: str) -> agg.Difference:
    """Bootstrap difference of two groups' values, paired by seed when both ran the same seeds."""
    a, b = vals[treatment], vals[baseline]
    if not a or not b:
        raise ValueError(f"difference: group {treatment if not a else baseline!r} has no completed trials")
    if set(a) == set(b) and len(a) > 1:
        seeds = sorted(a)
        return agg.bootstrap_difference([a[s] for s in seeds], [b[s] for s in seeds], paired=True)
    return agg.bootstrap_difference(list(a.values()), list(b.values()))


def standard_sections(trials: list[dict], out: Path, *, baseline: str | None = None,
                      metrics: Sequence[str] = DEFAULT_METRICS,
                      figures: Sequence[tuple[str, str]] | None = None, prefix: str = "") -> list[Section]:
    """Learning-curve figures and final-metric tables for the trials (figures saved into ``out``)."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    groups = _groups(trials)
    fixed = held_fixed(trials)
    overview = Section("Overview", [
        Block("p", f"{len(trials)} trials in {len(groups)} groups; status: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "."),
        Block("table", headers=["group", "overrides", "seeds"],
              rows=[[g, ", ".join(f"{k}={agg_json(v)}" for k, v in ts[0]["overrides"].items()),
                     " ".join(str(t["seed"]) for t in ts)] for g, ts in groups.items()]),
    ] + ([Block("p", "Held fixed: every trial has these settings (the groups differ only in their overrides "
                     "and seeds)."),
          Block("table", headers=["setting", "value"], rows=[[k, agg_json(v)] for k, v in fixed])] if fixed else []))
    if figures is None:
        figures = [("test_error", "epoch"), ("train_loss", "epoch"), ("train_eval_loss", "epoch"),
                   ("test_error", "time"), ("train_loss", "time"), ("train_eval_loss", "time")]
    curves = Section("Learning curves", [Block("p", "Median across seeds; the band spans the 25th to 75th "
                                                    "percentile.")])
    for y, x in figures:
        name = f"{prefix}curve_{y}_vs_{x}.png"
        if curves_figure(trials, y, x, out / name, logy=y in ("train_loss", "train_eval_loss")):
            curves.blocks.append(Block("img", f"{METRIC_NAMES.get(y, y)} against {x}", path=name))
    finals = Section("Final metrics", [Block("p", "Per group over seeds: median, mean, 95% bootstrap interval "
                                                  "of the mean (expanded percentile), number of seeds.")]
                     + metric_tables(trials, metrics, baseline))
    return [overview, curves, finals]


# what each monitor's panel draws: (main key, dashed reference keys, band keys (lo, hi), extra lines, log y)
MONITOR_PANELS = {
    "sharpness": ("sharpness", ("sharpness_2_over_lr", "sharpness_threshold"), None, (), True,
                  "top Hessian eigenvalue (dashed: 2/lr; dotted: the momentum threshold)"),
    "noise_scale": ("noise_scale", (), ("noise_scale_lo", "noise_scale_hi"), (), True,
                    "gradient noise scale B_simple (band: interval over the recent checks)"),
    "importance": ("importance_variance_ratio", (), None, ("importance_tau_variance",), False,
                   "importance sampling: measured variance ratio (solid) and tau (dashed)"),
    "norms": ("norms_update_ratio", (), None, (), True, "update-to-weight ratio (whole model)"),
}


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def monitor_figure(trials: list[dict], kind: str, path: Path) -> bool:
    """One panel of a monitor (:mod:`sgdlab.monitors`) over training steps, one line per run.

    ``sharpness`` draws the top eigenvalue with its ``2 / lr`` line (dashed) and, when momentum moves it,
    the ``(2 + 2 beta) / lr`` threshold (dotted); ``noise_scale`` its smoothed value with the interval as
    a band; ``importance`` the measured variance ratio with tau (``B sum g^2``) dashed; ``norms`` the
    update-to-weight ratio. Returns False (and writes nothing) when no run logged the monitor.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main, refs, band, extra, logy, title = MONITOR_PANELS[kind]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    plotted: list[float] = []
    for t in trials:
        rows = t.get("rows") or []
        xs, ys = _series(rows, main)
        if not xs:
            continue
        line, = ax.plot(xs, ys, label=t["label"], marker="." if len(xs) < 40 else None)
        plotted += ys
        color = line.get_color()
        for style, key in zip(("--", ":"), refs):
            rx, ry = _series(rows, key)
            if rx and not (key == "sharpness_threshold" and _same(rows, key, "sharpness_2_over_lr")):
                ax.plot(rx, ry, style, color=color, linewidth=1)
                plotted += ry
        if band:  # where both ends are finite (an interval's upper end is unbounded while |G|^2 ~ 0)
            lo, hi = dict(zip(*_series(rows, band[0]))), dict(zip(*_series(rows, band[1])))
            both = sorted(set(lo) & set(hi))
            if both:
                ax.fill_between(both, [lo[k] for k in both], [hi[k] for k in both], color=color, alpha=0.2,
                                linewidth=0)
        for key in extra:
            ex, ey = _series(rows, key)
            if ex:
                ax.plot(ex, ey, "--", color=color, linewidth=1)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("steps")
    ax.set_ylabel(main)
    if logy and plotted and min(plotted) > 0:
        _log_axis(ax, plotted)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _same(rows: list[dict], a: str, b: str) -> bool:
    return all(r.get(a) == r.get(b) for r in rows if a in r)


def monitor_sections(trials: list[dict], out: Path, prefix: str = "") -> list[Section]:
    """A "Monitors" section with one :func:`monitor_figure` per monitor the runs logged (none: no section)."""
    sec = Section("Monitors", [Block("p", "Diagnostics logged during training (sgdlab.monitors), one line "
                                          "per run.")])
    for kind in MONITOR_PANELS:
        name = f"{prefix}monitor_{kind}.png"
        if monitor_figure([t for t in trials if t.get("rows")], kind, out / name):
            sec.blocks.append(Block("img", MONITOR_PANELS[kind][5], path=name))
    return [sec] if len(sec.blocks) > 1 else []


def agg_json(v: Any) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def write_report(sweep_dir, out_dir=None, *, baseline: str | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, title: str | None = None,
                 sections: Sequence[Section] = (), figures: Sequence[tuple[str, str]] | None = None,
                 lead: Sequence[Section] = (), strict_metrics: bool = False) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` (figures beside them) for the sweep in ``sweep_dir``.

    ``baseline`` is ``key=value`` (the group whose grid point sets ``key`` to ``value``) or
    ``label=NAME``; ``metrics`` the final metrics tabulated; ``figures`` the ``(y, x)`` learning-curve
    panels (default: test error, mini-batch and full training loss against epochs and time);
    ``lead``/``sections`` extra sections placed before/after the standard ones; ``strict_metrics``
    makes an unknown metric name an error listing the valid ones (as ``sgdlab report --metrics`` does).
    ``sweep_dir`` may also be a single run directory: its curves and final metrics.
    Returns ``{"markdown": path, "html": path}``.
    """
    sweep_dir = Path(sweep_dir)
    single = not (sweep_dir / "sweep.json").is_file() and (sweep_dir / "config.yaml").is_file()
    if single:
        trials = [run_trial(sweep_dir)]
    else:
        try:
            trials = agg.load_trials(sweep_dir)
        except FileNotFoundError:
            raise ConfigError(f"{sweep_dir}: neither a sweep directory (sweep.json) nor a run directory "
                              f"(config.yaml)") from None
    if strict_metrics:
        check_metrics(metrics, trials)
    out = Path(out_dir) if out_dir is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    base_label = _parse_baseline(baseline, trials)
    all_sections = list(lead) + standard_sections(trials, out, baseline=base_label, metrics=metrics,
                                                  figures=figures) + monitor_sections(trials, out) + list(sections)
    default_title = f"Run report: {trials[0]['label']}" if single else f"Sweep report: {sweep_dir.name}"
    md, h = render(title or default_title, all_sections)
    write_text(out / "report.md", md)  # a fresh file renamed into place: a planted link is replaced, not followed
    write_text(out / "report.html", h)
    return {"markdown": out / "report.md", "html": out / "report.html"}


def metric_names(trials: Sequence[dict] = ()) -> list[str]:
    """The final metrics a report can tabulate: the standard ones plus any the trials' analyses recorded."""
    names = list(FINAL_METRICS)
    for t in trials:
        for k in agg.trial_metrics(t) if t.get("status") == "completed" else ():
            if k not in names:
                names.append(k)
    return names


def check_metrics(metrics: Sequence[str], trials: Sequence[dict] = ()) -> None:
    """ConfigError naming the unknown metrics and listing the valid ones."""
    valid = metric_names(trials)
    unknown = [m for m in metrics if m not in valid]
    if unknown:
        raise ConfigError(f"--metrics: unknown metric{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")


def run_trial(run_dir) -> dict:
    """One run directory as a report trial: labelled by the config's ``name``, else the directory name.

    Its files are read as ``sgdlab resume`` and sweep reports read them: a damaged ``config.yaml``,
    ``summary.json`` or ``metrics.jsonl`` raises :class:`ConfigError` naming the file (and line).
    """
    run_dir = Path(run_dir)
    cfg = read_raw_config(run_dir / "config.yaml")
    summary = agg.read_json_object(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    rows = agg.read_metrics(run_dir)
    status = summary.get("status") or "interrupted"
    return {"name": run_dir.name, "label": cfg.get("name") or run_dir.resolve().name, "overrides": {},
            "seed": cfg.get("seed", 0), "dir": str(run_dir), "config": cfg, "summary": summary, "rows": rows,
            "status": status, "extra": {}}
