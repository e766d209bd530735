"""Random Gradient: multiply the data loss by a random factor (Wei, "Random Gradient", section 4).

The paper's recipe is ``loss_random = loss * random()``: one factor ``u ~ U[0, 1)`` per mini-batch,
so every gradient of the step is scaled by ``u`` while the learning rate stays unchanged, and
momentum is meant to make up for the shrunken steps (sections 3-4, Fig. 5). The authors'
segmentation code applies the factor only with probability 0.5 per step, and an early version
used a deterministic triangular (cyclical) factor instead of a random one; a constant weight
(the paper's contrast, weight 3, Fig. 5 bottom right) is ``low = high = 3``.

The factor scales the data loss only. Weight decay must stay in the optimizer (e.g.
``torch.optim.SGD(weight_decay=...)``): adding an L2 term to the loss before this transform would
scale the regularizer too.

Inside a keyed context (:mod:`sgdlab.keyed`, ``with sgdlab.regularize.keyed(seed, step, indices)``)
the draws are keyed instead of streamed: a per-sample factor is a pure function of (the transform's
seed, step, example index), a per-batch factor of (seed, step), so a data-parallel run draws the same
factors at any world size; the generator is not used there.
"""

from __future__ import annotations

import math

import torch

from .. import keyed as _keyed
from ..seeding import check_seed, torch_seed
from ._rng import uniform
from .base import register_loss_transform

__all__ = ["RandomGradient", "triangular_factor"]

SCHEDULES = (None, "triangular")
PERIOD_UNITS = ("steps", "epochs")
_RG_STREAM = _keyed.stream_id("random_gradient")


def triangular_factor(t: float, period: float, low: float, high: float) -> float:
    """Triangular cyclical factor at time ``t`` (steps or epochs).

    ``f(t) = low + (high - low) * (1 - |2 * frac(t / period) - 1|)``, where ``frac`` is the
    fractional part: ``f`` starts at ``low`` at ``t = 0``, rises linearly to ``high`` at
    ``t = period / 2`` and falls back to ``low`` at ``t = period`` (Smith's triangular cyclical
    policy with a full cycle of ``period``).
    """
    x = t / period
    frac = x - math.floor(x)
    return low + (high - low) * (1.0 - abs(2.0 * frac - 1.0))


class RandomGradient:
    """Loss transform ``losses -> factor * losses`` (Wei, "Random Gradient", section 4).

    With probability ``p`` the factor is ``u ~ U(low, high)`` (or, with ``schedule="triangular"``,
    the deterministic :func:`triangular_factor` at the current step/epoch), otherwise 1.

    Args:
        low, high: range of the factor, ``low <= high`` (``low == high`` gives a constant factor,
            e.g. 3 for the paper's fixed loss weight).
        p: probability that the factor is applied on a call (per example when ``per_sample``).
        per_sample: one factor per element of the loss vector instead of one per call (batch); the
            loss must then be the per-example vector (``reduction="none"``): a scalar raises ValueError.
        schedule: ``None`` (random factor) or ``"triangular"``.
        period: full cycle length of the triangular schedule, in ``period_unit``.
        period_unit: ``"steps"`` (uses ``step=`` when given, else the number of previous calls)
            or ``"epochs"`` (needs ``epoch=`` on every call).
        seed: seed of the transform's own ``torch.Generator`` (a fixed stream; in a keyed context the key of
            its draws); ``None`` draws one from
            torch's global generator, so two transforms get independent streams and a script seeded with
            ``torch.manual_seed`` is still reproducible. The seed in use is :attr:`seed`.

    Usable in any loop: ``loss = rg(criterion(out, y))``; the draw compiles with
    ``torch.compile(fullgraph=True)``. Implements the ``LossTransform`` protocol:
    ``state_dict``/``load_state_dict`` (tensors and plain numbers only, loadable with
    ``torch.load(weights_only=True)``), ``last_factor`` (tensor of the last call's factors) and
    ``metrics() -> {"rg_factor": mean factor of the last call}``.
    """

    def __init__(self, low: float = 0.0, high: float = 1.0, *, p: float = 1.0, per_sample: bool = False,
                 schedule: str | None = None, period: float | None = None, period_unit: str = "steps",
                 seed: int | None = None):
        low, high, p = float(low), float(high), float(p)
        if not math.isfinite(low):
            raise ValueError(f"low must be finite, got {low!r}")
        if not math.isfinite(high):
            raise ValueError(f"high must be finite, got {high!r}")
        if low > high:
            raise ValueError(f"low must be <= high, got low={low} > high={high}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be None or 'triangular', got {schedule!r}")
        if period_unit not in PERIOD_UNITS:
            raise ValueError(f"period_unit must be one of {PERIOD_UNITS}, got {period_unit!r}")
        if schedule == "triangular":
            if period is None:
                raise ValueError("period is required with schedule='triangular'")
            period = float(period)
            if not (math.isfinite(period) and period > 0):
                raise ValueError(f"period must be a positive number, got {period!r}")
        elif period is not None:
            raise ValueError("period is only used with schedule='triangular'")
        if seed is not None:
            seed = check_seed(seed)
        self.low, self.high, self.p = low, high, p
        self.per_sample = bool(per_sample)
        self.schedule = schedule
        self.period = period
        self.period_unit = period_unit
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))  # from the global generator: independent streams
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(torch_seed(self.seed))
        self.calls = 0
        self.last_factor: torch.Tensor | None = None

    def _factor(self, shape, step, epoch, losses: torch.Tensor) -> torch.Tensor:
        like = losses if losses.device.type == "cpu" else losses.cpu()  # the generator is a CPU one
        # One draw per call (rows: the factor, then the keep test), so a compiled graph cannot reorder them.
        random = self.schedule is None and self.low != self.high
        count = int(random) + int(self.p < 1.0)
        keys = _keyed.current()
        if not count:
            draws = iter(())
        elif keys is None:
            draws = iter(uniform((count,) + tuple(shape), self.generator, like=like,
                                 dtype=torch.float64).unbind(0))
        elif self.per_sample:
            if len(shape) != 1:
                raise ValueError(f"RandomGradient(per_sample=True) in a keyed context needs the per-example loss "
                                 f"vector (N,), got shape {tuple(shape)}")
            keys.check_rows(shape[0], "RandomGradient")
            draws = iter(keys.next_uniform(_RG_STREAM, count, dtype=torch.float64, seed=self.seed).T.unbind(0))
        else:
            draws = iter(keys.next_batch_uniform(_RG_STREAM, count, dtype=torch.float64, seed=self.seed).unbind(0))
        if self.schedule == "triangular":
            if self.period_unit == "epochs":
                if epoch is None:
                    raise ValueError("epoch is required with period_unit='epochs'")
                t = float(epoch)
            else:
                t = float(self.calls if step is None else step)
            value = torch.full(shape, triangular_factor(t, self.period, self.low, self.high),
                               dtype=torch.float64)
        elif random:
            value = self.low + (self.high - self.low) * next(draws)
        else:
            value = torch.full(shape, self.low, dtype=torch.float64)
        if self.p < 1.0:
            value = torch.where(next(draws) < self.p, value, torch.ones_like(value))
        return value

    def __call__(self, losses: torch.Tensor, *, step: int | None = None,
                 epoch: float | None = None) -> torch.Tensor:
        """Return ``factor * losses`` (same shape); one factor per call, or per element if ``per_sample``."""
        if not torch.is_tensor(losses):
            raise ValueError(f"losses must be a tensor, got {type(losses).__name__}")
        if self.per_sample and losses.dim() == 0:
            raise ValueError("per_sample=True needs the per-example loss vector (e.g. reduction='none'), "
                             "got a scalar loss")
        shape = tuple(losses.shape) if self.per_sample else ()
        factor = self._factor(shape, step, epoch, losses)
        self.calls += 1
        self.last_factor = factor
        dtype = losses.dtype if losses.is_floating_point() else torch.get_default_dtype()
        return losses * factor.to(device=losses.device, dtype=dtype)

    def metrics(self) -> dict[str, float]:
        """``{"rg_factor": mean factor of the last call}`` (empty before the first call)."""
        if self.last_factor is None:
            return {}
        return {"rg_factor": float(self.last_factor.mean())}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "calls": self.calls, "generator": self.generator.get_state(),
                "last_factor": self.last_factor}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.calls = int(state["calls"])
        self.generator.set_state(state["generator"])
        self.last_factor = state.get("last_factor")

    def __repr__(self) -> str:
        extra = f", schedule={self.schedule!r}, period={self.period}, period_unit={self.period_unit!r}" \
            if self.schedule else ""
        return (f"RandomGradient(low={self.low}, high={self.high}, p={self.p}, per_sample={self.per_sample}"
                f"{extra}, seed={self.seed})")


@register_loss_transform("random_gradient")
def _random_gradient_factory(*, seed: int, **options) -> RandomGradient:
    return RandomGradient(seed=seed, **options)
