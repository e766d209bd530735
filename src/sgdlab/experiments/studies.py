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

import json
import math
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..files import write_text
from ..train.guard import FolderLock
from . import aggregate as agg
from .protocol import Protocol, load_protocol, shipped
from .sweep import Point, run_sweep
from .verdicts import finish, read_table, select_arms, verdicts_from_tables, write_table

# finish, read_table, select_arms, verdicts_from_tables and write_table live in .verdicts (shared with the
# ledger, which imports nothing from here) and stay importable from this module
_REEXPORTED = (finish, read_table, select_arms, verdicts_from_tables, write_table)

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
            if m.missing is not None and rows:
                out[name] = float(m.missing)
            continue
        if m.kind == "mean":
            start = m.after * pts[-1][0]
            out[name] = float(np.mean([v for x, v in pts if x >= start - 1e-9]))
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


def adaptive_sharpness(model, data, rho: float) -> float:
    """Adaptive sharpness of ``model`` on ``data`` (Kwon et al., "ASAM", ICML 2021, eq. 6 with ``T_w = |w|``):
    ``L(w + rho T^2 g / ||T g||) - L(w)``, the loss rise of one ascent step of radius ``rho`` in the norm
    scaled elementwise by the weights, so rescaling a ReLU layer by ``c`` and the next by ``1/c`` leaves it
    unchanged (Keskar's box measure is not)."""
    import torch

    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    loss = _ce(model(x), y)
    grads = torch.autograd.grad(loss, params)
    tg = [p.detach().abs() * g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((v * v).sum() for v in tg))
    if not float(norm) > 0:
        return 0.0
    steps = [rho * p.detach().abs() * v / norm for p, v in zip(params, tg)]
    with torch.no_grad():
        for p, s in zip(params, steps):
            p.add_(s)
        up = _ce(model(x), y)
        for p, s in zip(params, steps):
            p.sub_(s)
    return float(up - loss.detach())


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
        cfg, model, ds = train.load_run(t["dir"])
        for a in todo:
            data = (ds.train_x[: a.samples], ds.train_y[: a.samples])
            torch.manual_seed(0)
            if a.kind == "sharpness":
                extra["sharpness"] = float(analysis.model_sharpness(model, _ce, data, eps=a.eps, max_iter=10, seed=0))
            elif a.kind == "adaptive_sharpness":
                extra["adaptive_sharpness"] = adaptive_sharpness(model, data, a.eps)
            else:
                extra["hessian_top"] = float(analysis.hessian_eigenvalues(model, _ce, data, k=1)[0])
                extra["eos_ratio"] = extra["hessian_top"] * float(cfg.optim.lr) / 2
        d = Path(t["dir"]) / "analysis"
        d.mkdir(exist_ok=True)
        write_text(d / "study.json", json.dumps(extra, indent=2))
        t["extra"] = extra


def build_table(proto: Protocol, trials: list[dict], measured: dict) -> list[dict]:
    """One row per trial: ``arm``, ``seed``, ``status`` and the claims' and recorded metrics (blank when diverged)."""
    wanted: list[str] = []
    guards = [c.matched.metric for c in proto.claims if c.matched] + [c.floor.early for c in proto.claims if c.floor]
    for name in ([c.metric for c in proto.claims] + [s.metric for s in proto.select.values()] + list(proto.record)
                 + guards):
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


def _climb_ladders(proto: Protocol, pilot_rows: list[dict], out: Path, measured: dict, *, jobs: int,
                   progress: bool, extra: dict) -> list[tuple[str, dict]]:
    """Extend each laddered selection's grid on the pilot seeds while its best arm is the first or last
    rung (:class:`~sgdlab.experiments.protocol.Ladder`); the rows are appended to ``pilot_rows``.
    Returns the rungs run, as arms (the chosen one runs on the final seeds)."""
    added: list[tuple[str, dict]] = []
    for name, sel in proto.select.items():
        if sel.ladder is None:
            continue
        rungs = {"low": 0, "high": 0}
        while True:
            c = select_arms(proto, pilot_rows)[name]
            edge = c["edge"]
            if edge is None or rungs[edge] >= sel.ladder.max_rungs:
                break
            rungs[edge] += 1
            arm = proto.ladder_arm(name, edge, rungs[edge])
            trials = _sweep(proto, [arm], proto.seeds.pilot, out / f"pilot-ladder-{name}-{edge}{rungs[edge]}",
                            measured, jobs=jobs,
                            progress=progress, extra=extra)
            new = [r for r in build_table(proto, trials, measured) if r["arm"] == arm[0]]
            pilot_rows.extend(new)
            added.append(arm)
            if all(r["status"] == "nonfinite" for r in new):
                break  # the extreme diverged: the optimum lies inside the grid
    return added


def default_results_dir() -> Path:
    """``results/`` of the working directory."""
    return Path("results")


def run_study(name_or_path, *, quick: bool = False, out=None, results=None, jobs: int = 1,
              progress: bool = True) -> dict:
    """Run a protocol (shipped name or path); return ``{"name", "verdicts", "out", "artifacts", "seconds"}``.

    Full mode writes the artifacts to ``results/<name>/`` (or ``results``) and recomputes the ledger's
    Holm adjustment over every study there; quick mode writes them beside its sweep. A full study locks
    ``results/<name>/`` from start to end, so a second study of that name into the same results folder
    (from another ``--out``) stops at once instead of overwriting the first one's artifacts.
    """
    if quick:
        return _run_study(name_or_path, quick=quick, out=out, results=results, jobs=jobs, progress=progress)
    name = load_protocol(name_or_path)[0].name
    art = (Path(results) if results is not None else default_results_dir()) / name
    art.mkdir(parents=True, exist_ok=True)
    with FolderLock(art, "study"):
        return _run_study(name_or_path, quick=quick, out=out, results=results, jobs=jobs, progress=progress)


def _run_study(name_or_path, *, quick: bool, out, results, jobs: int, progress: bool) -> dict:
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
            write_text(mpath, json.dumps(measured, indent=2))
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
            rungs = _climb_ladders(proto, pilot_rows, out, measured, jobs=jobs, progress=progress,
                                   extra=dict(extra, phase="pilot-ladder"))
            arms += rungs
            candidates |= {a[0] for a in rungs}
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
        from .ledger import archive

        archive(art, f"replaced by a new full run (protocol v{proto.version}, hash {sha[:12]}, commit {commit[:12]})",
                replaced_by=commit)
        _figures(proto, out / "final", art)
    write_text(art / "protocol.yaml", text)
    write_table(rows, art / "trials.csv")
    if pilot_rows:
        write_table(pilot_rows, art / "pilot.csv")
    context = {"study": proto.name, "quick": quick, "protocol_sha256": sha, "commit": commit,
               "seconds": seconds, "measurements": measured, "sweeps": out.name}
    end = _commit()
    if end != commit:  # the checkout changed while the study ran: say so, the start is what ran
        context["commit_at_end"] = end
    write_text(art / "context.json", json.dumps(context, indent=2))
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
