"""Selective backprop: train only on the highest-loss fraction of each mini-batch (a biased alternative).

Listed by the importance-sampling paper's discussion (Katharopoulos & Fleuret, ICML 2018, section 2)
among loss-based heuristics, and studied as "selective backprop" by Jiang et al. (2019, "Accelerating
deep learning by focusing on the biggest losers"). Here it is the deterministic variant: of the ``n``
per-example losses of a batch keep the ``k = ceil(fraction * n)`` largest and zero the others. Unlike
importance sampling with ``1 / (B g_i)`` weights, this is **biased**: the gradient is that of the mean
loss over the hardest examples, not of the data loss.
"""

from __future__ import annotations

import math

import torch

from .base import register_loss_transform

__all__ = ["SelectiveBackprop"]


class SelectiveBackprop:
    """Loss transform keeping the highest-loss ``fraction`` of each batch (biased; see module docstring).

    ``losses -> losses * mask * n / k`` where ``mask`` marks the ``k = max(1, ceil(fraction * n))``
    largest entries (ties broken by ``torch.topk``): the zeroed examples send no gradient, and the mean
    of the result equals the mean loss over the kept examples. ``fraction = 1`` is the identity.
    Needs a vector of per-example losses (a scalar raises ValueError). Under the engine the losses are
    already multiplied by any sampling weights, so the selection is on weighted losses.

    ``metrics() -> {"sb_kept": k, "sb_threshold": smallest kept loss}``; stateless apart from the
    last metrics (``state_dict`` holds ``fraction``).
    """

    def __init__(self, fraction: float = 0.5):
        fraction = float(fraction)
        if not (0.0 < fraction <= 1.0):
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self._last: dict[str, float] = {}

    def kept(self, n: int) -> int:
        """Number of examples kept out of ``n``."""
        return max(1, min(n, math.ceil(self.fraction * n - 1e-9)))

    def __call__(self, losses: torch.Tensor, *, step: int | None = None,
                 epoch: float | None = None) -> torch.Tensor:
        if not torch.is_tensor(losses) or losses.ndim != 1 or losses.numel() == 0:
            raise ValueError("SelectiveBackprop needs a non-empty 1-D tensor of per-example losses, got "
                             f"{getattr(losses, 'shape', type(losses).__name__)}")
        n = losses.numel()
        k = self.kept(n)
        top = torch.topk(losses.detach(), k, sorted=False)
        mask = torch.zeros_like(losses)
        mask[top.indices] = n / k
        self._last = {"sb_kept": float(k), "sb_threshold": float(top.values.min())}
        return losses * mask

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"fraction": self.fraction}

    def load_state_dict(self, state: dict) -> None:
        self.fraction = float(state["fraction"])

    def __repr__(self) -> str:
        return f"SelectiveBackprop(fraction={self.fraction})"


@register_loss_transform("selective_backprop")
def _selective_backprop_factory(*, seed: int, fraction: float = 0.5) -> SelectiveBackprop:
    return SelectiveBackprop(fraction=fraction)
