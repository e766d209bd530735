"""Run a sweep's trials as Ray tasks (``sgdlab sweep ... --backend ray [--address HOST:PORT]``).

Ray is an optional dependency (``pip install 'sgdlab[ray]'``), imported only here and only when
this backend is used. Each trial is one task (one CPU, one torch thread) calling
:func:`sgdlab.experiments.sweep.execute_trial`, so skipping finished trials and resuming interrupted
ones works as with processes. On a multi-node cluster the sweep directory must be on a filesystem
every node sees, and sgdlab must be installed in the workers' environment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import ConfigError

__all__ = ["require_ray", "run_trials"]


def require_ray():
    """Import and return ``ray``, or raise :class:`~sgdlab.errors.ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs Ray, an optional extra: pip install 'sgdlab[ray]'") from None
    return ray


def run_trials(items: Sequence, *, address: str | None = None, num_cpus: float = 1.0,
               callback: Callable | None = None) -> list[dict]:
    """Run ``items`` (``(trial, run_dir)`` pairs) as Ray tasks; ``callback(trial, result)`` as each finishes.

    Uses the Ray instance this process is already connected to, else ``ray.init(address=address)``
    (``address=None`` starts a local instance, shut down again at the end).
    """
    ray = require_ray()
    from .sweep import execute_trial

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        task = ray.remote(num_cpus=num_cpus)(execute_trial)
        pending = {task.remote(t.config, run_dir, 1): t for t, run_dir in items}
        results = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            t = pending.pop(done[0])
            try:
                r = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a task that died (worker crash)
                r = {"action": "failed", "status": "failed", "message": f"{type(e).__name__}: {e}"}
            results.append(r)
            if callback is not None:
                callback(t, r)
        return results
    finally:
        if started and address is None:
            ray.shutdown()
