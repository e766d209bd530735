"""Correlation between the two residual branches of shake blocks (Gastaldi 2017, section 3, Figs. 3-4).

For every block with two branches (any module exposing ``branch1`` and ``branch2``), the data are
run through the network in eval mode; forward hooks capture both branch outputs, each scaled by
0.5 as in the paper, flattened per example. Covariance and variances are accumulated online
(batch-wise Chan/Welford merges in float64), so the whole test set can stream through:

- ``correlation[k]`` (Fig. 3): ``sum_d cov(y1_d, y2_d) / sqrt(sum_d var(y1_d) * sum_d var(y2_d))``,
  where ``d`` runs over the items of the flattened outputs and each item's moments are taken over
  the examples (``center="element"``, the paper's "covariance between each corresponding item");
  ``center="global"`` instead pools every item of every example as one sample (one mean).
- ``layerwise[k, i, j]`` (Fig. 4, "L{i+1}R{j+1}"): the same correlation between feature map
  (channel) ``i`` of the left branch's output and channel ``j`` of the right branch's output, for
  the first three channels: the diagonal measures how well the sum aligns the two branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["branch_correlation", "BranchCorrelation", "shake_blocks"]


def shake_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule exposing two branches ``branch1`` and ``branch2``."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "branch1", None), nn.Module)
            and isinstance(getattr(m, "branch2", None), nn.Module)]


class _CrossMoments:
    """Online means, sums of squares and cross products of X (S, a, F) and Y (S, b, F) over S."""

    def __init__(self):
        self.n = 0
        self.mx = self.my = self.m2x = self.m2y = self.cxy = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        nb = x.shape[0]
        if nb == 0:
            return
        bx, by = x.mean(0), y.mean(0)
        dx, dy = x - bx, y - by
        m2x, m2y = (dx * dx).sum(0), (dy * dy).sum(0)
        cxy = torch.einsum("saf,sbf->abf", dx, dy)
        if self.n == 0:
            self.n, self.mx, self.my, self.m2x, self.m2y, self.cxy = nb, bx, by, m2x, m2y, cxy
            return
        na, n = self.n, self.n + nb
        ex, ey = bx - self.mx, by - self.my
        w = na * nb / n
        self.m2x = self.m2x + m2x + ex * ex * w
        self.m2y = self.m2y + m2y + ey * ey * w
        self.cxy = self.cxy + cxy + ex[:, None, :] * ey[None, :, :] * w
        self.mx = self.mx + ex * (nb / n)
        self.my = self.my + ey * (nb / n)
        self.n = n

    def correlation(self) -> torch.Tensor:
        if self.n < 2:
            raise ValueError("data must hold at least two examples to estimate a correlation")
        vx, vy = self.m2x.sum(-1), self.m2y.sum(-1)
        return self.cxy.sum(-1) / torch.sqrt(vx[:, None] * vy[None, :])


@dataclass
class BranchCorrelation:
    """Result of :func:`branch_correlation`.

    ``names``: block names; ``correlation``: float64 tensor ``(num_blocks,)`` (Fig. 3);
    ``layerwise``: float64 tensor ``(num_blocks, c, c)`` with ``c = min(3, channels)``,
    ``layerwise[k, i, j]`` = correlation of L{i+1} and R{j+1} (Fig. 4).
    """

    names: list[str]
    correlation: torch.Tensor
    layerwise: torch.Tensor
    num_examples: int = 0
    center: str = "element"
    extra: dict = field(default_factory=dict)

    def table(self) -> list[dict[str, float]]:
        """One row per block: ``{"block", "correlation", "L1R1", "L1R2", ...}``."""
        rows = []
        for k, name in enumerate(self.names):
            row: dict = {"block": name, "correlation": float(self.correlation[k])}
            c = self.layerwise.shape[-1]
            for i in range(c):
                for j in range(c):
                    row[f"L{i + 1}R{j + 1}"] = float(self.layerwise[k, i, j])
            rows.append(row)
        return rows


def _batches(data, batch_size: int) -> Iterable[torch.Tensor]:
    if torch.is_tensor(data):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
        return
    if (isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0])
            and torch.is_tensor(data[1]) and data[0].dim() >= 1 and data[1].dim() == 1
            and data[0].shape[0] == data[1].shape[0]):
        yield from _batches(data[0], batch_size)
        return
    for item in data:
        if torch.is_tensor(item):
            yield item
        elif isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]):
            yield item[0]
        else:
            raise ValueError("data must be a tensor, an (x, y) pair of tensors, "
                             "or an iterable of x or (x, y) batches")


@torch.no_grad()
def branch_correlation(model: nn.Module, data, *, batch_size: int = 500, channels: int = 3,
                       center: str = "element",
                       device: torch.device | str | None = None) -> BranchCorrelation:
    """Correlation between the two branches of every shake block (Gastaldi 2017, section 3).

    Args:
        model: a network whose two-branch blocks expose ``branch1`` and ``branch2`` (all sgdlab
            shake models do); found with :func:`shake_blocks`, hooked with forward hooks.
        data: inputs ``x``, an ``(x, y)`` pair (split into ``batch_size`` chunks), or an iterable of
            ``x`` or ``(x, y)`` batches (e.g. a DataLoader).
        channels: how many leading feature maps enter the layer-wise table (3 in Fig. 4).
        center: ``"element"`` (per-item moments over examples) or ``"global"`` (one pooled sample).
        device: where to run the model (default: the device of its first parameter).

    Runs in eval mode and restores the model's mode (per module) afterwards.
    Returns a :class:`BranchCorrelation`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    if center not in ("element", "global"):
        raise ValueError(f"center must be 'element' or 'global', got {center!r}")
    blocks = shake_blocks(model)
    if not blocks:
        raise ValueError("model has no block exposing branch1 and branch2")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    outputs: dict[int, list] = {k: [None, None] for k in range(len(blocks))}
    full = [_CrossMoments() for _ in blocks]
    layer = [_CrossMoments() for _ in blocks]
    handles = []

    def hook(k: int, side: int):
        def fn(module, inputs, output):
            outputs[k][side] = output
        return fn

    modes = {m: m.training for m in model.modules()}
    try:
        for k, (_, block) in enumerate(blocks):
            handles.append(block.branch1.register_forward_hook(hook(k, 0)))
            handles.append(block.branch2.register_forward_hook(hook(k, 1)))
        model.eval()
        total = 0
        for x in _batches(data, batch_size):
            x = x.to(device)
            model(x)
            total += x.shape[0]
            for k in range(len(blocks)):
                y1, y2 = outputs[k]
                if y1 is None or y2 is None:
                    raise ValueError(f"block {blocks[k][0]!r}: a branch did not run in the forward pass")
                y1 = 0.5 * y1.detach().to(torch.float64)
                y2 = 0.5 * y2.detach().to(torch.float64)
                n = y1.shape[0]
                c = min(channels, y1.shape[1] if y1.dim() > 1 else 1, y2.shape[1] if y2.dim() > 1 else 1)
                l1 = y1.reshape(n, y1.shape[1] if y1.dim() > 1 else 1, -1)[:, :c]
                l2 = y2.reshape(n, y2.shape[1] if y2.dim() > 1 else 1, -1)[:, :c]
                f1, f2 = y1.reshape(n, 1, -1), y2.reshape(n, 1, -1)
                if center == "global":
                    f1, f2 = f1.reshape(-1, 1, 1), f2.reshape(-1, 1, 1)
                    l1 = l1.permute(0, 2, 1).reshape(-1, c, 1)
                    l2 = l2.permute(0, 2, 1).reshape(-1, c, 1)
                full[k].update(f1, f2)
                layer[k].update(l1, l2)
                outputs[k] = [None, None]
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    corr = torch.stack([m.correlation()[0, 0] for m in full])
    mats = [m.correlation() for m in layer]
    c = max(t.shape[-1] for t in mats)
    lw = torch.full((len(mats), c, c), float("nan"), dtype=torch.float64)
    for k, t in enumerate(mats):
        lw[k, :t.shape[0], :t.shape[1]] = t
    return BranchCorrelation([name for name, _ in blocks], corr, lw, total, center)
