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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
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

    def __init__(self, every: int = 100, *, probe: Batch | None = None, prefix: str | None = None):
        self.every = _check_every(every)
        self.probe = _check_probe(probe)
        self.prefix = self.kind if prefix is None else str(prefix)

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

    def before_step(self, model: nn.Module, step: int) -> None:
        for m in self.monitors:
            m.before_step(model, step)

    def after_step(self, model: nn.Module, batch: Batch | None, optimizer: Any, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.monitors:
            out.update(m(model, self.loss_fn, batch, optimizer, step))
        return out

    def due(self, step: int) -> bool:
        return any(m.due(step) for m in self.monitors)

    def state_dict(self) -> dict:
        return {m.prefix: m.state_dict() for m in self.monitors}

    def load_state_dict(self, state: Mapping) -> None:
        for m in self.monitors:
            if m.prefix in state:
                m.load_state_dict(state[m.prefix])

    def __len__(self) -> int:
        return len(self.monitors)

    def __iter__(self):
        return iter(self.monitors)


def finite_or_nan(x: float) -> float:
    return float(x) if math.isfinite(x) else float("nan")
