"""Running a study protocol (:mod:`sgdlab.experiments.protocol`) and computing its verdicts.

``sgdlab study NAME|path.yaml [--quick]``:

1. measurements the protocol asks for (e.g. the backward/forward cost ratio), saved and reused on resume;
2. with ``select``: a pilot sweep of the candidate arms on the pilot seeds, and the choice of each
   selection's best arm (recorded);
3. the final sweep of the arms the claims need on the final seeds, seed-major (every arm of one
   seed before the next seed), resumable;
4. per-trial diagnostics (sharpness, Hessian) and a table of per-trial final metrics (``trials.csv``;
   diverged trials are rows with ``status: nonfinite``);
5. the verdicts, computed from the tables alone by :func:`verdicts_from_tables`
   (:mod:`sgdlab.experiments.stats`), so a change of the statistics never needs a rerun:
   ``sgdlab ledger --recompute`` rewrites every ``results/*/verdicts.json`` from the committed tables.

A full run of a shipped study writes its artifacts to ``results/<name>/`` (protocol copy, ``trials.csv``,
``pilot.csv``, ``verdicts.json``, ``report.md``); the sweeps (checkpoints and logs) stay under
``--out`` (default ``runs/studies/<name>``). Quick mode runs every arm on the pilot seeds with the
protocol's quick settings and prints pilot estimates, labelled "pilot, not a verdict", beside the
committed verdict from ``results/``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from . import aggregate as agg
from . import stats as st
from .protocol import Claim, Protocol, load_protocol, shipped
from .sweep import Point, run_sweep

__all__ = ["build_table", "read_table", "run_all", "run_study", "select_arms", "verdicts_from_tables", "write_table"]

_SUB = re.compile(r"^\$\{(\w+)\}$")


# ---------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------

def measure_cost_ratio(proto: Protocol, repeats: int | None = None) -> dict:
    """Backward/forward time ratio ``r`` of the base model on one batch (one thread, median of repeats), and
    ``tau_th = (B + (1 + r) b) / ((1 + r) b)`` for presample ``B`` and batch ``b`` (Katharopoulos & Fleuret)."""
    import torch
    import torch.nn.functional as F

    from ..train.config import load_config
    from ..train.engine import build_dataset, build_model

    m = proto.measure
    raw = json.loads(json.dumps(proto.base))
    raw["log"] = dict(raw.get("log") or {}, progress=False)
    cfg = load_config(raw)
    ds = build_dataset(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, ds.num_classes, ds.input_shape).train()
    x, y = ds.train_x[: m.batch_size], ds.train_y[: m.batch_size]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fwd, both = [], []
    try:
        for i in range((repeats or m.repeats) + 3):
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x)
            t1 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if i >= 3:  # warm-up
                fwd.append(t1 - t0)
                both.append(t2 - t1)
    finally:
        torch.set_num_threads(threads)
    f, fb = float(np.median(fwd)), float(np.median(both))
    r = max(fb - f, 0.0) / f
    tau_th = (m.presample + (1 + r) * m.batch_size) / ((1 + r) * m.batch_size)
    return {"cost_ratio": r, "tau_th": tau_th, "forward_s": f, "forward_backward_s": fb,
            "batch_size": m.batch_size, "presample": m.presample}


def _substitute(value, values: dict):
    if isinstance(value, str):
        m = _SUB.match(value)
        if m:
            if m.group(1) not in values:
                raise ConfigError(f"${{{m.group(1)}}}: no such measurement (have: {', '.join(values) or 'none'})")
            return values[m.group(1)]
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# per-trial metrics
# ---------------------------------------------------------------------------------------------------

def _derived(proto: Protocol, trial: dict, measured: dict) -> dict[str, float]:
    rows = trial.get("rows") or []
    out: dict[str, float] = {}
    for name, m in proto.metrics.items():
        if m.kind == "forward_equivalents":
            r = float(measured.get("cost_ratio", 2.0))
            act = [row["is_active"] for row in rows if "is_active" in row]
            frac = float(np.mean(act)) if act else 0.0
            steps = float((trial.get("summary") or {}).get("steps", rows[-1]["step"] if rows else 0))
            out[name] = steps * ((1 + r) * m.batch + frac * (m.presample or 0))
            continue
        pts = [(float(row[m.x]), float(row[m.of])) for row in rows if m.of in row and m.x in row
               and isinstance(row[m.of], (int, float)) and math.isfinite(row[m.of])]
        if not pts:
            continue
        if m.kind == "mean":
            out[name] = float(np.mean([v for _, v in pts]))
        elif m.kind == "at_fraction":
            target = m.fraction * pts[-1][0]
            out[name] = next(v for x, v in pts if x >= target - 1e-9)
        elif m.kind == "first_below":
            hit = next((x for x, v in pts if v <= m.target), None)
            out[name] = hit if hit is not None else pts[-1][0]
            out[f"{name}_reached"] = 0.0 if hit is None else 1.0
    return out


def _ce(logits, y):
    import torch.nn.functional as F

    return F.cross_entropy(logits, y)


def run_analyses(proto: Protocol, trials: list[dict]) -> None:
    """Sharpness / top Hessian eigenvalue of each completed trial's final model on its first training
    examples, written once to ``RUN/analysis/study.json`` (skipped when present)."""
    if not proto.analyses:
        return
    import torch

    from .. import analysis, train

    for t in trials:
        if t["status"] != "completed":
            continue
        extra = dict(t.get("extra") or {})
        todo = [a for a in proto.analyses if a.kind not in extra]
        if not todo:
            continue
        _, model, ds = train.load_run(t["dir"])
        for a in todo:
            data = (ds.train_x[: a.samples], ds.train_y[: a.samples])
            torch.manual_seed(0)
            if a.kind == "sharpness":
                extra["sharpness"] = float(analysis.model_sharpness(model, _ce, data, eps=a.eps, max_iter=10, seed=0))
            else:
                extra["hessian_top"] = float(analysis.hessian_eigenvalues(model, _ce, data, k=1)[0])
        d = Path(t["dir"]) / "analysis"
        d.mkdir(exist_ok=True)
        (d / ".study.json.tmp").write_text(json.dumps(extra, indent=2))
        (d / ".study.json.tmp").replace(d / "study.json")
        t["extra"] = extra


def build_table(proto: Protocol, trials: list[dict], measured: dict) -> list[dict]:
    """One row per trial: ``arm``, ``seed``, ``status`` and the claims' and recorded metrics (blank when diverged)."""
    wanted: list[str] = []
    for name in [c.metric for c in proto.claims] + [s.metric for s in proto.select.values()] + list(proto.record):
        if name not in wanted:
            wanted.append(name)
    for name, m in proto.metrics.items():
        if m.kind == "first_below" and name in wanted:
            wanted.append(f"{name}_reached")
    rows = []
    for t in trials:
        row = {"arm": t["label"], "seed": int(t["seed"]), "status": t["status"]}
        vals = {}
        if t["status"] == "completed":
            vals = dict(agg.trial_metrics(t), **_derived(proto, t, measured))
        for name in wanted:
            v = vals.get(name)
            row[name] = "" if v is None else repr(float(v))
        rows.append(row)
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    """``rows`` as CSV (columns of the first row)."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    path.write_text(buf.getvalue())


def read_table(path: Path) -> list[dict]:
    """A table written by :func:`write_table` (seed as int, metric cells as float or None).

    A damaged table (cut short, a missing column, a cell that is not a number) raises
    :class:`ConfigError` ``path:line: reason``.
    """
    path = Path(path)
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            try:
                header = reader.fieldnames
                if header is None:
                    return out  # write_table of no rows writes an empty file
                missing = [c for c in ("arm", "seed", "status") if c not in header]
                if missing:
                    raise ConfigError(f"{path}:1: the header lacks the column(s) {', '.join(missing)}")
                for r in reader:
                    line = reader.line_num
                    if None in r:
                        raise ConfigError(f"{path}:{line}: more cells than the header's {len(header)}")
                    if None in r.values():
                        raise ConfigError(f"{path}:{line}: fewer cells than the header's {len(header)} "
                                          f"(the table is cut short?)")
                    try:
                        seed = int(r.pop("seed"))
                    except ValueError:
                        raise ConfigError(f"{path}:{line}: seed: not an integer") from None
                    row: dict = {"arm": r.pop("arm"), "seed": seed, "status": r.pop("status")}
                    for k, v in r.items():
                        try:
                            row[k] = float(v) if v != "" else None
                        except ValueError:
                            raise ConfigError(f"{path}:{line}: {k}: not a number ({v[:40]!r})") from None
                    out.append(row)
            except csv.Error as e:
                raise ConfigError(f"{path}:{reader.line_num}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (offset {e.start})") from None
    return out


# ---------------------------------------------------------------------------------------------------
# verdicts from tables
# ---------------------------------------------------------------------------------------------------

def _per_arm(proto: Protocol, table: list[dict], metric: str, log: bool = False
             ) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """``{arm: {seed: value}}`` with diverged trials at the protocol's worst value, and diverged counts."""
    if log:
        vals, diverged = _per_arm(proto, table, metric)
        bad = [(a, s) for a, d in vals.items() for s, v in d.items() if not v > 0]
        if bad:
            raise ConfigError(f"{metric}: a log contrast needs positive values; arm {bad[0][0]!r} seed {bad[0][1]}")
        return {a: {s: math.log(v) for s, v in d.items()} for a, d in vals.items()}, diverged
    vals: dict[str, dict[int, float]] = {}
    diverged: dict[str, int] = {}
    for r in table:
        arm = vals.setdefault(r["arm"], {})
        if r["status"] == "completed" and r.get(metric) is not None:
            arm[r["seed"]] = float(r[metric])
        elif r["status"] == "nonfinite":
            arm[r["seed"]] = proto.worst_value(metric)
            diverged[r["arm"]] = diverged.get(r["arm"], 0) + 1
        elif r["status"] == "completed":
            raise ConfigError(f"trials table: arm {r['arm']!r} seed {r['seed']} has no value of {metric!r}")
        else:
            raise ConfigError(f"study incomplete: arm {r['arm']!r} seed {r['seed']} is {r['status']}; "
                              f"rerun the study to resume it")
    return vals, diverged


def select_arms(proto: Protocol, pilot: list[dict], quick: bool = False) -> dict[str, dict]:
    """Each selection's chosen arm: the best mean of its metric over the pilot seeds (ties: first listed).
    In quick mode a selection without candidates among the arms run is left out."""
    chosen = {}
    for name, sel in proto.select.items():
        vals, _ = _per_arm(proto, [r for r in pilot if r["arm"] in sel.candidates], sel.metric)
        means = {a: float(np.mean(list(vals[a].values()))) for a in sel.candidates if vals.get(a)}
        if not means and quick:
            continue
        if not means:
            raise ConfigError(f"select.{name}: no pilot results")
        sign = 1 if sel.direction == "higher" else -1
        best = max(means, key=lambda a: sign * means[a])
        chosen[name] = {"arm": best, "metric": sel.metric, "pilot_means": means}
    return chosen


def _optimum_slope(claim: Claim, arms: dict[str, dict], vals: dict[str, dict[int, float]]) -> tuple[list[int], np.ndarray]:
    """Per seed: log2 optimum of ``x`` per factor cell, regressed on log2 of the factors; the ``slope_of`` coefficient."""
    seeds = sorted(next(iter(vals.values())))
    cells: dict[tuple, list[tuple[float, str]]] = {}
    for label, over in arms.items():
        if label not in vals or claim.x not in over:
            continue
        key = tuple(float(over[f]) for f in claim.factors)
        cells.setdefault(key, []).append((float(over[claim.x]), label))
    out = []
    for s in seeds:
        ys, design = [], []
        for key, pts in cells.items():
            pts = sorted(pts)
            lx = np.log2([p[0] for p in pts])
            v = np.array([vals[lab][s] for _, lab in pts]) * (1 if claim.maximize else -1)
            a, b, _ = np.polyfit(lx, v, 2) if len(pts) >= 3 else (0.0, 0.0, 0.0)
            if a < 0 and lx[0] <= -b / (2 * a) <= lx[-1]:
                opt = -b / (2 * a)
            else:
                opt = lx[int(np.argmax(v))]
            ys.append(opt)
            design.append([1.0] + [math.log2(k) for k in key])
        coef, *_ = np.linalg.lstsq(np.array(design), np.array(ys), rcond=None)
        out.append(coef[1 + claim.factors.index(claim.slope_of)])
    return seeds, np.array(out)


def _claim_values(proto: Protocol, claim: Claim, table: list[dict], chosen: dict) -> tuple[list[int], np.ndarray, int]:
    vals, diverged = _per_arm(proto, table, claim.metric, claim.log)
    if claim.kind == "optimum_slope":
        seeds, v = _optimum_slope(claim, dict(proto.arm_list()), vals)
        return seeds, v, sum(diverged.values())
    coef = {}
    for arm, c in claim.contrast.items():
        coef[chosen[arm[1:]]["arm"] if arm.startswith("@") else arm] = c
    seeds, v = st.paired_values(vals, coef)
    return seeds, v, sum(diverged.get(a, 0) for a in coef)


def verdicts_from_tables(proto: Protocol, table: list[dict], pilot: list[dict] | None = None, *,
                         quick: bool = False) -> dict:
    """Every claim's estimate, 95% interval, raw p, seeds and diverged count, before multiplicity
    (``holm`` fills the adjusted p, decision interval and outcome); plus the pilot selections."""
    chosen = select_arms(proto, pilot or table, quick) if proto.select else {}
    present = {r["arm"] for r in table}
    claims = []
    for c in proto.claims:
        named = [chosen.get(a[1:], {}).get("arm") if a.startswith("@") else a for a in c.contrast]
        if quick and c.kind == "contrast" and not set(named) <= present:
            continue  # quick mode may run a subset of the arms
        seeds, v, ndiv = _claim_values(proto, c, table, chosen)
        ti = st.t_interval(v)
        arms = {(chosen[a[1:]]["arm"] if a.startswith("@") else a): k for a, k in c.contrast.items()}
        unreached, counted = _unreached(proto, c.metric, table, set(arms) if c.kind == "contrast" else None)
        claims.append({"study": proto.name, "id": c.id, "claim": c.text, "metric": c.metric,
                       "direction": c.direction, "sesoi": c.sesoi, "margin": c.margin, "log": c.log,
                       "primary": c.primary,
                       "contrast": arms, "seeds": seeds, "n": ti.n, "diverged": ndiv,
                       "estimate": ti.estimate, "ci_low": ti.low, "ci_high": ti.high, "sd": ti.sd, "p": ti.p,
                       "ladder": c.ladder, "at": c.at, "values": v.tolist(),
                       "unreached": unreached, "trials": counted,
                       "regime": proto.regime_that_ran(quick)})  # the regime that ran (quick mode says so)
    return {"claims": claims, "selection": chosen}


def _unreached(proto: Protocol, metric: str, table: list[dict], arms: set[str] | None) -> tuple[int, int]:
    """For a ``first_below`` metric: how many completed trials of ``arms`` (all when None) never reached
    the target (their value is the budget), and how many completed trials there are; (0, 0) otherwise."""
    m = proto.metrics.get(metric)
    if m is None or m.kind != "first_below":
        return 0, 0
    rows = [r for r in table if r["status"] == "completed" and (arms is None or r["arm"] in arms)]
    return sum(1 for r in rows if r.get(f"{metric}_reached") == 0.0), len(rows)


def finish(protos: dict[str, Protocol], results: dict[str, dict], alpha: float = 0.05) -> None:
    """Holm across all primary claims of ``results`` (``{study: verdicts_from_tables(...)}``), then each
    claim's decision interval, outcome, power note and text; ladders get their largest supported rung."""
    primary = [c for r in results.values() for c in r["claims"] if c["primary"]]
    raw = [c["p"] for c in primary]
    for c, adj, lev in zip(primary, st.holm(raw), st.holm_levels(raw, alpha)):
        c["p_holm"], c["decision_level"] = adj, lev
    for name, r in results.items():
        proto = protos[name]
        for c in r["claims"]:
            level = c.get("decision_level", 1 - alpha)
            if not c["primary"]:
                c["p_holm"], c["decision_level"] = None, level
            ti = st.t_interval(c["values"], level)
            d = st.decide(ti.low, ti.high, 1 if c["direction"] == "higher" else -1, c["sesoi"], margin=c["margin"],
                          sd=ti.sd, n=ti.n, alpha=1 - level)
            unreached, counted = c.get("unreached", 0), c.get("trials", 0)
            if counted and unreached == counted:
                # every value is the budget: the contrast compares budgets, so it can decide nothing
                d = st.Decision(st.INCONCLUSIVE, "no trial reached the target",
                                note="every trial stopped at the budget, so the contrast compares budgets, not speeds")
            elif unreached:
                d = dataclasses.replace(d, note="; ".join(filter(None, [
                    d.note, f"{unreached} of {counted} trials never reached the target (counted at the budget)"])))
            c.update(decision_low=ti.low, decision_high=ti.high, outcome=d.outcome, qualifier=d.qualifier,
                     verdict=d.label, seeds_needed=d.seeds_needed, note=d.note)
            c["text"] = (f"In regime {c.get('regime') or proto.regime.rstrip('. ')}: {c['claim']}: {d.label} (estimate {c['estimate']:+.4g}, "
                         f"95% CI [{c['ci_low']:+.4g}, {c['ci_high']:+.4g}], SESOI {c['sesoi']:g}, {c['n']} seeds"
                         + (f", {c['diverged']} diverged trials counted at the worst value" if c["diverged"] else "")
                         + (f", {unreached} of {counted} trials never reached the target" if unreached else "")
                         + ").")
        ladders: dict[str, list] = {}
        for c in r["claims"]:
            if c["ladder"]:
                ladders.setdefault(c["ladder"], []).append(c)
        r["ladders"] = {}
        for lad, cs in ladders.items():
            best = None
            for c in sorted(cs, key=lambda c: c["at"]):
                if c["outcome"] != st.SUPPORTED:
                    break
                best = c["at"]
            r["ladders"][lad] = best


# ---------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------

def _commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # the code and protocols that ran; results/ and docs changing meanwhile do not make a run "modified"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/src", ":/studies", ":/pyproject.toml"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+modified" if dirty else "")) if sha else "unknown"


def _sweep(proto: Protocol, arms: list[tuple[str, dict]], seeds: list[int], out: Path, measured: dict, *,
           jobs: int, progress: bool, extra: dict) -> list[dict]:
    base = _substitute(proto.base, measured)
    points = [Point(_substitute(over, measured), label) for label, over in arms]
    def analyse(trial, result: dict) -> None:  # while the workers train the next trials
        if proto.analyses and result.get("status") == "completed":
            d = out / trial.name
            done = d / "analysis" / "study.json"
            run_analyses(proto, [{"dir": str(d), "status": "completed",
                                  "extra": json.loads(done.read_text()) if done.is_file() else {}}])

    run_sweep(base, points, seeds, out, jobs=jobs, progress=progress, extra_manifest=extra, seed_major=True,
              seed_keys=proto.seed_keys, on_result=analyse)
    trials = agg.load_trials(out)
    failed = [t["name"] for t in trials if t["status"] == "failed"]
    if failed:
        raise ConfigError(f"{out}: {len(failed)} trials failed (see sweep.json), e.g. {failed[0]}")
    run_analyses(proto, trials)
    return trials


def _figures(proto: Protocol, sweep_dir: Path, art: Path) -> None:
    """Learning curves of the final sweep (the sweep report's PNGs), copied to ``art/figures``."""
    import shutil

    from .report import write_report

    write_report(sweep_dir, title=f"Study '{proto.name}': sweep report", metrics=("test_error", "wall_time"))
    figs = art / "figures"
    figs.mkdir(exist_ok=True)
    for png in sorted(sweep_dir.glob("*.png")):
        shutil.copy2(png, figs / png.name)


def default_results_dir() -> Path:
    """``results/`` of the working directory."""
    return Path("results")


def run_study(name_or_path, *, quick: bool = False, out=None, results=None, jobs: int = 1,
              progress: bool = True) -> dict:
    """Run a protocol (shipped name or path); return ``{"name", "verdicts", "out", "artifacts", "seconds"}``.

    Full mode writes the artifacts to ``results/<name>/`` (or ``results``) and recomputes the ledger's
    Holm adjustment over every study there; quick mode writes them beside its sweep.
    """
    proto, text, sha = load_protocol(name_or_path)
    out = Path(out) if out is not None else Path("runs/studies") / (proto.name + ("-quick" if quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    commit = _commit()  # the code that runs; checked again at the end
    measured: dict = {}
    if proto.measure is not None:
        mpath = out / "measurements.json"
        if mpath.is_file():
            measured = json.loads(mpath.read_text())
        else:
            measured = measure_cost_ratio(proto, repeats=5 if quick else None)
            mpath.write_text(json.dumps(measured, indent=2))
    extra = {"study": proto.name, "quick": quick, "protocol_sha256": sha}
    pilot_rows: list[dict] = []
    if quick:
        seeds = proto.quick.seeds or proto.seeds.pilot
        if not seeds:
            raise ConfigError(f"{proto.name}: quick mode needs quick.seeds or seeds.pilot")
        if len(seeds) < 2:
            raise ConfigError(f"{proto.name}: quick mode needs at least 2 seeds")
        trials = _sweep(proto, proto.arm_list(quick=True), seeds, out / "trials", measured, jobs=jobs,
                        progress=progress, extra=extra)
        rows = build_table(proto, trials, measured)
    else:
        arms = proto.arm_list()
        candidates = {a for s in proto.select.values() for a in s.candidates}
        if proto.select:
            ptrials = _sweep(proto, [a for a in arms if a[0] in candidates], proto.seeds.pilot, out / "pilot",
                             measured, jobs=jobs, progress=progress, extra=dict(extra, phase="pilot"))
            pilot_rows = build_table(proto, ptrials, measured)
            keep = {c["arm"] for c in select_arms(proto, pilot_rows).values()}
            keep |= {a for c in proto.claims for a in c.contrast if not a.startswith("@")}
            arms = [a for a in arms if a[0] not in candidates or a[0] in keep]
        trials = _sweep(proto, arms, proto.seeds.final, out / "final", measured, jobs=jobs, progress=progress,
                        extra=dict(extra, phase="final"))
        rows = build_table(proto, trials, measured)
    seconds = time.perf_counter() - t0
    art = out if quick else (Path(results) if results is not None else default_results_dir()) / proto.name
    art.mkdir(parents=True, exist_ok=True)
    if not quick:
        _figures(proto, out / "final", art)
    (art / "protocol.yaml").write_text(text)
    write_table(rows, art / "trials.csv")
    if pilot_rows:
        write_table(pilot_rows, art / "pilot.csv")
    context = {"study": proto.name, "quick": quick, "protocol_sha256": sha, "commit": commit,
               "seconds": seconds, "measurements": measured, "sweeps": out.name}
    end = _commit()
    if end != commit:  # the checkout changed while the study ran: say so, the start is what ran
        context["commit_at_end"] = end
    (art / "context.json").write_text(json.dumps(context, indent=2))
    from .ledger import refresh

    if quick:
        res = refresh(art.parent, only=[art])
    else:
        res = refresh(art.parent)
    return {"name": proto.name, "verdicts": res[proto.name]["claims"], "out": out, "artifacts": art,
            "seconds": seconds, "protocol": proto}


def run_all(*, quick: bool = False, out=None, results=None, jobs: int = 1, progress: bool = True,
            only: Sequence[str] | None = None, console=None) -> list[dict]:
    """Run every shipped study (or those in ``only``), cheapest first; ``out`` is the parent of each study's folder."""
    root = Path(out) if out is not None else Path("runs/studies")
    done = []
    for name in (only or shipped()):
        if console is not None:
            console.rule(f"study {name}")
        sub = root / (Path(name).stem + ("-quick" if quick else ""))
        done.append(run_study(name, quick=quick, out=sub, results=results, jobs=jobs, progress=progress))
    return done
