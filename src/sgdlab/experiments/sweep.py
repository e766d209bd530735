"""Sweeps: a base config x grid points x seeds, run in parallel, resumable.

Every trial is an ordinary run directory (see :mod:`sgdlab.train`) inside the sweep directory, named
after its grid point and seed (stable and filesystem-safe), and ``sweep.json`` lists the trials. A
sweep can be rerun at any time: trials whose ``summary.json`` says ``completed`` (or ``nonfinite``)
are skipped, interrupted ones (a ``config.yaml`` without a final summary) continue from their last
checkpoint via :func:`sgdlab.train.resume`, and missing ones start.

The sweep folder is locked while a sweep runs in it. The first SIGTERM, SIGINT or SIGUSR1 stops the
scheduling of queued trials and interrupts the running ones (each saves a checkpoint, as a run does; worker
processes learn of the stop from ``.stop-request`` in the sweep folder);
``sweep.json`` then says ``interrupted`` for them and ``new`` for the trials that never started, and
:class:`~sgdlab.train.guard.RunInterrupted` is raised. Running the same sweep again continues it.
``sweep.json`` is written when the sweep starts and when it ends; meanwhile each finished trial is appended
to ``sweep.jsonl``, so the bookkeeping of a sweep is linear in its number of trials.

Backends: ``process`` (default; ``jobs`` spawned worker processes, one torch thread each, or in
this process when ``jobs == 1``) and ``ray`` (:mod:`sgdlab.experiments.ray_backend`).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import open_append, write_text
from ..train import guard
from ..train.config import MAX_SEED, read_raw_config, read_yaml
from .trials import STOP_FILE, execute_trial, trial_state, worker_init, worker_trial

__all__ = [
    "Point",
    "Trial",
    "execute_trial",
    "grid_points",
    "parse_grid",
    "plan",
    "point_label",
    "run_sweep",
    "set_dotted",
    "trial_name",
    "trial_state",
]  # execute_trial and trial_state live in .trials (shared with the Ray backend) and are re-exported here

_MAX_NAME = 100
_MAX_TRIALS = 100_000  # a sweep plans (and validates) every trial up front; more is a typo, not a sweep


@dataclass(frozen=True)
class Point:
    """One grid point: dotted-key overrides of the base config and a label naming its group."""

    overrides: Mapping[str, Any]
    label: str | None = None

    def name(self) -> str:
        return self.label if self.label is not None else point_label(self.overrides)


@dataclass
class Trial:
    """One run of a sweep: a grid point, a seed, the resolved config dict and its run directory name."""

    name: str
    label: str
    overrides: dict
    seed: int
    config: dict = field(repr=False)

    def manifest(self) -> dict:
        return {"name": self.name, "label": self.label, "overrides": self.overrides, "seed": self.seed}


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def point_label(overrides: Mapping[str, Any]) -> str:
    """Human-readable group label: ``key=value, key=value`` (``base`` for no overrides)."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in overrides.items()) or "base"


def _safe(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("._")
    return s or "x"


def trial_name(point: Point | Mapping[str, Any], seed: int) -> str:
    """Stable, filesystem-safe run directory name of a grid point and seed.

    Labelled points use their label; others ``key=value`` pairs joined by ``__``; then ``__seed=<seed>``.
    Characters outside ``[A-Za-z0-9._=+-]`` become ``_``; names longer than 100 characters are cut and
    given an 8-hex-digit hash of the full text so that they stay unique.
    """
    if not isinstance(point, Point):
        point = Point(dict(point))
    return f"{_point_dir(point)}__seed={int(seed)}"


def _point_dir(point: Point) -> str:
    if point.label is not None:
        base = _safe(point.label)
        full = point.label
    else:
        base = "__".join(_safe(f"{k}={_fmt(v)}") for k, v in point.overrides.items()) or "base"
        full = json.dumps(dict(point.overrides), sort_keys=True, default=str)
    if len(base) > _MAX_NAME:
        base = base[:_MAX_NAME] + "-" + hashlib.sha1(full.encode()).hexdigest()[:8]
    return base


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``["optim.lr=0.1,0.05", "model.name=mlp,cnn1d"]`` -> ``{"optim.lr": [0.1, 0.05], ...}``.

    The values after ``=`` are read as a YAML flow sequence, so lists and mappings work:
    ``schedule.milestones=[10,20],[30,40]`` or ``model.shake={forward: even},{forward: shake}``.
    """
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,... (e.g. optim.lr=0.1,0.05)")
        key, rhs = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--grid {item!r}: empty key")
        values = read_yaml("[" + rhs + "]", f"--grid {item!r}")
        if not values:
            raise ConfigError(f"--grid {item!r}: no values")
        grid[key] = values
    return grid


def grid_points(grid: Mapping[str, Sequence]) -> list[Point]:
    """The cross product of the grid's values, in the order given (last key varies fastest).

    More than 100,000 points raise :class:`~sgdlab.errors.ConfigError` (before the list is built).
    """
    keys = list(grid)
    n = 1
    for k in keys:
        n *= len(grid[k])
    if n > _MAX_TRIALS:
        sizes = " x ".join(str(len(grid[k])) for k in keys)
        raise ConfigError(f"--grid: {n:,} grid points ({sizes}) exceed the limit of {_MAX_TRIALS:,} trials "
                          f"per sweep; use fewer values")
    return [Point(dict(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]


def _load_raw(config) -> dict:
    if isinstance(config, Mapping):
        return json.loads(json.dumps(config))
    return read_raw_config(Path(config))


def plan(config, points: Sequence[Point] | None = None, seeds: int | Sequence[int] = 1,
         seed_keys: Sequence[str] = ()) -> tuple[dict, list[Trial]]:
    """``(base, trials)``: the validated trials of ``config`` x ``points`` x ``seeds`` (seed = 0..N-1 for an int).

    ``seed_keys``: dotted config keys set to the trial's seed as well as ``seed`` (e.g. ``"data.seed"``
    for a fresh dataset draw per seed, shared by every grid point of that seed so pairs stay paired).

    Every trial's config is validated now, its model and sampler built on stand-ins (bad keys and option
    values raise :class:`~sgdlab.errors.ConfigError` before
    anything runs); progress bars are switched off inside trials. ``seed`` cannot be a grid key (the
    trial's seed comes from ``seeds``), and a sweep has at most 100,000 trials.
    """
    base = _load_raw(config)
    points = list(points) if points else [Point({})]
    if not isinstance(seeds, int):
        seeds = list(seeds)
    n_seeds = seeds if isinstance(seeds, int) else len(seeds)
    if len(points) * n_seeds > _MAX_TRIALS:
        raise ConfigError(f"--seeds/--grid: {len(points) * n_seeds:,} trials ({len(points):,} grid points x "
                          f"{n_seeds:,} seeds) exceed the limit of {_MAX_TRIALS:,} trials per sweep; "
                          f"use fewer seeds or grid values")
    seed_list = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("seeds: need at least one seed")
    if len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"seeds: repeated seeds in {seed_list}")
    for p in points:
        if "seed" in p.overrides:  # raw["seed"] below would silently replace the grid's value
            raise ConfigError(f"grid key 'seed' (seed={_fmt(p.overrides['seed'])}) conflicts with --seeds, which "
                              f"sets every trial's seed (0..N-1 per grid point); use --seeds N, not a seed grid")
    for s in seed_list:  # what validating each trial's config would say about its seed, said once
        if isinstance(s, bool) or not 0 <= s <= MAX_SEED:
            raise ConfigError(f"seeds: {s} is outside [0, 2^63 - 2^20]")
    for k in seed_keys:
        if any(k in p.overrides for p in points):
            raise ConfigError(f"seed_keys: {k!r} is also a grid key; a key follows the seed or the grid")
    trials: list[Trial] = []
    names: set[str] = set()
    built: set[str] = set()  # model/sampler sections already built on stand-ins
    for p in points:
        point_cfg, stem = None, _point_dir(p)
        for s in seed_list:
            name = f"{stem}__seed={s}"  # trial_name(p, s)
            if name in names:
                raise ConfigError(f"grid: two trials would share the run directory {name!r}")
            names.add(name)
            if point_cfg is None:
                # validated once per grid point: the seeds change nothing else, so the other seeds' configs
                # are this one with the seed (and seed_keys) set (planning 20,000 trials takes seconds)
                cfg = point_cfg = _validated(base, p, s, seed_keys, name, built)
            else:
                cfg = _with_seed(point_cfg, s, seed_keys)
            trials.append(Trial(name, p.name(), dict(p.overrides), s, cfg))
    return base, trials


def _validated(base: dict, p: Point, seed: int, seed_keys: Sequence[str], name: str, built: set[str]) -> dict:
    """The resolved config dict of one trial, validated, its model and sampler built on stand-ins (once per
    distinct model/sampler/data/loss sections: ``built`` holds those done)."""
    from ..train.config import config_to_dict, dry_build, load_config

    raw = json.loads(json.dumps(base))
    for k, v in p.overrides.items():
        set_dotted(raw, k, v)
    raw["seed"] = seed
    for k in seed_keys:
        set_dotted(raw, k, seed)
    set_dotted(raw, "log.progress", False)
    try:
        loaded = load_config(raw)
        cfg = config_to_dict(loaded)
        key = json.dumps([cfg["model"], cfg["sampler"], cfg["data"]["name"], cfg["loss"]], sort_keys=True,
                         default=str)
        if key not in built:
            dry_build(loaded)
            built.add(key)
    except ConfigError as e:
        raise ConfigError(f"trial {name}: {e}") from None
    return cfg


def _with_seed(cfg: dict, seed: int, seed_keys: Sequence[str]) -> dict:
    """``cfg`` with ``seed`` and the ``seed_keys`` set; the sections on those keys' paths are copied, the rest
    is shared (trial configs are only read)."""
    out = dict(cfg, seed=seed)
    for key in seed_keys:
        *path, last = key.split(".")
        node = out
        for part in path:
            node[part] = dict(node[part])
            node = node[part]
        node[last] = seed
    return out


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for the dotted ``key`` ``"a.b.c"`` (sections created as needed)."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"grid key {key!r}: '{part}' is not a section")
    node[parts[-1]] = json.loads(json.dumps(value))


_POOL: dict = {"jobs": None, "executor": None}


def _close_pool(cancel: bool = False, kill: bool = False) -> None:
    """Shut the shared pool down (``cancel``: without waiting for queued work). ``kill``: its workers run no
    trial any more (every future is done or cancelled), so they are ended at once; a worker still starting
    (importing torch) or waiting on its queue would otherwise keep the sweep from exiting."""
    ex = _POOL["executor"]
    _POOL.update(jobs=None, executor=None)
    if ex is None:
        return
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=not cancel, cancel_futures=True)
    if kill:
        for proc in procs:
            with contextlib.suppress(OSError, AttributeError, ValueError):
                proc.kill()
        for proc in procs:
            with contextlib.suppress(OSError, AttributeError, ValueError, AssertionError):
                proc.join(5)


def _pool(jobs: int) -> ProcessPoolExecutor:
    """A pool of ``jobs`` spawned workers, kept for later sweeps of this process (``study all`` pays the
    workers' start-up, importing torch, once); replaced if its size differs or a worker died."""
    ex = _POOL["executor"]
    if ex is None or _POOL["jobs"] != jobs or getattr(ex, "_broken", False):
        _close_pool(cancel=True)
        ex = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=worker_init, initargs=(1,))
        _POOL.update(jobs=jobs, executor=ex)
        if not _POOL.get("atexit"):
            atexit.register(_close_pool)
            _POOL["atexit"] = True
    return ex


LOG_NAME = "sweep.jsonl"


def _write_manifest(out: Path, base: dict, trials: list[Trial], results: dict[str, dict], extra: dict) -> dict:
    """Write ``sweep.json`` (every trial with its status in ``results``) and return its content. One trial a
    line, each encoded by the C encoder: an indented dump of 100,000 trials takes seconds."""
    rows = [dict(t.manifest(), status=results[t.name]["status"],
                 **({"message": results[t.name]["message"]} if results[t.name].get("message") else {}))
            for t in trials]
    payload = {"version": 1, "base": base, **extra}
    head = json.dumps(payload, indent=2, default=str)
    text = head[:-2] + ',\n  "trials": [\n' + ",\n".join(
        "    " + json.dumps(r, default=str) for r in rows) + "\n  ]\n}\n"
    write_text(out / "sweep.json", text)
    return dict(payload, trials=rows)


def _check_existing(out: Path, trials: list[Trial], existing: set[str]) -> None:
    """A trial directory from an earlier sweep (``existing``: the folders in ``out``) must hold the same config
    (seed and grid point)."""
    from ..train.config import config_to_dict, load_config

    for t in trials:
        if t.name not in existing:
            continue
        path = out / t.name / "config.yaml"
        if path.is_file():
            on_disk = config_to_dict(load_config(path))
            on_disk["log"]["progress"] = t.config["log"]["progress"]
            if on_disk != t.config:
                raise ConfigError(f"{out / t.name} holds a run with a different config; use another --out "
                                  f"or delete that directory")


def run_sweep(config, points: Sequence[Point] | None = None, seeds: int | Sequence[int] = 1, out_dir="runs/sweep",
              *, jobs: int = 1, backend: str = "process", address: str | None = None, progress: bool = True,
              extra_manifest: dict | None = None, on_result: Callable[[Trial, dict], None] | None = None,
              seed_major: bool = False, seed_keys: Sequence[str] = (), baseline: str | None = None) -> dict:
    """Run every trial of ``config`` x ``points`` x ``seeds`` into ``out_dir``; return ``sweep.json``'s content.

    ``jobs`` worker processes (spawned when ``jobs > 1``, in this process when ``jobs == 1``) or, with
    ``backend="ray"``, one Ray task per trial on the cluster at ``address`` (a local instance if
    ``None``). Every trial runs with ``torch.set_num_threads(1)``, so its numbers do not depend on
    ``jobs`` or the backend. Finished trials are skipped and interrupted ones resumed (see module doc). The returned
    dict adds ``counts`` (trials per action: ran, resumed, skipped, failed). ``seed_major=True`` runs the
    trials seed by seed (every point of the first seed, then of the second, ...), so slow drift of the
    machine's load does not line up with the groups being compared. ``seed_keys``: config keys that
    follow the trial seed too (see :func:`plan`). ``baseline``: the report's ``--baseline``
    (``key=value`` or ``label=NAME``), checked against the planned groups before any trial runs.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if backend not in ("process", "ray"):
        raise ConfigError(f"--backend must be 'process' or 'ray', got {backend!r}")
    base, trials = plan(config, points, seeds, seed_keys=seed_keys)
    if baseline is not None:
        from .report import _parse_baseline

        _parse_baseline(baseline, [t.manifest() for t in trials])
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with guard.FolderLock(out, "sweep"), guard.stop_signals():
        return _run_locked(out, base, trials, jobs=jobs, backend=backend, address=address, progress=progress,
                           extra_manifest=extra_manifest, on_result=on_result, seed_major=seed_major)


def _run_locked(out: Path, base: dict, trials: list[Trial], *, jobs, backend, address, progress, extra_manifest,
                on_result, seed_major: bool = False) -> dict:
    existing = {e.name for e in os.scandir(out) if e.is_dir()}  # one listing, not a stat per planned trial
    _check_existing(out, trials, existing)
    extra = dict(extra_manifest or {})
    # every trial's state, read once; sweep.json is written whole now and at the end, and each finished trial
    # is appended to sweep.jsonl meanwhile (rewriting the manifest per trial made a sweep quadratic)
    results: dict[str, dict] = {t.name: {"status": trial_state(out / t.name) if t.name in existing else "new"}
                                for t in trials}
    _write_manifest(out, base, trials, results, extra)
    counts = {"ran": 0, "resumed": 0, "skipped": 0, "failed": 0, "interrupted": 0}
    todo = [t for t in trials if results[t.name]["status"] not in ("completed", "nonfinite")]
    if seed_major:
        first = {}
        for t in trials:
            first.setdefault(t.seed, len(first))
        todo.sort(key=lambda t: first[t.seed])  # stable: grid order within a seed
    pending_names = {t.name for t in todo}
    for t in trials:
        if t.name not in pending_names:
            results[t.name] = {"action": "skipped", "status": results[t.name]["status"]}
            counts["skipped"] += 1
    log = open_append(out / LOG_NAME)

    def record(t: Trial, r: dict) -> None:
        results[t.name] = r
        counts[r["action"]] = counts.get(r["action"], 0) + 1
        log.write(json.dumps({"name": t.name, "status": r["status"], "action": r["action"],
                              **({"message": r["message"]} if r.get("message") else {})}, default=str) + "\n")
        log.flush()
        if on_result is not None:
            on_result(t, r)

    try:
        _execute(out, todo, len(trials), record, jobs=jobs, backend=backend, address=address, progress=progress)
    finally:
        log.close()
        signum = guard.stop_requested()
        if signum is not None:
            extra["status"] = "interrupted"
        manifest = _write_manifest(out, base, trials, results, extra)
    if signum is not None:
        states = [t["status"] for t in manifest["trials"]]
        name = guard.signal_name(signum)
        raise guard.RunInterrupted(
            f"sweep {out} stopped by {name}: {states.count('completed')} completed, {states.count('interrupted')} "
            f"interrupted (checkpoint saved), {states.count('new')} not started; to continue, run the same "
            "sweep command again (finished trials are skipped, interrupted ones resume)", signum, manifest)
    manifest["counts"] = counts
    return manifest


def _execute(out: Path, todo: list[Trial], total: int, record: Callable[[Trial, dict], None], *, jobs, backend,
             address, progress) -> None:
    """Run ``todo`` on the backend, calling ``record`` as each trial ends; a stop request (checked between
    trials, and every 0.2 s while workers run) starts no further trial."""
    with _progress(progress, total, total - len(todo), out) as bar:
        task = bar.add_task("sweep", total=total, completed=total - len(todo), info="") if bar else None

        def done(t: Trial, r: dict) -> None:
            record(t, r)
            if bar is not None:
                bar.update(task, advance=1, info=f"{t.name}: {r['action']}" + (
                    f" ({r['message']})" if r.get("status") == "failed" else ""))

        if not todo or guard.stop_requested() is not None:
            return
        if backend == "ray":
            from .ray_backend import run_trials

            run_trials([(t, str(out / t.name)) for t in todo], address=address, callback=done, sweep_dir=str(out))
        elif jobs == 1:
            # one thread per trial on every backend: CPU kernels split work by thread count, so this
            # keeps a trial's numbers independent of --jobs (and a sweep resumed with other --jobs exact)
            for t in todo:
                if guard.stop_requested() is not None:
                    break
                done(t, execute_trial(t.config, str(out / t.name), 1))
        else:
            _execute_pool(out, todo, jobs, done)


def _running(run_dir: Path) -> bool:
    """Whether a process works in ``run_dir`` now (it holds the folder's lock)."""
    if not run_dir.is_dir():
        return False
    try:
        guard.FolderLock(run_dir).acquire().release()
    except ConfigError:
        return True
    return False


def _execute_pool(out: Path, todo: list[Trial], jobs: int, done: Callable[[Trial, dict], None]) -> None:
    """``todo`` on ``jobs`` workers; at most ``2 * jobs`` trials are handed out at a time, so waiting and
    stopping cost the same for 10 trials as for 100,000."""
    ex = _pool(jobs)
    (out / STOP_FILE).unlink(missing_ok=True)  # left by an earlier, stopped sweep
    queue = deque(todo)
    pending: dict = {}
    forwarded = False
    try:
        while queue or pending:
            signum = guard.stop_requested()
            if signum is not None and not forwarded:
                forwarded = True
                queue.clear()  # not started: they stay 'new'
                for f in list(pending):
                    if f.cancel():
                        pending.pop(f)
                write_text(out / STOP_FILE, "stop\n")  # the running trials' workers watch for it
            while queue and len(pending) < 2 * jobs:
                t = queue.popleft()
                pending[ex.submit(worker_trial, t.config, str(out / t.name), 1)] = t
            if not pending or (forwarded and not any(_running(out / t.name) for t in pending.values())):
                break  # after a stop, trials handed out but not begun (a worker still starting) stay 'new'
            finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for f in finished:
                t = pending.pop(f)
                try:
                    r = f.result()
                except Exception as e:
                    r = {"action": "failed", "status": "failed", "message": f"{type(e).__name__}: {e}"}
                done(t, r)
    except BaseException:
        _close_pool(cancel=True)
        raise
    if forwarded:  # every trial handed out has returned: its workers are idle, stopped, or still starting
        _close_pool(cancel=True, kill=True)
        (out / STOP_FILE).unlink(missing_ok=True)


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total: int, completed: int, out: Path):
    if not enabled:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(f"[bold]{out.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
