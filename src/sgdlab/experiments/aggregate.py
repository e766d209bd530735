"""Statistics over the trials of a sweep: per-group summaries and bootstrap intervals.

A sweep's trials fall into groups (one per grid point) that differ only in their seed. Each group's
final metric is summarised by its median, mean, standard deviation and a 95% bootstrap interval of
the mean; two groups are compared by the bootstrap interval of the difference of their means
(paired by seed when both groups ran the same seeds: the seed fixes the initialisation and the data
order, so pairing removes that shared variation).

Intervals are percentile bootstrap intervals (Efron & Tibshirani, *An Introduction to the
Bootstrap*, 1993, ch. 13). By default they are *expanded* (Hesterberg, "What teachers should know
about the bootstrap", 2015, section 5.3): the percentile levels are widened so that for normal data the
interval is about as wide as Student's t interval with ``n - 1`` degrees of freedom, which corrects
the plain percentile interval's known under-coverage at the handful of seeds a sweep can afford.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

from ..errors import ConfigError

__all__ = [
    "Difference",
    "Stats",
    "bootstrap_ci",
    "bootstrap_difference",
    "bootstrap_function",
    "curve",
    "group_values",
    "load_trials",
    "read_json_object",
    "read_metrics",
    "summarize",
    "trial_metrics",
]

DEFAULT_BOOT = 10_000


@dataclass(frozen=True)
class Stats:
    """Summary of one group's values: ``n``, mean, median, sample std and the bootstrap interval of the mean."""

    n: int
    mean: float
    median: float
    std: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """``mean(treatment) - mean(baseline)`` with its bootstrap interval; ``paired`` if resampled by seed."""

    estimate: float
    ci_low: float
    ci_high: float
    n_treatment: int
    n_baseline: int
    paired: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _as_array(values, name: str) -> np.ndarray:
    a = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    if a.size == 0:
        raise ValueError(f"{name}: need at least one value, got none")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: values must be finite, got {a.tolist()}")
    return a


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _tail(level: float, n: int, method: str) -> float:
    """Lower percentile (as a fraction) of the bootstrap distribution for a two-sided ``level`` interval."""
    alpha = 1.0 - level
    if method == "percentile":
        return alpha / 2
    if method == "expanded":
        if n < 2:
            return alpha / 2
        t = sps.t.ppf(1.0 - alpha / 2, n - 1)
        return float(sps.norm.cdf(-math.sqrt(n / (n - 1)) * t))
    raise ValueError(f"method must be 'percentile' or 'expanded', got {method!r}")


def _percentiles(boot: np.ndarray, tail: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values, *, level: float = 0.95, n_boot: int = DEFAULT_BOOT, seed: int = 0,
                 method: str = "expanded") -> tuple[float, float]:
    """Bootstrap interval of the mean of ``values`` (percentile, or ``"expanded"`` percentile; see module doc).

    ``n_boot`` resamples of size ``n`` with replacement from a ``numpy`` generator seeded with ``seed``;
    the interval is the ``[tail, 1 - tail]`` quantile range of the resampled means, with
    ``tail = (1 - level) / 2`` for ``"percentile"`` and ``Phi(-sqrt(n/(n-1)) t_{n-1, 1-(1-level)/2})`` for
    ``"expanded"``. A single value gives the degenerate interval ``(x, x)``.
    """
    a = _as_array(values, "values")
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    tail = _tail(level, a.size, method)
    if a.size == 1:
        return float(a[0]), float(a[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    return _percentiles(a[idx].mean(axis=1), tail)


def summarize(values, *, level: float = 0.95, n_boot: int = DEFAULT_BOOT, seed: int = 0,
              method: str = "expanded") -> Stats:
    """:class:`Stats` of ``values``: n, mean, median, sample standard deviation and :func:`bootstrap_ci`."""
    a = _as_array(values, "values")
    lo, hi = bootstrap_ci(a, level=level, n_boot=n_boot, seed=seed, method=method)
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return Stats(int(a.size), float(a.mean()), float(np.median(a)), std, lo, hi)


def bootstrap_difference(treatment, baseline, *, paired: bool = False, level: float = 0.95,
                         n_boot: int = DEFAULT_BOOT, seed: int = 0, method: str = "expanded") -> Difference:
    """Bootstrap interval of ``mean(treatment) - mean(baseline)``.

    Unpaired: each group is resampled independently. ``paired=True`` (equal lengths, element ``i`` of
    both from the same seed): the seed indices are resampled jointly, i.e. the interval of the mean of
    the per-seed differences. For ``"expanded"`` the widening uses the smaller group's size.
    """
    t = _as_array(treatment, "treatment")
    b = _as_array(baseline, "baseline")
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    est = float(t.mean() - b.mean())
    rng = np.random.default_rng(seed)
    if paired:
        if t.size != b.size:
            raise ValueError(f"paired: treatment and baseline need equal lengths, got {t.size} and {b.size}")
        d = t - b
        tail = _tail(level, d.size, method)
        if d.size == 1:
            return Difference(est, est, est, 1, 1, True)
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        lo, hi = _percentiles(d[idx].mean(axis=1), tail)
        return Difference(est, lo, hi, int(t.size), int(b.size), True)
    tail = _tail(level, min(t.size, b.size), method)
    bt = t[rng.integers(0, t.size, size=(n_boot, t.size))].mean(axis=1)
    bb = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(axis=1)
    lo, hi = _percentiles(bt - bb, tail)
    return Difference(est, lo, hi, int(t.size), int(b.size), False)


def bootstrap_function(samples: Sequence, fn: Callable[[list[np.ndarray]], float], *, level: float = 0.95,
                       n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(fn(samples), lo, hi)``: percentile bootstrap of any statistic of several independent samples.

    Each array in ``samples`` (e.g. the per-seed accuracies of one grid cell) is resampled with
    replacement independently; ``fn`` maps the list of resampled arrays to a number (e.g. the
    difference of two arg-max batch sizes).
    """
    arrays = [_as_array(s, f"samples[{i}]") for i, s in enumerate(samples)]
    _check_level(level)
    rng = np.random.default_rng(seed)
    est = float(fn(arrays))
    boot = np.empty(n_boot)
    for k in range(n_boot):
        boot[k] = fn([a[rng.integers(0, a.size, a.size)] for a in arrays])
    tail = (1.0 - level) / 2
    lo, hi = _percentiles(boot, tail)
    return est, lo, hi


# ------------------------------------------------------------------------------------------------
# Trials on disk
# ------------------------------------------------------------------------------------------------


def read_json_object(path) -> dict:
    """The JSON object in ``path`` (a ``summary.json``, ``sweep.json``, ...).

    A damaged file (cut short, not UTF-8, not JSON, not an object) raises :class:`ConfigError`
    ``path[:line]: reason``, which the CLI prints as one line with exit code 2.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}; cut short or edited?)") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, deep nesting
        raise ConfigError(f"{path}: not valid JSON ({' '.join(str(e).split())[:200] or type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_metrics(run_dir) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` ([] if there is none), non-finite numbers (written as null) as NaN.

    Read as ``sgdlab resume`` reads them: a last line without its newline (a run killed while writing it)
    is dropped; any other bad line raises :class:`ConfigError` ``path:line: reason``.
    """
    from ..train.metrics import read_rows as _read_rows

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        with open(path, encoding="utf-8") as f:
            rows = _read_rows(f, path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (offset {e.start})") from None
    # metrics.jsonl writes non-finite numbers as null (strict JSON); read them back as NaN
    return [{k: float("nan") if v is None else v for k, v in row.items()} for row in rows]


def load_trials(sweep_dir) -> list[dict]:
    """The trials of a sweep directory (from ``sweep.json``), each with ``summary``, ``rows`` and ``status``.

    Each trial dict holds ``name``, ``label`` (its group), ``overrides``, ``seed``, ``dir`` (absolute),
    ``status`` (from its ``summary.json``: completed, nonfinite, or missing/interrupted),
    ``summary`` and ``rows`` (the ``metrics.jsonl`` rows) and ``extra`` (``analysis/study.json`` if any).
    A damaged file raises :class:`ConfigError` naming it.
    """
    sweep_dir = Path(sweep_dir)
    manifest = sweep_dir / "sweep.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{sweep_dir}: no sweep.json (not a sweep directory)")
    meta = read_json_object(manifest)
    trials = meta.get("trials")
    if not isinstance(trials, list):
        raise ConfigError(f"{manifest}: not a sweep manifest (no 'trials' list)")
    out = []
    for i, t in enumerate(trials):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise ConfigError(f"{manifest}: trials[{i}] is not a trial (an object with a 'name')")
        d = sweep_dir / t["name"]
        summary = read_json_object(d / "summary.json") if (d / "summary.json").is_file() else {}
        extra = {}
        if (d / "analysis" / "study.json").is_file():
            extra = read_json_object(d / "analysis" / "study.json")
        status = summary.get("status") or ("interrupted" if (d / "config.yaml").is_file() else "missing")
        out.append(dict(t, dir=str(d), summary=summary, rows=read_metrics(d), status=status, extra=extra))
    return out


def trial_metrics(trial: dict) -> dict[str, float]:
    """Final metrics of one completed trial.

    ``test_acc``, ``test_error`` (1 - accuracy), ``test_loss``, ``best_test_acc``, ``wall_time``,
    ``steps``; with ``eval.train``: ``train_eval_loss``, ``train_eval_acc`` and ``train_loss_auc`` (the
    mean of the evaluated training loss over all evaluations: the normalised area under the curve);
    ``train_loss`` (last logged mini-batch loss); plus any numbers in ``analysis/study.json``.
    """
    s = trial.get("summary") or {}
    final = s.get("final") or {}
    m: dict[str, float] = {}
    if "test_acc" in final:
        m["test_acc"] = float(final["test_acc"])
        m["test_error"] = 1.0 - float(final["test_acc"])
    for k in ("test_loss", "train_eval_loss", "train_eval_acc"):
        if k in final:
            m[k] = float(final[k])
    best = (s.get("best") or {}).get("test_acc")
    if best is not None:
        m["best_test_acc"] = float(best)
    if "wall_time" in s:
        m["wall_time"] = float(s["wall_time"])
    if "steps" in s:
        m["steps"] = float(s["steps"])
    rows = trial.get("rows") or []
    tel = [r["train_eval_loss"] for r in rows if "train_eval_loss" in r]
    if tel:
        m["train_loss_auc"] = float(np.mean(tel))
    tl = [r["train_loss"] for r in rows if "train_loss" in r]
    if tl:
        m["train_loss"] = float(tl[-1])
    for k, v in (trial.get("extra") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            m[k] = float(v)
    return m


def group_values(trials: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """``{label: {seed: value}}`` of ``metric`` over the completed trials (groups in sweep order)."""
    out: dict[str, dict[int, float]] = {}
    for t in trials:
        out.setdefault(t["label"], {})
        if t["status"] != "completed":
            continue
        v = trial_metrics(t).get(metric)
        if v is not None:
            out[t["label"]][int(t["seed"])] = v
    return out


def curve(trials: list[dict], y: str, x: str = "epoch", points: int = 60) -> tuple[np.ndarray, np.ndarray] | None:
    """Learning curves of several seeds on one x grid: ``(x_grid, Y)`` with ``Y[seed_index, i]``.

    ``y`` may be ``test_error`` (from ``test_acc``). If every trial logged ``y`` at the same x values
    (step-based runs), those are the grid; otherwise (wall-clock runs) the curves are linearly
    interpolated onto ``points`` values spanning the range every trial covers. ``None`` if no trial
    logged ``y``.
    """
    series = []
    for t in trials:
        xs, ys = [], []
        for r in t.get("rows") or []:
            val = (1.0 - r["test_acc"]) if y == "test_error" and "test_acc" in r else r.get(y)
            if val is not None and x in r and isinstance(val, (int, float)) and math.isfinite(val):
                xs.append(float(r[x]))
                ys.append(float(val))
        if xs:
            series.append((np.asarray(xs), np.asarray(ys)))
    if not series:
        return None
    first = series[0][0]
    if all(len(s[0]) == len(first) and np.allclose(s[0], first) for s in series):
        return first, np.stack([s[1] for s in series])
    lo = max(s[0][0] for s in series)
    hi = min(s[0][-1] for s in series)
    if hi <= lo:
        hi = max(s[0][-1] for s in series)
    grid = np.linspace(lo, hi, points)
    return grid, np.stack([np.interp(grid, s[0], s[1]) for s in series])
