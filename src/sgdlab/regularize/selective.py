"""Selective backprop: train only on the highest-loss fraction of each mini-batch (a biased alternative).

Listed by the importance-sampling paper's discussion (Katharopoulos & Fleuret, ICML 2018, section 2)
among loss-based heuristics, and studied as "selective backprop" by Jiang et al. (2019, "Accelerating
deep learning by focusing on the biggest losers"). Here it is the deterministic variant: of the ``n``
per-example losses of a batch keep the ``k = ceil(keep * n)`` largest. Unlike importance sampling with
``1 / (B g_i)`` weights, this is **biased**: the gradient is that of the mean loss over the hardest
examples, not of the data loss.

Two ways to run it:

- ``method="mask"`` (the default): a loss transform on the training forward's per-example losses; the
  others are zeroed, so nothing is saved (the whole batch is forwarded with autograd and backpropagated).
- ``method="select"`` (the way practitioners run it, e.g. MosaicML Composer's ``SelectiveBackprop``):
  :meth:`SelectiveBackprop.select` scores the batch with a no-grad forward, optionally on images
  downscaled by ``scale_factor``, and the training forward and backward run on the kept ``k`` examples only.

Composer's knobs: active only while ``start <= t / T < end`` (fractions of the run), and every
``interrupt``-th step trains on the full batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .base import register_loss_transform

__all__ = ["SelectiveBackprop"]

METHODS = ("mask", "select")


class SelectiveBackprop:
    """Keep the highest-loss ``keep`` fraction of each batch (biased; see the module docstring).

    Args:
        keep: fraction ``f`` in (0, 1] kept; ``k = max(1, ceil(f * n))`` of ``n``. ``fraction`` is an alias.
        start, end: the method is active while ``start <= progress < end``, ``progress`` the fraction of the
            run done (default the whole run, ``[0, 1]``; the end is inclusive when ``end = 1``).
        interrupt: every ``interrupt``-th step (``(step + 1) % interrupt == 0``) trains on the full batch;
            0 never (Composer's rule).
        scale_factor: in (0, 1]; the scoring forward of ``method="select"`` runs on images downscaled by
            this factor (bilinear; inputs of shape ``(n, C, H, W)`` or ``(n, C, L)``).
        method: ``"mask"`` (loss transform) or ``"select"`` (score, then train on the kept examples).

    As a loss transform: ``losses -> losses * mask * n / k`` with ``mask`` on the ``k`` largest entries
    (ties broken by ``torch.topk``): the mean of the result is the mean loss over the kept examples;
    identity while inactive, and always with ``method="select"`` (the selection already happened).
    ``metrics() -> {"sb_kept": k, "sb_threshold": smallest kept loss}`` (``sb_kept = n`` while inactive);
    :attr:`selection_forwards` counts the scoring forwards in forward-equivalents (``n * scale_factor**d``
    for ``d`` spatial dimensions: a forward's cost taken as proportional to the pixels).
    """

    wants_progress = True

    def __init__(self, keep: float | None = None, *, fraction: float | None = None, start: float = 0.0,
                 end: float = 1.0, interrupt: int = 0, scale_factor: float = 1.0, method: str = "mask"):
        if keep is not None and fraction is not None:
            raise ValueError("give keep or its alias fraction, not both")
        keep = 0.5 if keep is None and fraction is None else float(keep if keep is not None else fraction)
        if not (0.0 < keep <= 1.0):
            raise ValueError(f"keep (fraction) must be in (0, 1], got {keep}")
        start, end = float(start), float(end)
        if not (0.0 <= start < end <= 1.0):
            raise ValueError(f"start and end must satisfy 0 <= start < end <= 1, got start={start}, end={end}")
        if isinstance(interrupt, bool) or not isinstance(interrupt, int) or interrupt < 0:
            raise ValueError(f"interrupt must be a non-negative integer (0: never), got {interrupt!r}")
        scale_factor = float(scale_factor)
        if not (0.0 < scale_factor <= 1.0):
            raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if scale_factor != 1.0 and method != "select":
            raise ValueError("scale_factor < 1 needs method='select' (the scoring forward is separate)")
        self.fraction = keep
        self.start, self.end, self.interrupt = start, end, interrupt
        self.scale_factor, self.method = scale_factor, method
        self.selection_forwards = 0.0
        self._last: dict[str, float] = {}

    @property
    def keep(self) -> float:
        """The kept fraction (same as ``fraction``)."""
        return self.fraction

    def kept(self, n: int) -> int:
        """Number of examples kept out of ``n``."""
        return max(1, min(n, math.ceil(self.fraction * n - 1e-9)))

    def active(self, step: int | None, progress: float | None) -> bool:
        """Whether step ``step`` at run fraction ``progress`` selects: in the window and not an interrupt step."""
        p = 0.0 if progress is None else float(progress)
        in_window = self.start <= p and (p < self.end or (self.end == 1.0 and p <= 1.0))
        if not in_window:
            return False
        return not (self.interrupt and step is not None and (step + 1) % self.interrupt == 0)

    def _top(self, losses: torch.Tensor) -> torch.Tensor:
        n = losses.numel()
        k = self.kept(n)
        top = torch.topk(losses.detach(), k, sorted=False)
        self._last = {"sb_kept": float(k), "sb_threshold": float(top.values.min())}
        return top.indices

    def __call__(self, losses: torch.Tensor, *, step: int | None = None, epoch: float | None = None,
                 progress: float | None = None) -> torch.Tensor:
        if not torch.is_tensor(losses) or losses.ndim != 1 or losses.numel() == 0:
            raise ValueError("SelectiveBackprop needs a non-empty 1-D tensor of per-example losses, got "
                             f"{getattr(losses, 'shape', type(losses).__name__)}")
        if self.method == "select":
            return losses
        n = losses.numel()
        if not self.active(step, progress):
            self._last = {"sb_kept": float(n)}
            return losses
        idx = self._top(losses)
        mask = torch.zeros_like(losses)
        mask[idx] = n / idx.numel()
        return losses * mask

    def select(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, step: int | None = None,
               progress: float | None = None) -> torch.Tensor | None:
        """Positions in the batch to train on (the ``k`` largest scoring losses), or None for the full batch.

        Runs a no-grad forward of ``model`` (in its current mode, as Composer does) on ``x`` (downscaled by
        ``scale_factor``), ``loss_fn(logits, y)`` giving per-example losses. None while inactive.
        """
        n = int(y.shape[0])
        if not self.active(step, progress):
            self._last = {"sb_kept": float(n)}
            return None
        xs = x
        if self.scale_factor != 1.0:
            if x.dim() not in (3, 4):
                raise ValueError(f"scale_factor needs images (n, C, H, W) or signals (n, C, L), got {tuple(x.shape)}")
            mode = "bilinear" if x.dim() == 4 else "linear"
            xs = F.interpolate(x, scale_factor=self.scale_factor, mode=mode, align_corners=False)
        with torch.no_grad():
            losses = loss_fn(model(xs).float(), y).detach().reshape(-1)
        self.selection_forwards += n * self.scale_factor ** max(x.dim() - 2, 0)
        return self._top(losses).sort().values

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"fraction": self.fraction, "selection_forwards": self.selection_forwards}

    def load_state_dict(self, state: dict) -> None:
        self.fraction = float(state["fraction"])
        self.selection_forwards = float(state.get("selection_forwards", 0.0))

    def __repr__(self) -> str:
        return (f"SelectiveBackprop(keep={self.fraction}, start={self.start}, end={self.end}, "
                f"interrupt={self.interrupt}, scale_factor={self.scale_factor}, method={self.method!r})")


@register_loss_transform("selective_backprop")
def _selective_backprop_factory(*, seed: int, keep: float | None = None, fraction: float | None = None,
                                start: float = 0.0, end: float = 1.0, interrupt: int = 0,
                                scale_factor: float = 1.0, method: str = "mask") -> SelectiveBackprop:
    return SelectiveBackprop(keep, fraction=fraction, start=start, end=end, interrupt=interrupt,
                             scale_factor=scale_factor, method=method)
