"""Learning-rate schedules as pure functions of the training position, and scaling rules.

A schedule maps the position ``t`` (in some unit: steps, epochs, a fraction of the run, or
seconds) and the run's length ``total`` (same unit) to a *factor* of the base learning rate.
Pure functions need no state to checkpoint: resuming at position ``t`` gives the same rate.

- constant: 1.
- multistep (SRS paper Table 3; WRN): ``factor ** (number of milestones <= t)``, e.g. milestones
  (60, 120, 160) with factor 0.2.
- cosine (Shake-Shake, after Loshchilov & Hutter's SGDR without restart): ``0.5 (1 + cos(pi t / total))``,
  stepped per iteration, reaching 0 at the end.
- poly (Random Gradient paper's recipe): ``(1 - t / total) ** power`` with power 0.9.
- triangular (cyclical, Smith 2017; the Random Gradient paper's early cyclical factor): rises
  linearly from ``low`` to 1 over half a ``period`` and back, repeating.
- gradual warmup (Goyal et al. 2017, lecture notes section on the linear scaling rule): over the
  first ``warmup`` units the factor rises linearly from ``warmup_from`` to the schedule's value.

:func:`lr_for_batch` is the linear scaling rule: multiply the batch size by k, multiply the learning
rate by k.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

__all__ = ["Schedule", "SCHEDULES", "lr_for_batch", "warmup_from_for_batch"]

SCHEDULES = ("constant", "multistep", "cosine", "poly", "triangular")


@dataclass(frozen=True)
class Schedule:
    """A learning-rate factor ``schedule(t)``; ``t`` and all lengths are in one unit.

    Args:
        name: one of ``constant``, ``multistep``, ``cosine``, ``poly``, ``triangular``.
        total: length of the run in the unit (needed by cosine and poly).
        milestones: multistep positions at which the rate is multiplied by ``factor``.
        factor: multistep multiplier (e.g. 0.1 or 0.2).
        power: poly exponent (0.9 in the Random Gradient recipe).
        period: triangular cycle length.
        low: triangular minimum factor.
        warmup: warmup length (0 for none); composes with every schedule.
        warmup_from: factor at ``t = 0`` during warmup (Goyal et al.: 1/k for a k-fold batch).
    """

    name: str = "constant"
    total: float | None = None
    milestones: tuple[float, ...] = field(default_factory=tuple)
    factor: float = 0.1
    power: float = 0.9
    period: float | None = None
    low: float = 0.0
    warmup: float = 0.0
    warmup_from: float = 0.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule name must be one of {SCHEDULES}, got {self.name!r}")
        if self.name in ("cosine", "poly") and (self.total is None or self.total <= 0):
            raise ValueError(f"schedule {self.name!r} needs total > 0, got {self.total!r}")
        if self.name == "triangular" and (self.period is None or self.period <= 0):
            raise ValueError(f"triangular schedule needs period > 0, got {self.period!r}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {list(self.milestones)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))

    def base(self, t: float) -> float:
        """The schedule's factor at ``t`` without warmup."""
        if self.name == "constant":
            return 1.0
        if self.name == "multistep":
            return self.factor ** bisect.bisect_right(self.milestones, t)
        frac = min(max(t / self.total, 0.0), 1.0) if self.total else 0.0
        if self.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.name == "poly":
            return (1.0 - frac) ** self.power
        # triangular: distance to the middle of the current cycle, mapped to [low, 1]
        cycle_pos = (t / self.period) % 1.0
        return self.low + (1.0 - self.low) * (1.0 - abs(2.0 * cycle_pos - 1.0))

    def __call__(self, t: float) -> float:
        f = self.base(t)
        if self.warmup > 0 and t < self.warmup:
            f = f * (self.warmup_from + (1.0 - self.warmup_from) * t / self.warmup)
        return f


def lr_for_batch(base_lr: float, base_batch: int, batch_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``base_lr * batch_size / base_batch``."""
    if base_batch <= 0 or batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got base_batch={base_batch}, batch_size={batch_size}")
    return base_lr * batch_size / base_batch


def warmup_from_for_batch(base_batch: int, batch_size: int) -> float:
    """Gradual-warmup start factor for a k-fold batch (k = batch_size / base_batch): 1/k, so warmup
    rises from the small-batch rate to k times it (Goyal et al. 2017)."""
    if base_batch <= 0 or batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got base_batch={base_batch}, batch_size={batch_size}")
    return min(1.0, base_batch / batch_size)
