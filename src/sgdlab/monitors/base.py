"""The monitor protocol: every ``every`` steps, measure the model and return named scalars.

A monitor is called after an optimizer step with the number of steps taken so far; when that number is
a multiple of its ``every`` it measures and returns a ``{name: float}`` dict, otherwise an empty one.
It gets the model, the loss function ``loss_fn(outputs, y)`` (the mean loss of a batch), the batch
just trained on and the optimizer (for the learning rate), and may hold a fixed *probe* batch of its own
(``probe=(x, y)``) so that its readings are comparable from one check to the next. Measurements use
:mod:`sgdlab.analysis` (model in eval mode, mode restored) and never touch the gradients or the
optimizer state of the training step.

Monitors that compare the weights before and after a step (the update-to-weight ratio) also implement
:meth:`Monitor.before_step`; :class:`MonitorSet` calls it for every monitor, so a plain loop needs
two calls per step::

    monitors = MonitorSet([Sharpness(every=10), GradientNoiseScale(every=10)], loss_fn=F.mse_loss)
    for step in range(steps):
        monitors.before_step(model, step)          # optional: only the norms monitor needs it
        ... forward, backward, opt.step() ...
        scalars = monitors.after_step(model, (x, y), opt, step + 1)   # {} between checks

A monitor that supports it (:class:`~sgdlab.monitors.Sharpness`) may run its checks in a worker thread
(``background=True``): the check measures a copy of the weights taken at its step while training goes on,
on a spare core when there is one. Its scalars are not in :meth:`MonitorSet.after_step`'s dict; they are
collected when the monitor next comes due (or when asked) and handed out, with the step they measured, by
:meth:`MonitorSet.pop_readings`::

        for measured_step, late in monitors.pop_readings():
            log(late, step=measured_step)
    for measured_step, late in monitors.pop_readings(wait=True):   # after the loop: the last checks
        log(late, step=measured_step)

Background checks hide the wall-clock cost of a check, not its CPU cost; they are for CPU models outside
``torch.distributed`` whose layers do not include attention (whose analysis switches process-wide kernel
flags that the training thread would see).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

__all__ = ["Monitor", "MonitorSet", "register", "create", "names", "optimizer_hparams"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a monitor available to :func:`create` (and the engine's ``monitors:`` key)."""

    def deco(cls):
        _REGISTRY[name] = cls
        cls.kind = name
        return cls

    return deco


def names() -> list[str]:
    """The registered monitor names."""
    return sorted(_REGISTRY)


def create(name: str, **options) -> Monitor:
    """The monitor registered as ``name``, built with ``options`` (``every=...`` and its own keywords)."""
    if name not in _REGISTRY:
        raise ValueError(f"monitor name must be one of {', '.join(names())}, got {name!r}")
    return _REGISTRY[name](**options)


def _check_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer (steps between checks), got {every!r}")
    return every


def _check_probe(probe: Any) -> Batch | None:
    if probe is None:
        return None
    if not (isinstance(probe, tuple | list) and len(probe) == 2
            and all(isinstance(t, torch.Tensor) for t in probe)):
        raise ValueError("probe must be an (x, y) pair of tensors or None (use the batch just trained on)")
    if probe[0].shape[0] != probe[1].shape[0] or probe[0].shape[0] == 0:
        raise ValueError(f"probe: x and y must hold the same positive number of examples, got "
                         f"{probe[0].shape[0]} and {probe[1].shape[0]}")
    return probe[0], probe[1]


def optimizer_hparams(optimizer: Any) -> tuple[float | None, float, bool]:
    """``(lr, momentum, nesterov)`` of the first parameter group (momentum 0 for optimizers without it)."""
    if optimizer is None:
        return None, 0.0, False
    group = optimizer.param_groups[0]
    lr = group.get("lr")
    lr = float(lr) if lr is not None else None
    return lr, float(group.get("momentum", 0.0) or 0.0), bool(group.get("nesterov", False))


class Monitor:
    """Base class of the monitors: ``every`` steps, :meth:`measure` returns named scalars.

    Subclasses implement :meth:`measure` (and optionally :meth:`before_step`, :meth:`state_dict`,
    :meth:`load_state_dict`). ``prefix`` starts every returned name (default: the registered name).
    """

    kind = "monitor"
    #: whether the checks may run in a worker thread on a copy of the weights (``background=True``): true for
    #: monitors that read only the weights, their probe or the batch, and the optimizer's hyper-parameters
    supports_background = False

    def __init__(self, every: int = 100, *, probe: Batch | None = None, prefix: str | None = None,
                 background: bool = False):
        self.every = _check_every(every)
        self.probe = _check_probe(probe)
        self.prefix = self.kind if prefix is None else str(prefix)
        if not isinstance(background, bool):
            raise ValueError(f"background must be true or false, got {background!r}")
        if background and not self.supports_background:
            raise ValueError(f"background: {type(self).__name__} cannot run its checks in the background (it reads "
                             "more than a copy of the weights, e.g. the gradients or the weights before a step)")
        self.background = background

    def due(self, step: int) -> bool:
        """True when ``step`` (optimizer steps taken) is a positive multiple of ``every``."""
        return step > 0 and step % self.every == 0

    def before_step(self, model: nn.Module, step: int) -> None:
        """Called before the optimizer step that will make ``step + 1`` steps; a no-op by default."""

    def measure(self, model: nn.Module, loss_fn: LossFn, batch: Batch | None, optimizer: Any, step: int) -> dict:
        raise NotImplementedError

    def __call__(self, model: nn.Module, loss_fn: LossFn, batch: Batch | None = None, optimizer: Any = None,
                 step: int = 0) -> dict[str, float]:
        """The scalars of a check at ``step`` (an empty dict between checks)."""
        if not self.due(step):
            return {}
        return {k: float(v) for k, v in self.measure(model, loss_fn, batch, optimizer, step).items()}

    def data(self, batch: Batch | None) -> Batch:
        """The probe batch if one was given, else ``batch`` (the one just trained on)."""
        if self.probe is not None:
            return self.probe
        if batch is None:
            raise ValueError(f"{type(self).__name__}: no probe batch was given and no batch was passed")
        return batch

    def key(self, name: str = "") -> str:
        return f"{self.prefix}_{name}" if name else self.prefix

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        del state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every})"


class MonitorSet:
    """Several monitors driven together from a training loop (see the module docstring).

    ``loss_fn`` is the mean loss of a batch, ``loss_fn(model(x), y)``. :meth:`after_step` returns the
    union of the scalars of the monitors due at that step.
    """

    def __init__(self, monitors: Iterable[Monitor], *, loss_fn: LossFn):
        self.monitors = list(monitors)
        kinds = [m.prefix for m in self.monitors]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise ValueError(f"monitors: two monitors would log under the same prefix {dup[0]!r}; give one a "
                             "prefix=")
        self.loss_fn = loss_fn
        self._pending: dict[str, tuple[int, Future]] = {}  # background check in flight, per monitor prefix
        self._readings: list[tuple[int, dict[str, float]]] = []  # collected, not yet handed out
        self._shadows: dict[str, nn.Module] = {}  # the weights a background check measures
        self._pool: ThreadPoolExecutor | None = None

    def before_step(self, model: nn.Module, step: int) -> None:
        for m in self.monitors:
            m.before_step(model, step)

    def after_step(self, model: nn.Module, batch: Batch | None, optimizer: Any, step: int) -> dict[str, float]:
        """The scalars of the monitors due at ``step``; a background monitor's check is started instead (its
        previous one is collected first, so one check per monitor is in flight)."""
        out: dict[str, float] = {}
        for m in self.monitors:
            if m.background and m.due(step):
                self._collect(m.prefix)
                self._launch(m, model, batch, optimizer, step)
            else:
                out.update(m(model, self.loss_fn, batch, optimizer, step))
        return out

    def pop_readings(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        """The background checks collected so far as ``(step measured, scalars)``, in step order, handed out
        once. A check is collected when its monitor next comes due; ``wait=True`` first waits for every check
        in flight (at a checkpoint, at the end). Which readings a call returns never depends on timing."""
        if wait:
            self._collect_all()
        out = sorted(self._readings, key=lambda r: r[0])
        self._readings = []
        return out

    def has_readings(self, wait: bool = False) -> bool:
        """Whether :meth:`pop_readings` called with this ``wait`` would return anything."""
        return bool(self._readings) or (wait and bool(self._pending))

    def refuse_background(self, where: str) -> None:
        """ValueError when a monitor asks for background checks that ``where`` cannot collect."""
        for m in self.monitors:
            if m.background:
                raise ValueError(f"background: {where} runs monitors at each step and logs what they return "
                                 f"then; {type(m).__name__}(background=True) is for the engine and plain loops "
                                 "(MonitorSet.pop_readings)")

    def _launch(self, m: Monitor, model: nn.Module, batch: Batch | None, optimizer: Any, step: int) -> None:
        shadow = self._shadows.get(m.prefix)
        if shadow is None:
            _check_background_model(model, type(m).__name__)
            shadow = copy.deepcopy(model)
            for p in shadow.parameters():
                p.grad = None
            self._shadows[m.prefix] = shadow
        with torch.no_grad():
            for dst, src in zip(shadow.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values()):
                dst.copy_(src)
        if m.probe is None and batch is not None:
            batch = (batch[0].detach().clone(), batch[1].detach().clone())
        lr, momentum, nesterov = optimizer_hparams(optimizer)
        hparams = None if optimizer is None else SimpleNamespace(
            param_groups=[{"lr": lr, "momentum": momentum, "nesterov": nesterov}])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgdlab-monitor")
        self._pending[m.prefix] = (step, self._pool.submit(_timed, m, shadow, self.loss_fn, batch, hparams, step))

    def _collect(self, prefix: str) -> None:
        if prefix not in self._pending:
            return
        step, future = self._pending.pop(prefix)
        try:
            scalars = future.result()
        except Exception as e:
            msg = f"the background check of {prefix!r} at step {step} failed: {e}"
            try:
                err = type(e)(msg)  # the same type, so that callers handle it as they would in the foreground
            except Exception:
                err = RuntimeError(msg)
            raise err from e
        self._readings.append((step, scalars))

    def _collect_all(self) -> None:
        for prefix in list(self._pending):
            self._collect(prefix)

    def close(self) -> None:
        """Wait for the checks in flight (their readings stay in :meth:`pop_readings`) and stop the worker."""
        self._collect_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def due(self, step: int) -> bool:
        return any(m.due(step) for m in self.monitors)

    def state_dict(self) -> dict:
        """The monitors' states, after every check in flight has been collected (a background check moves the
        state it starts from, such as the warm-start vector)."""
        self._collect_all()
        return {m.prefix: m.state_dict() for m in self.monitors}

    def load_state_dict(self, state: Mapping) -> None:
        for m in self.monitors:
            if m.prefix in state:
                m.load_state_dict(state[m.prefix])

    def __len__(self) -> int:
        return len(self.monitors)

    def __iter__(self):
        return iter(self.monitors)


def _timed(m: Monitor, model: nn.Module, loss_fn: LossFn, batch, optimizer, step: int) -> dict[str, float]:
    """One background check: the monitor's scalars and ``<prefix>_seconds``, the check's own wall time."""
    t0 = time.perf_counter()
    out = m(model, loss_fn, batch, optimizer, step)
    out[m.key("seconds")] = time.perf_counter() - t0
    return out


_ATTENTION = ("MultiheadAttention", "Transformer", "Attention")


def _check_background_model(model: nn.Module, who: str) -> None:
    """Refuse what a worker thread cannot measure without touching the training thread."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        raise ValueError(f"background: {who} under torch.distributed would all-reduce from a second thread, "
                         "out of order with the training step's collectives; use background=False")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"background: {who} runs beside training on CPU models only (on "
                         f"{'/'.join(sorted(devices - {'cpu'}))} the products would queue behind the training "
                         "kernels); use background=False")
    for name, sub in model.named_modules():
        if any(a in type(sub).__name__ for a in _ATTENTION):
            raise ValueError(f"background: {who} cannot measure a model with attention ({name or 'model'}: "
                             f"{type(sub).__name__}) in the background: its double backward switches "
                             "process-wide attention kernels that the training thread would run with; use "
                             "background=False")


def finite_or_nan(x: float) -> float:
    return float(x) if math.isfinite(x) else float("nan")
