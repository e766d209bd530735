"""Run a sweep's trials as Ray tasks (``sgdlab sweep ... --backend ray [--address HOST:PORT]``).

Ray is an optional dependency (``pip install 'sgdlab[ray]'``), imported only here and only when
this backend is used. Each trial is one task (one CPU, one torch thread) calling
:func:`sgdlab.experiments.trials.execute_trial`, so skipping finished trials and resuming interrupted
ones works as with processes. On a multi-node cluster the sweep directory must be on a filesystem
every node sees, and sgdlab must be installed in the workers' environment.

A stop signal sent to the sweep (SIGTERM, SIGINT, SIGUSR1; see :mod:`sgdlab.train.guard`) reaches the
tasks through a file, ``.stop-request`` in the sweep directory: each task watches for it and passes it to
its engine as a stop request, so a running trial saves a checkpoint and ends ``interrupted``, and a
queued one returns without starting and stays ``new``. Running the same sweep again resumes them. (Ray's
own ``ray.cancel`` raises ``KeyboardInterrupt`` in the task, which would lose the trial's progress.)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ConfigError
from ..files import write_text
from ..train import guard
from .trials import STOP_FILE, execute_trial

__all__ = ["STOP_FILE", "require_ray", "run_trials"]


def require_ray():
    """Import and return ``ray``, or raise :class:`~sgdlab.errors.ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs Ray, an optional extra: pip install 'sgdlab[ray]'") from None
    return ray


def _trial_task(config: dict, run_dir: str, threads: int, stop_file: str) -> dict | None:
    """One trial on a Ray worker, stopping like a signalled run once ``stop_file`` appears; ``None`` when
    the file was there before it started (the trial stays new)."""
    if os.path.exists(stop_file):
        return None
    done = threading.Event()

    def watch() -> None:
        # the engine clears stop requests as it starts, so keep asking until the trial has returned
        while not done.wait(0.1):
            if os.path.exists(stop_file) and guard.stop_requested() is None:
                guard.request_stop(signal.SIGTERM)

    watcher = threading.Thread(target=watch, name="sgdlab-stop-watch", daemon=True)
    watcher.start()
    try:
        return execute_trial(config, run_dir, threads)
    finally:
        done.set()
        watcher.join()


def run_trials(items: Sequence, *, address: str | None = None, num_cpus: float = 1.0,
               callback: Callable | None = None, sweep_dir: str | None = None) -> list[dict]:
    """Run ``items`` (``(trial, run_dir)`` pairs) as Ray tasks; ``callback(trial, result)`` as each finishes.

    Uses the Ray instance this process is already connected to, else ``ray.init(address=address)``
    (``address=None`` starts a local instance, shut down again at the end). A stop request
    (:func:`sgdlab.train.guard.stop_requested`) is passed to the tasks through ``sweep_dir/.stop-request``
    (default: the parent of the first run directory); trials that never started are not reported.
    """
    ray = require_ray()
    if not items:
        return []
    stop_file = Path(sweep_dir if sweep_dir is not None else Path(items[0][1]).parent) / STOP_FILE
    stop_file.unlink(missing_ok=True)  # left by an earlier, stopped sweep

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        task = ray.remote(num_cpus=num_cpus)(_trial_task)
        pending = {task.remote(t.config, run_dir, 1, str(stop_file)): t for t, run_dir in items}
        results = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            if guard.stop_requested() is not None and not stop_file.exists():
                write_text(stop_file, "stop\n")
            for ref in done:
                t = pending.pop(ref)
                try:
                    r = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a task that died (worker crash)
                    r = {"action": "failed", "status": "failed", "message": f"{type(e).__name__}: {e}"}
                if r is None:
                    continue  # the sweep was stopped before this trial started: it stays new
                results.append(r)
                if callback is not None:
                    callback(t, r)
        return results
    finally:
        stop_file.unlink(missing_ok=True)
        if started and address is None:
            ray.shutdown()
