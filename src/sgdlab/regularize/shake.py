"""Shake-Shake regularization: a stochastic affine blend of two branches.

Gastaldi, "Shake-Shake regularization" (2017), eq. (2) and section 2.1.2; Table 4 (update rules
M1-M5 for the backward coefficient); Table 5 (narrowed forward ranges).

During training the forward pass computes ``a * x1 + (1 - a) * x2`` while the backward pass sends
``b * g`` to ``x1`` and ``(1 - b) * g`` to ``x2`` with a coefficient ``b`` drawn independently of
``a`` (or derived from it). At evaluation both branches get the expected weight 0.5.

The op is written without a custom autograd function, as the exact identity::

    out = x2 + b * (x1 - x2) + ((a - b) * (x1 - x2)).detach()

whose value is ``a * x1 + (1 - a) * x2`` (up to rounding) and whose gradient is exactly
``b * g`` / ``(1 - b) * g``. It therefore works unchanged under ``torch.compile``, autocast,
DDP, double backward of the branches, any dtype and any device.

Inside a keyed context (``with sgdlab.regularize.keyed(seed, step, indices): model(x)``, see
:mod:`sgdlab.keyed`) the coefficients are keyed instead of streamed: the shake calls of a batch consume
consecutive draws of the keyed stream ``shake``: example ``i``'s coefficients in the ``k``-th call are a
pure function of (seed, ``shake``, step, ``indices[i]``, the draw numbers of call ``k``) at
``level="image"``, and of (seed, ``shake``, step, draw numbers) at ``level="batch"``, so a data-parallel
run draws the same coefficients for an example at any world size.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .. import keyed as _keyed
from ._rng import uniform

__all__ = ["shake", "Shake", "draw_coefficients", "FORWARD_MODES", "BACKWARD_MODES", "LEVELS", "RULES"]

FORWARD_MODES = ("shake", "even")
BACKWARD_MODES = ("shake", "even", "keep")
LEVELS = ("image", "batch")
RULES = ("M1", "M2", "M3", "M4", "M5")
_SHAKE_STREAM = _keyed.stream_id("shake")


def _check_range(alpha_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in alpha_range)
    except (TypeError, ValueError):
        raise ValueError(f"alpha_range must be a pair (lo, hi) of numbers, got {alpha_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise ValueError(f"alpha_range must lie inside [0, 1], got {alpha_range!r}")
    if lo > hi:
        raise ValueError(f"alpha_range must have lo <= hi, got {alpha_range!r}")
    return lo, hi


def _check_settings(forward: str, backward: str, level: str, rule: str | None, alpha_range):
    if forward not in FORWARD_MODES:
        raise ValueError(f"forward must be one of {FORWARD_MODES}, got {forward!r}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if rule is not None and rule not in RULES:
        raise ValueError(f"rule must be None or one of {RULES}, got {rule!r}")
    return _check_range(alpha_range)


def _keyed_rand(shape, like: torch.Tensor, keys: _keyed.Keys, level: str) -> torch.Tensor:
    """The ``(count,) + shape`` uniforms of one shake call from the active keys (see the module docstring)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    count = shape[0]
    if level == "image":
        keys.check_rows(like.shape[0], "shake")
        return keys.next_uniform(_SHAKE_STREAM, count, device=like.device, dtype=dtype).T.reshape(shape)
    return keys.next_batch_uniform(_SHAKE_STREAM, count, device=like.device, dtype=dtype).reshape(shape)


def _rand(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Draw in float32 (float64 for float64 inputs) on the input's device, then cast to its dtype:
    # identical to drawing in the input's dtype for float32/float64, and avoids the coarse grid of
    # a direct bfloat16/float16 draw.
    # With a generator the draw goes through sgdlab's capturable op while compiling, so
    # torch.compile(fullgraph=True) holds the whole blend (see sgdlab.regularize._rng).
    draw_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if generator is not None and not torch.compiler.is_compiling() and generator.device.type != like.device.type:
        raise ValueError(f"generator is on {generator.device}, but the inputs are on {like.device}")
    return uniform(shape, generator, like=like, dtype=draw_dtype)


def draw_coefficients(like: torch.Tensor, *, forward: str = "shake", backward: str = "shake",
                      level: str = "image", rule: str | None = None,
                      alpha_range: Sequence[float] = (0.0, 1.0),
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the forward coefficient ``a`` and backward coefficient ``b`` for :func:`shake`.

    Returns float tensors of shape ``(N, 1, ..., 1)`` (``level="image"``, one per example) or
    ``(1, ..., 1)`` (``level="batch"``), on ``like``'s device, in float32 (float64 for float64
    inputs). ``a ~ U(lo, hi)`` or 0.5; ``b`` from ``backward`` or, when ``rule`` is given, from the
    Table 4 rule with ``u ~ U(0, 1)`` (Gastaldi 2017, section 4). Inside a keyed context
    (:mod:`sgdlab.keyed`) the uniforms are keyed by the batch's example indices and ``generator`` is not
    used:

    - M1: ``1 - a``
    - M2: ``u * a`` if ``a < 0.5`` else ``u * (1 - a) + a``
    - M3: ``u * (0.5 - a) + a`` if ``a < 0.5`` else ``u * (a - 0.5) + 0.5``
    - M4: ``u * (0.5 - a) + 0.5`` if ``a < 0.5`` else ``u * (0.5 - (1 - a)) + (1 - a)``
    - M5: ``u * a + (1 - a)`` if ``a < 0.5`` else ``u * (1 - a)``
    """
    lo, hi = _check_settings(forward, backward, level, rule, alpha_range)
    if level == "image":
        if like.dim() < 1:
            raise ValueError("level='image' needs inputs with a batch dimension")
        shape = (like.shape[0],) + (1,) * (like.dim() - 1)
    else:
        shape = (1,) * like.dim()
    # All the uniforms of one call come from a single draw (rows: a, then b or u), so a compiled graph
    # cannot reorder them against each other.
    second = (rule is None and backward == "shake") or rule not in (None, "M1")
    count = int(forward == "shake") + int(second)
    keys = _keyed.current()
    if not count:
        draws = iter(())
    elif keys is not None:
        draws = iter(_keyed_rand((count,) + shape, like, keys, level).unbind(0))
    else:
        draws = iter(_rand((count,) + shape, like, generator).unbind(0))
    if forward == "shake":
        a = next(draws)
        if lo != 0.0 or hi != 1.0:
            a = a * (hi - lo) + lo
    else:
        a = torch.full(shape, 0.5, device=like.device,
                       dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
    if rule is None:
        if backward == "shake":
            b = next(draws)
            if lo != 0.0 or hi != 1.0:
                b = b * (hi - lo) + lo
        elif backward == "even":
            b = torch.full_like(a, 0.5)
        else:  # keep
            b = a
        return a, b
    if rule == "M1":
        return a, 1.0 - a
    u = next(draws)
    low = a < 0.5
    if rule == "M2":
        b = torch.where(low, u * a, u * (1.0 - a) + a)
    elif rule == "M3":
        b = torch.where(low, u * (0.5 - a) + a, u * (a - 0.5) + 0.5)
    elif rule == "M4":
        b = torch.where(low, u * (0.5 - a) + 0.5, u * (a - 0.5) + (1.0 - a))
    else:  # M5
        b = torch.where(low, u * a + (1.0 - a), u * (1.0 - a))
    return a, b


def shake(x1: torch.Tensor, x2: torch.Tensor, *, forward: str = "shake", backward: str = "shake",
          level: str = "image", rule: str | None = None, alpha_range: Sequence[float] = (0.0, 1.0),
          training: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shake-Shake combination of two branch outputs (Gastaldi 2017, eq. 2 and Fig. 1).

    Training: the value is ``a * x1 + (1 - a) * x2``; the gradient reaching ``x1`` is ``b * g`` and
    the one reaching ``x2`` is ``(1 - b) * g``.

    Args:
        x1, x2: branch outputs of the same shape (batch first for ``level="image"``).
        forward: ``"shake"`` (``a ~ U(lo, hi)``) or ``"even"`` (``a = 0.5``).
        backward: ``"shake"`` (fresh ``b ~ U(lo, hi)``), ``"even"`` (``b = 0.5``) or ``"keep"``
            (``b = a``). Ignored when ``rule`` is given.
        level: ``"image"`` (one coefficient per example, shape ``(N, 1, ..., 1)``) or ``"batch"``
            (one scalar for the whole batch).
        rule: ``None`` or one of ``"M1"`` ... ``"M5"`` (Table 4): ``b`` derived from ``a``, see
            :func:`draw_coefficients`.
        alpha_range: ``(lo, hi)`` with ``0 <= lo <= hi <= 1`` (Table 5 narrows it, e.g.
            ``(0.4, 0.6)``). ``lo == hi`` is allowed and gives the constant ``lo``.
        training: required: ``True`` shakes, ``False`` returns the evaluation blend ``0.5 * (x1 + x2)``.
            Inside a module's ``forward`` pass ``training=self.training`` (the :class:`Shake` module does),
            so a model in ``eval()`` is never shaken by accident.
        generator: optional ``torch.Generator`` on the inputs' device; the global RNG if ``None``. With a
            generator the op still compiles with ``torch.compile(fullgraph=True)`` and draws the same
            numbers as in eager mode.

    Coefficients are drawn on the inputs' device (in float32, float64 for float64 inputs) and
    cast to the inputs' dtype. Raises ValueError for unknown modes, levels or rules, an
    ``alpha_range`` outside ``[0, 1]`` or with ``lo > hi``, mismatched shapes, and integer or bool inputs.
    """
    lo, hi = _check_settings(forward, backward, level, rule, alpha_range)
    if training is None:
        raise ValueError("shake: pass training= explicitly (training=self.training inside a module's forward; "
                         "the Shake module does it), so that a model in eval() is never shaken")
    if not isinstance(training, bool):  # a string such as "no" would be truthy and shake
        raise ValueError(f"shake: training must be True or False, got {training!r}")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if not (x1.is_floating_point() and x2.is_floating_point()):  # a blend of branch outputs is real-valued
        raise ValueError(f"shake: x1 and x2 must be floating-point tensors (branch outputs), got {x1.dtype} and "
                         f"{x2.dtype}")
    if not training or (forward == "even" and backward == "even" and rule is None):
        return (x1 + x2) * 0.5
    a, b = draw_coefficients(x1, forward=forward, backward=backward, level=level, rule=rule,
                             alpha_range=(lo, hi), generator=generator)
    dtype = torch.promote_types(x1.dtype, x2.dtype)
    if b is a:  # backward "keep" (or forward even + backward even): plain differentiable blend
        a = a.to(dtype)
        return torch.lerp(x2, x1, a) if x1.dtype == x2.dtype else x2 + a * (x1 - x2)
    a = a.to(dtype)
    b = b.to(dtype)
    if x1.dtype == x2.dtype and not torch.compiler.is_compiling():
        # Eager fast path, same identity with fewer kernels: the graph records lerp(x2, x1, b)
        # (gradient b*g / (1-b)*g), whose value is then overwritten in place, outside autograd, with
        # lerp(x2, x1, a). lerp's backward does not read its output, so the overwrite is legal.
        out = torch.lerp(x2, x1, b)
        with torch.no_grad():
            torch.lerp(x2, x1, a, out=out.detach())
        return out
    d = x1 - x2
    out = torch.addcmul(x2, b, d)
    return out + ((a - b) * d).detach()


class Shake(nn.Module):
    """Module form of :func:`shake` with the same settings (forward, backward, level, rule, alpha_range).

    Applies the shake blend while ``self.training`` is true and the 0.5/0.5 average in eval mode
    (Gastaldi 2017, section 1.2). ``generator`` (optional) is used for every draw.
    """

    def __init__(self, forward: str = "shake", backward: str = "shake", level: str = "image",
                 rule: str | None = None, alpha_range: Sequence[float] = (0.0, 1.0),
                 generator: torch.Generator | None = None):
        super().__init__()
        lo, hi = _check_settings(forward, backward, level, rule, alpha_range)
        self.forward_mode = forward
        self.backward_mode = backward
        self.level = level
        self.rule = rule
        self.alpha_range = (lo, hi)
        self.generator = generator
        # even/even (or keep with even) is the plain average: skip the random machinery entirely
        self._plain = forward == "even" and rule is None and backward in ("even", "keep")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if self._plain or not self.training:
            if x1.shape != x2.shape:
                raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} "
                                 f"and {tuple(x2.shape)}")
            return (x1 + x2) * 0.5
        return shake(x1, x2, forward=self.forward_mode, backward=self.backward_mode, level=self.level,
                     rule=self.rule, alpha_range=self.alpha_range, training=True, generator=self.generator)

    def extra_repr(self) -> str:
        rule = f", rule={self.rule!r}" if self.rule else ""
        return (f"forward={self.forward_mode!r}, backward={self.backward_mode!r}, level={self.level!r}"
                f"{rule}, alpha_range={self.alpha_range}")
