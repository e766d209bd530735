"""One trial of a sweep, wherever it runs: its state on disk and its execution.

Shared by the process backend (:mod:`sgdlab.experiments.sweep`) and the Ray backend
(:mod:`sgdlab.experiments.ray_backend`), which both build on this module and not on each other.
:func:`worker_init` prepares a worker process: one torch thread, stop signals that persist across the
trials it is handed, and death with its parent (the kernel's parent-death signal on Linux, plus a
watchdog thread that notices a new parent on any platform), so a sweep killed even by SIGKILL leaves no
worker behind.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import traceback
from pathlib import Path

from ..train import guard

__all__ = ["STOP_FILE", "execute_trial", "trial_state", "worker_init", "worker_trial"]

_FINAL = ("completed", "nonfinite")
# A stopped sweep writes this file into its folder; the trials running for it (in worker processes or Ray
# tasks) watch for it and stop like a signalled run. (A signal sent to a worker that is still importing torch
# would kill it, and with it the pool.)
STOP_FILE = ".stop-request"


def trial_state(run_dir) -> str:
    """``completed``, ``nonfinite`` (both final), ``interrupted`` (config.yaml, no final summary) or ``new``."""
    d = Path(run_dir)
    summary = d / "summary.json"
    if summary.is_file():
        try:
            status = json.loads(summary.read_text()).get("status")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            status = None
        if status in _FINAL:
            return status
    if (d / "config.yaml").is_file():
        return "interrupted"
    return "new"


def execute_trial(config: dict, run_dir: str, threads: int | None = None) -> dict:
    """Run, resume or skip one trial (this is what a worker process or Ray task executes).

    Returns ``{"action": skipped|resumed|ran|failed|interrupted, "status": ..., "message": ...}``;
    exceptions are caught and reported, so one failing trial does not stop the sweep.
    """
    import torch

    from .. import train
    from ..errors import NonFiniteLossError

    d = Path(run_dir)
    state = trial_state(d)
    if state in _FINAL:
        return {"action": "skipped", "status": state}
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if state == "interrupted":
            train.resume(d, quiet=True, threads=threads or None)
            return {"action": "resumed", "status": "completed"}
        train.run(config, d, quiet=True, threads=threads or None)
        return {"action": "ran", "status": "completed"}
    except NonFiniteLossError as e:
        return {"action": "ran", "status": "nonfinite", "message": str(e)}
    except guard.RunInterrupted as e:
        return {"action": "interrupted", "status": trial_state(d), "message": str(e)}
    except Exception as e:
        return {"action": "failed", "status": "failed", "message": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=5)}
    finally:
        torch.set_num_threads(previous_threads)


_WORKER: dict = {"busy": False, "stop_file": None}
WATCH_SECONDS = 0.25


def _watch_parent(parent: int) -> None:
    """Worker watchdog: passes the sweep's stop file on to the running trial as a stop request, and once the
    parent is gone (even by SIGKILL; the kernel's parent-death signal may be unavailable) stops the running
    trial (it saves its checkpoint) and exits as soon as no trial runs."""
    while True:
        threading.Event().wait(WATCH_SECONDS)
        stop_file = _WORKER["stop_file"]
        if _WORKER["busy"] and stop_file is not None and os.path.exists(stop_file):
            guard.request_stop(signal.SIGTERM)
        if os.getppid() != parent:
            guard.request_stop(signal.SIGTERM)
            if not _WORKER["busy"]:
                os._exit(guard.exit_code(signal.SIGTERM))


def worker_init(threads: int = 1) -> None:
    """Initializer of a sweep's worker process (see module doc)."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # A stop signal (sent by the terminal to the whole group, forwarded by the sweep, or SIGTERM from the
    # kernel when the sweep process dies, even by SIGKILL) makes the running trial save and stop, and every
    # later trial handed to this worker stop at once: no orphan keeps writing into trial folders.
    guard.make_sticky()
    guard.die_with_parent()
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="sgdlab-parent-watch", daemon=True).start()


def worker_trial(config: dict, run_dir: str, threads: int | None = None) -> dict:
    """:func:`execute_trial` in a worker started by :func:`worker_init` (the watchdog waits for it)."""
    _WORKER["stop_file"] = os.path.join(os.path.dirname(os.path.abspath(run_dir)), STOP_FILE)
    _WORKER["busy"] = True
    try:
        return execute_trial(config, run_dir, threads)
    finally:
        _WORKER["busy"] = False
