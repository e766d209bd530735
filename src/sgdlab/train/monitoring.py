"""The engine's side of ``monitors:`` (:mod:`sgdlab.monitors`) and of ``log.mlflow``.

:func:`build_monitors` turns the config's list into a :class:`RunMonitors`: the monitors with their
probe batches (a fixed subset of the training set drawn once from the run's seed, on the run's device),
the trained data loss (the mean per-example loss, label smoothing included, before sampler weights and
loss transforms) and a clock. Monitors never draw from the global random streams and evaluate in eval
mode, so a run with monitors trains bit-identically to one without; their time is bookkeeping, kept out
of the training clock and reported as ``monitor_time`` (seconds, cumulative).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import monitors as mon
from ..errors import ConfigError
from .config import Config, config_to_dict

__all__ = ["RunMonitors", "build_monitors", "mlflow_logger"]

# sharpness: a fixed probe of the training batch size (``"batch"``), so that a check costs a bounded number
# of training steps (on cnn1d a Hessian-vector product is about two, a check about eleven; docs/monitors.md,
# "Cost"); larger probes measure the data loss more closely, at proportionally more cost
DEFAULT_PROBE = {"sharpness": "batch"}


class RunMonitors:
    """A :class:`~sgdlab.monitors.MonitorSet` with the engine's conveniences (clock, state, device sync)."""

    def __init__(self, monitors: list, loss_fn, device: torch.device):
        self.set = mon.MonitorSet(monitors, loss_fn=loss_fn)
        self.device = device
        self.seconds = 0.0

    def before_step(self, model, step: int) -> None:
        self.set.before_step(model, step)

    def due(self, step: int) -> bool:
        return self.set.due(step)

    def after_step(self, model, x, y, optimizer, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        out = self.set.after_step(model, (x, y), optimizer, step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        out["monitor_time"] = self.seconds
        return out

    def has_readings(self, wait: bool = False) -> bool:
        """Whether :meth:`pop_readings` with this ``wait`` returns anything (background checks)."""
        return self.set.has_readings(wait)

    def pop_readings(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        """The collected background checks (:meth:`sgdlab.monitors.MonitorSet.pop_readings`); the time spent
        waiting for them is monitor time."""
        t0 = time.perf_counter()
        out = self.set.pop_readings(wait=wait)
        self.seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.set.close()

    def state_dict(self) -> dict:
        return {"monitors": self.set.state_dict(), "seconds": self.seconds}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.set.load_state_dict(state.get("monitors", {}))
            self.seconds = float(state.get("seconds", 0.0))


def build_monitors(cfg: Config, ds, device: torch.device, loss_fn, *, seed: int | None = None,
                   batch_size: int | None = None) -> RunMonitors | None:
    """The run's monitors (None when ``monitors:`` is empty); ConfigError naming ``monitors[i]``."""
    if not cfg.monitors:
        return None
    x_all, y_all = ds.train_x, ds.train_y
    n = len(y_all)
    seed = cfg.seed if seed is None else seed
    built = []
    for i, m in enumerate(cfg.monitors):
        opts = m.extras()
        size = m.probe if m.probe is not None else DEFAULT_PROBE.get(m.name)
        if size == "batch":
            size = int(batch_size or cfg.sampler.batch_size)
        probe = None
        if m.name == "importance":
            pool = n if not size else min(size, n)
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 + i))[:pool]
            probe = (x_all[idx.to(x_all.device)].to(device), y_all[idx.to(y_all.device)].to(device))
            opts.setdefault("batch", int(batch_size or cfg.sampler.batch_size))
            opts.setdefault("presample", int(cfg.sampler.extras().get("presample", 5 * opts["batch"])))
            opts["loss"] = loss_fn.per_example_name
        elif size:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 + i))[:min(size, n)]
            probe = (x_all[idx.to(x_all.device)].to(device), y_all[idx.to(y_all.device)].to(device))
        if m.name in ("sharpness", "importance"):
            opts.setdefault("seed", seed)
        if probe is not None:
            opts["probe"] = probe
        try:
            built.append(mon.create(m.name, every=m.every, **opts))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"monitors[{i}] ({m.name}): {e}") from None
    return RunMonitors(built, loss_fn, device)


class DataLoss:
    """The trained data loss as a monitor's ``loss_fn(logits, y)``: the mean per-example loss."""

    def __init__(self, per_example, name: str, label_smoothing: float):
        self.per_example, self.name, self.label_smoothing = per_example, name, float(label_smoothing)
        # the per-example loss importance scores differentiate (sgdlab.sampling.importance conventions)
        self.per_example_name = name if label_smoothing == 0 else self._smoothed

    def _smoothed(self, logits, y):
        return self.per_example(self.name, logits, y, self.label_smoothing)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_example(self.name, logits.float(), y, self.label_smoothing).mean()


def mlflow_logger(cfg: Config, run_dir: Path, *, resume: bool) -> Any:
    """The run's :class:`~sgdlab.monitors.mlflow.MlflowLogger` when ``log.mlflow`` is set, else None.

    ``true`` puts the file store in ``<run>/mlruns``; a string is that folder or a tracking URI. The
    MLflow run id is kept in ``<run>/mlflow_run_id`` so that a resume continues the same MLflow run.
    """
    target = cfg.log.mlflow
    if target is False:
        return None
    from ..monitors.mlflow import MlflowLogger

    where = run_dir / "mlruns" if target is True else target
    id_file = run_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    try:
        logger = MlflowLogger(where, experiment=cfg.name or "sgdlab", run_name=run_dir.resolve().name,
                              params=None if run_id else config_to_dict(cfg), run_id=run_id)
    except ImportError as e:
        raise ConfigError(f"log.mlflow: {e}") from None
    id_file.write_text(logger.run_id + "\n")
    return logger
