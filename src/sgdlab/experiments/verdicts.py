"""A study's verdicts from its per-trial tables, with the guards that keep a verdict honest.

Both the study runner (:mod:`sgdlab.experiments.studies`) and the ledger
(:mod:`sgdlab.experiments.ledger`) import this module; it imports neither. It reads and validates the
tables (``trials.csv``, ``pilot.csv``), makes the pilot selections, reduces every claim to one value per
seed, and :func:`finish` turns those values into outcomes with one Holm adjustment
(:mod:`sgdlab.experiments.stats`). The guards, each documented in ``docs/studies.md``:

- a selection at the first or last point of an ordered candidate grid, or a fitted optimum at the grid's
  edge, is *not bracketed*: its claims are inconclusive (a protocol ``ladder`` extends the grid instead);
- a non-finite pilot mean never wins a selection;
- ``predicted``: the verdict is about the registered value (two one-sided tests against
  ``predicted +- sesoi``; Schuirmann 1987, Lakens 2017), the sign test reported beside it;
- ``margin``: non-inferiority decided by the one-sided p against ``-margin`` (Holm uses that p);
- ``matched``: the arms must agree on the matched quantity, else the study refuses to decide;
- floor: a metric that stopped improving well before its measurement point is flagged;
- collapsed trials (accuracy within 5 points of chance) are counted beside diverged ones;
- every table is validated on read: unique (arm, seed), registered arms and seeds, finite values within
  their metric's range; a damaged one is a one-line :class:`~sgdlab.errors.ConfigError` naming file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

import numpy as np
from scipy import stats as sps

from ..errors import ConfigError
from ..files import write_text
from . import stats as st
from .protocol import Claim, Protocol

__all__ = ["finish", "metric_range", "read_table", "select_arms", "validate_table", "verdicts_from_tables",
           "write_table"]

STATUSES = ("completed", "nonfinite", "interrupted", "missing", "failed")
COLLAPSE_BAND = 0.05  # a completed trial within 5 accuracy points of chance counts as collapsed


def write_table(rows: list[dict], path: Path) -> None:
    """``rows`` as CSV (columns of the first row)."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    write_text(path, buf.getvalue())


def read_table(path: Path, proto: Protocol | None = None, seeds: list[int] | None = None) -> list[dict]:
    """A table written by :func:`write_table` (seed as int, metric cells as float or None).

    A damaged table (cut short, a missing column, a cell that is not a number) raises
    :class:`ConfigError` ``path:line: reason``; with ``proto`` the rows are also checked by
    :func:`validate_table` against the protocol and its registered ``seeds``.
    """
    path = Path(path)
    out: list[dict] = []
    lines: list[int] = []
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
                        if row[k] is not None and not math.isfinite(row[k]):
                            raise ConfigError(f"{path}:{line}: {k}: {row[k]} is not finite (a diverged trial is status "
                                              f"nonfinite, blank cells)")
                    out.append(row)
                    lines.append(line)
            except csv.Error as e:
                raise ConfigError(f"{path}:{reader.line_num}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (offset {e.start})") from None
    if proto is not None:
        validate_table(proto, out, path, seeds, lines=lines)
    return out


def metric_range(proto: Protocol, name: str) -> tuple[float, float] | None:
    """The values ``name`` can take, ``(low, high)``, or ``None`` when only finiteness is known:
    accuracies, errors, fractions and ``*_reached`` flags lie in [0, 1]; losses, times, steps, counts and
    Keskar sharpness are non-negative; a protocol metric inherits the range of the quantity it reads."""
    m = proto.metrics.get(name)
    if m is not None:
        if m.kind in ("first_below", "forward_equivalents"):
            return (0.0, math.inf)
        return metric_range(proto, m.of) if m.of else None
    if name.endswith(("_reached", "_acc")) or name in ("test_error", "is_fraction", "is_active"):
        return (0.0, 1.0)
    if "loss" in name or name in ("wall_time", "steps", "sharpness", "forward_equivalents"):
        return (0.0, math.inf)
    return None


def validate_table(proto: Protocol, rows: list[dict], path: Path, seeds: list[int] | None, *,
                   lines: list[int] | None = None) -> None:
    """Refuse a damaged table (one line naming ``path`` and the row's line): a repeated (arm, seed), an arm
    the protocol does not register, a seed outside ``seeds`` (the registered seeds of this table), an
    unknown status, a non-finite value or one outside its metric's range (:func:`metric_range`).
    ``lines`` are the rows' lines in the file (default: one row per line after the header)."""
    labels = {lab for lab, _ in proto.arm_list()}
    ladder_prefixes = tuple(f"{c} [ladder " for s in proto.select.values() if s.ladder for c in s.candidates)
    first: dict[tuple[str, int], int] = {}
    for i, r in enumerate(rows):
        line = lines[i] if lines is not None else i + 2
        where = f"{path}:{line}"
        key = (r["arm"], r["seed"])
        if key in first:
            raise ConfigError(f"{where}: arm {r['arm']!r} seed {r['seed']} repeats line {first[key]}")
        first[key] = line
        if r["arm"] not in labels and not (ladder_prefixes and r["arm"].startswith(ladder_prefixes)):
            raise ConfigError(f"{where}: arm {r['arm']!r} is not an arm of protocol {proto.name!r}")
        if seeds is not None and r["seed"] not in seeds:
            raise ConfigError(f"{where}: seed {r['seed']} is not one of the protocol's seeds for this table {seeds}")
        if r["status"] not in STATUSES:
            raise ConfigError(f"{where}: status {r['status']!r} is not one of {', '.join(STATUSES)}")
        for k, v in r.items():
            if k in ("arm", "seed", "status") or v is None:
                continue
            if not math.isfinite(v):
                raise ConfigError(f"{where}: {k}: {v} is not finite (a diverged trial is status nonfinite, blank cells)")
            rng = metric_range(proto, k)
            if rng is not None and not rng[0] <= v <= rng[1]:
                raise ConfigError(f"{where}: {k}: {v:g} lies outside its range [{rng[0]:g}, {rng[1]:g}]")


# ---------------------------------------------------------------------------------------------------
# per-seed values
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


def ladder_sequence(proto: Protocol, name: str, arms_run: set[str]) -> list[str]:
    """The ordered candidates of selection ``name`` with the ladder rungs that ran, low rungs first."""
    sel = proto.select[name]
    seq = list(sel.candidates)
    if sel.ladder is None:
        return seq
    for edge in ("low", "high"):
        for k in range(1, sel.ladder.max_rungs + 1):
            label = proto.ladder_arm(name, edge, k)[0]
            if label not in arms_run:
                break
            seq.insert(0, label) if edge == "low" else seq.append(label)
    return seq


def _finite_mean(values) -> float:
    a = np.asarray(list(values), dtype=float)
    return float(a.mean()) if a.size and np.all(np.isfinite(a)) else math.nan


def select_arms(proto: Protocol, pilot: list[dict], quick: bool = False) -> dict[str, dict]:
    """Each selection's chosen arm: the best mean of its metric over the pilot seeds (ties: first listed).

    A candidate whose mean is not finite (a diverged trial of a metric without a worst value) never
    wins. For ordered candidates the choice records ``edge`` ("low"/"high" when it, or a candidate tied
    with it, is the first or last point of the grid, ladder rungs included) and ``bracketed``. In quick mode a selection without
    candidates among the arms run is left out."""
    chosen = {}
    run = {r["arm"] for r in pilot}
    for name, sel in proto.select.items():
        seq = ladder_sequence(proto, name, run)
        vals, div = _per_arm(proto, [r for r in pilot if r["arm"] in seq], sel.metric)
        means = {a: _finite_mean(vals[a].values()) for a in seq if vals.get(a)}
        if not means and quick:
            continue
        finite = {a: m for a, m in means.items() if math.isfinite(m)}
        if not finite:
            raise ConfigError(f"select.{name}: no finite pilot result among {len(means)} candidates")
        sign = 1 if sel.direction == "higher" else -1
        best = max(finite, key=lambda a: sign * finite[a])
        ran = [a for a in seq if a in means]
        edge = None
        if sel.is_ordered and len(ran) > 2:
            # a candidate tied with the best counts too: a tie with the grid's end does not bracket the optimum
            tied = [a for a in ran if a in finite and finite[a] == finite[best]]
            edge = "low" if ran[0] in tied else "high" if ran[-1] in tied else None
        chosen[name] = {"arm": best, "metric": sel.metric, "pilot_means": means, "ordered": sel.is_ordered,
                        "edge": edge, "bracketed": edge is None,
                        "diverged": {a: n for a, n in div.items() if n}}
    return chosen


def _optimum_slope(claim: Claim, arms: dict[str, dict], vals: dict[str, dict[int, float]]
                   ) -> tuple[list[int], np.ndarray, int, int]:
    """Per seed: log2 optimum of ``x`` per factor cell, regressed on log2 of the factors; the ``slope_of``
    coefficient. Also the number of fits whose optimum lies at the grid's edge, and of fits."""
    seeds = sorted(next(iter(vals.values())))
    cells: dict[tuple, list[tuple[float, str]]] = {}
    for label, over in arms.items():
        if label not in vals or claim.x not in over:
            continue
        key = tuple(float(over[f]) for f in claim.factors)
        cells.setdefault(key, []).append((float(over[claim.x]), label))
    out, edges, fits = [], 0, 0
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
            fits += 1
            edges += bool(np.isclose(opt, lx[0]) or np.isclose(opt, lx[-1]))
            ys.append(opt)
            design.append([1.0] + [math.log2(k) for k in key])
        coef, *_ = np.linalg.lstsq(np.array(design), np.array(ys), rcond=None)
        out.append(coef[1 + claim.factors.index(claim.slope_of)])
    return seeds, np.array(out), edges, fits


def _arms_of(claim: Claim, chosen: dict) -> dict[str, float]:
    return {(chosen[a[1:]]["arm"] if a.startswith("@") else a): k for a, k in claim.contrast.items()}


def _mean_difference(proto: Protocol, table: list[dict], metric: str, log: bool, arms: dict[str, float]
                     ) -> float | None:
    """Mean over seeds of ``metric[treatment] - metric[baseline]`` (logs with ``log``) of a two-arm contrast."""
    (t, _), (b, _) = sorted(((a, k) for a, k in arms.items() if k), key=lambda x: -x[1])
    vals: dict[str, dict[int, float]] = {}
    for r in table:
        if r["arm"] in (t, b) and r["status"] == "completed" and r.get(metric) is not None:
            v = float(r[metric])
            if log and not v > 0:
                return None
            vals.setdefault(r["arm"], {})[r["seed"]] = math.log(v) if log else v
    seeds = sorted(set(vals.get(t, {})) & set(vals.get(b, {})))
    if not seeds:
        return None
    return float(np.mean([vals[t][s] - vals[b][s] for s in seeds]))


def _guard_table(table: list[dict], pilot: list[dict] | None, arms) -> tuple[list[dict], str]:
    """The pilot rows when the pilot ran every one of ``arms``, else the final table; and which one."""
    if pilot and set(arms) <= {r["arm"] for r in pilot}:
        return pilot, "pilot"
    return table, "final seeds (the pilot did not run these arms)"


def _matched(proto: Protocol, claim: Claim, table, pilot, arms) -> dict | None:
    if claim.matched is None:
        return None
    m = claim.matched
    rows, on = _guard_table(table, pilot, arms)
    diff = _mean_difference(proto, rows, m.metric, m.log, arms)
    ok = diff is not None and abs(diff) <= m.tolerance
    return {"metric": m.metric, "log": m.log, "difference": diff, "tolerance": m.tolerance, "on": on, "ok": ok}


def _floor(proto: Protocol, claim: Claim, table, pilot, arms) -> dict | None:
    """Which arms stopped improving between the early point and the claim's metric (median log ratio)."""
    early, tol = None, 0.0953
    if claim.floor is not None:
        early, tol = claim.floor.early, claim.floor.tolerance
    else:  # an at_fraction metric: the same quantity at the latest registered point at most half as far
        m = proto.metrics.get(claim.metric)
        if m is not None and m.kind == "at_fraction":
            cands = [(o.fraction, n) for n, o in proto.metrics.items()
                     if o.kind == "at_fraction" and o.of == m.of and o.x == m.x and o.fraction <= m.fraction / 2]
            early = max(cands)[1] if cands else None
    if early is None:
        return None
    rows, on = _guard_table(table, pilot, arms)
    stopped, gains = [], {}
    for arm in arms:
        pairs = [(r[early], r[claim.metric]) for r in rows if r["arm"] == arm and r["status"] == "completed"
                 and r.get(early) is not None and r.get(claim.metric) is not None]
        if not pairs or any(not (a > 0 and b > 0) for a, b in pairs):
            continue
        sign = 1 if claim.direction == "lower" else -1  # an improvement of a loss is a fall
        gain = float(np.median([sign * (math.log(a) - math.log(b)) for a, b in pairs]))
        gains[arm] = gain
        if gain < tol:
            stopped.append(arm)
    return {"early": early, "tolerance": tol, "on": on, "improvement": gains, "stopped": stopped,
            "flagged": bool(stopped)}


def _collapsed(proto: Protocol, table: list[dict], arms: set[str] | None) -> int:
    """Completed trials whose test accuracy is within :data:`COLLAPSE_BAND` of the protocol's chance level."""
    n = 0
    for r in table:
        if r["status"] != "completed" or (arms is not None and r["arm"] not in arms):
            continue
        acc = r.get("test_acc")
        if acc is None and r.get("test_error") is not None:
            acc = 1.0 - r["test_error"]
        if acc is not None and acc <= proto.chance + COLLAPSE_BAND:
            n += 1
    return n


def _one_sided_p(values: np.ndarray, bound: float, greater: bool) -> float:
    """p of the one-sided t test of ``mean > bound`` (``greater``) or ``mean < bound``."""
    n = values.size
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    diff = (mean - bound) if greater else (bound - mean)
    if sd == 0:
        return 0.0 if diff > 0 else 1.0
    return float(sps.t.sf(diff / (sd / math.sqrt(n)), n - 1))


def verdicts_from_tables(proto: Protocol, table: list[dict], pilot: list[dict] | None = None, *,
                         quick: bool = False) -> dict:
    """Every claim's estimate, 95% interval, p (two-sided against 0; one-sided against the margin for a
    non-inferiority claim; the TOST p against ``predicted +- sesoi`` for a predicted value), seeds, diverged
    and collapsed counts and its guards' findings, before multiplicity (:func:`finish` fills the adjusted p,
    decision interval and outcome); plus the pilot selections."""
    chosen = select_arms(proto, pilot or table, quick) if proto.select else {}
    present = {r["arm"] for r in table}
    claims = []
    for c in proto.claims:
        named = [chosen.get(a[1:], {}).get("arm") if a.startswith("@") else a for a in c.contrast]
        if quick and c.kind == "contrast" and not set(named) <= present:
            continue  # quick mode may run a subset of the arms
        vals, diverged = _per_arm(proto, table, c.metric, c.log)
        edges = fits = 0
        if c.kind == "optimum_slope":
            grid = {a: o for a, o in proto.arm_list() if c.among is None or a.startswith(c.among)}
            if quick and not set(grid) & present:
                continue  # quick mode ran none of this claim's grid
            seeds, v, edges, fits = _optimum_slope(c, grid, vals)
            ndiv, arms, arm_set = sum(diverged.values()), {}, None
        else:
            arms = _arms_of(c, chosen)
            seeds, v = st.paired_values(vals, arms)
            ndiv, arm_set = sum(diverged.get(a, 0) for a in arms), set(arms)
        ti = st.t_interval(v)
        p = ti.p
        if c.margin is not None:
            p = _one_sided_p(v, -c.margin * c.sign, greater=c.sign > 0)
        elif c.predicted is not None:
            p = max(_one_sided_p(v, c.predicted - c.sesoi, True), _one_sided_p(v, c.predicted + c.sesoi, False))
        unbracketed = [{"selection": a[1:], "arm": chosen[a[1:]]["arm"], "edge": chosen[a[1:]]["edge"]}
                       for a in c.contrast if a.startswith("@") and a[1:] in chosen
                       and not chosen[a[1:]]["bracketed"]]
        unreached, counted = _unreached(proto, c.metric, table, arm_set)
        claims.append({"study": proto.name, "id": c.id, "claim": c.text, "metric": c.metric,
                       "direction": c.direction, "sesoi": c.sesoi, "margin": c.margin, "log": c.log,
                       "predicted": c.predicted, "primary": c.primary, "requires": c.requires,
                       "contrast": arms, "seeds": seeds, "n": ti.n, "diverged": ndiv,
                       "collapsed": _collapsed(proto, table, arm_set),
                       "estimate": ti.estimate, "ci_low": ti.low, "ci_high": ti.high, "sd": ti.sd, "p": p,
                       "p_zero": ti.p, "ladder": c.ladder, "at": c.at, "values": v.tolist(),
                       "unreached": unreached, "trials": counted,
                       "unbracketed": unbracketed, "edge_fits": edges, "fits": fits,
                       "matched": _matched(proto, c, table, pilot, arms) if arms else None,
                       "floor": _floor(proto, c, table, pilot, arms) if arms else None,
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


def _decide_predicted(c: dict, level: float) -> st.Decision:
    """Two one-sided tests at ``1 - level``: the interval at ``1 - 2 (1 - level)`` inside the band supports
    the prediction, outside it contradicts it; the sign of the effect is decided beside it."""
    pred, ses = c["predicted"], c["sesoi"]
    ti = st.t_interval(c["values"], 1 - 2 * (1 - level))
    sign = st.t_interval(c["values"], level)
    sd = st.decide(sign.low, sign.high, 1 if c["direction"] == "higher" else -1, ses)
    side = f"sign test beside it: {sd.label} (interval [{sign.low:+.3g}, {sign.high:+.3g}] against 0)"
    lo, hi = pred - ses, pred + ses
    if lo <= ti.low and ti.high <= hi:
        return st.Decision(st.SUPPORTED, note=f"within the predicted {pred:g} +- {ses:g}; {side}",
                           extra={"low": ti.low, "high": ti.high})
    if ti.high < lo or ti.low > hi:
        return st.Decision(st.CONTRADICTED, "prediction", note=f"excludes the predicted {pred:g} +- {ses:g}; {side}",
                           extra={"low": ti.low, "high": ti.high})
    need = st.seeds_needed(ti.sd, ses, alpha=1 - level) if ti.sd > 0 else None
    return st.Decision(st.INCONCLUSIVE, note=f"overlaps the edge of the predicted {pred:g} +- {ses:g}; {side}",
                       seeds_needed=need, extra={"low": ti.low, "high": ti.high})


def finish(protos: dict[str, Protocol], results: dict[str, dict], alpha: float = 0.05) -> None:
    """Holm across all primary claims of ``results`` (``{study: verdicts_from_tables(...)}``), then each
    claim's decision interval, outcome, guards, power note and text; ladders get their largest supported rung."""
    primary = [c for r in results.values() for c in r["claims"] if c["primary"]]
    raw = [c["p"] for c in primary]
    for c, adj, lev in zip(primary, st.holm(raw), st.holm_levels(raw, alpha)):
        c["p_holm"], c["decision_level"] = adj, lev
    for name, r in results.items():
        proto = protos[name]
        checks = {c.get("requires") for c in r["claims"]} - {None}
        outcomes: dict[str, str] = {}
        # manipulation checks first: the claims that require one read its outcome
        for c in sorted(r["claims"], key=lambda c: c["id"] not in checks):
            level = c.get("decision_level", 1 - alpha)
            if not c["primary"]:
                c["p_holm"], c["decision_level"] = None, level
            direction = 1 if c["direction"] == "higher" else -1
            if c.get("predicted") is not None:
                d = _decide_predicted(c, level)
                low, high = d.extra["low"], d.extra["high"]
            else:
                # a margin's one-sided test at 1 - level is the bound of the interval at 1 - 2 (1 - level)
                ti = st.t_interval(c["values"], level if c["margin"] is None else 1 - 2 * (1 - level))
                low, high = ti.low, ti.high
                d = st.decide(low, high, direction, c["sesoi"], margin=c["margin"], sd=ti.sd, n=ti.n,
                              alpha=1 - level)
            d = _guards(c, d)
            flags = []
            fl = c.get("floor")
            if fl and fl["flagged"]:
                flags.append("metric at a floor")
                d = dataclasses.replace(d, note="; ".join(filter(None, [d.note, (
                    f"floor: {', '.join(fl['stopped'])} improved by less than {fl['tolerance']:g} (log ratio) from "
                    f"{fl['early']} to {c['metric']} on the {fl['on']}, so the contrast may compare floors")])))
            req = c.get("requires")
            if req and req in outcomes and outcomes[req] != st.SUPPORTED and not c.get("misspecified"):
                c["misspecified"] = (f"its registered manipulation check {req!r} is {outcomes[req]}, so the "
                                     "arms may not differ in what the claim is about")
            if c.get("misspecified"):
                flags.append("misspecified")
                d = dataclasses.replace(d, note="; ".join(filter(None, [d.note, f"misspecified: {c['misspecified']}"])))
            if c.get("post_hoc"):
                flags.append("post-hoc reading")
            label = d.label if not flags else (
                f"{d.outcome} ({'; '.join(filter(None, [d.qualifier, *flags]))})")
            c.update(decision_low=low, decision_high=high, outcome=d.outcome, qualifier=d.qualifier,
                     verdict=label, seeds_needed=d.seeds_needed, note=d.note, flags=flags)
            outcomes[c["id"]] = d.outcome
            unreached, counted = c.get("unreached", 0), c.get("trials", 0)
            c["text"] = (f"In regime {c.get('regime') or proto.regime.rstrip('. ')}: {c['claim']}: {label} (estimate {c['estimate']:+.4g}, "
                         f"95% CI [{c['ci_low']:+.4g}, {c['ci_high']:+.4g}], SESOI {c['sesoi']:g}"
                         + (f", predicted {c['predicted']:g}" if c.get("predicted") is not None else "")
                         + f", {c['n']} seeds"
                         + (f", {c['diverged']} diverged trials counted at the worst value" if c["diverged"] else "")
                         + (f", {c['collapsed']} collapsed trials (at chance)" if c.get("collapsed") else "")
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


def _guards(c: dict, d: st.Decision) -> st.Decision:
    """Censored targets, unbracketed optima and unmatched arms override the interval's outcome."""
    def add(note: str) -> str:
        return "; ".join(filter(None, [d.note, note]))

    unreached, counted = c.get("unreached", 0), c.get("trials", 0)
    if counted and unreached == counted:
        # every value is the budget: the contrast compares budgets, so it can decide nothing
        return st.Decision(st.INCONCLUSIVE, "no trial reached the target",
                           note="every trial stopped at the budget, so the contrast compares budgets, not speeds")
    if unreached:
        d = dataclasses.replace(d, note=add(f"{unreached} of {counted} trials never reached the target "
                                            f"(counted at the budget)"))
    if c.get("unbracketed"):
        what = ", ".join(f"{u['selection']} chose {u['arm']!r}, the {'last' if u['edge'] == 'high' else 'first'} "
                         f"candidate" for u in c["unbracketed"])
        return st.Decision(st.INCONCLUSIVE, "optimum not bracketed",
                           note=add(f"{what}; the best setting may lie beyond the grid (the interval said "
                                    f"{d.label})"))
    if c.get("edge_fits"):
        return st.Decision(st.INCONCLUSIVE, "optimum not bracketed",
                           note=add(f"{c['edge_fits']} of {c['fits']} fitted optima lie at the grid's edge (the "
                                    f"interval said {d.label})"))
    m = c.get("matched")
    if m and not m["ok"]:
        diff = "not measured" if m["difference"] is None else f"{m['difference']:+.3g}"
        return st.Decision(st.INCONCLUSIVE, "arms not matched",
                           note=add(f"{m['metric']} differs by {diff}{' (log ratio)' if m['log'] else ''} between "
                                    f"the arms on the {m['on']}, beyond the tolerance {m['tolerance']:g} (the "
                                    f"interval said {d.label})"))
    return d
