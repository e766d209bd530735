"""Per-block gradient and weight norms and the update-to-weight ratio.

The ratio ``||w_{t+1} - w_t|| / ||w_t||`` of a block is the relative change one step makes to it; it
is the quantity the layer-wise adaptive methods control (You et al., "Large Batch Training of
Convolutional Networks", 2017, LARS: the trust ratio ``||w|| / ||grad||``) and a common health check
of a learning rate (updates of about ``1e-3`` of the weights per step). Blocks are those of
:func:`sgdlab.analysis.block_partition` (``"layers"``: every module owning parameters; ``"stages"``:
the model's top-level children).
"""

from __future__ import annotations

import math

import torch

from ..analysis._data import unwrap_model
from ..analysis.blocks import block_partition
from .base import Monitor, register

__all__ = ["Norms"]


def _norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in tensors))


@register("norms")
class Norms(Monitor):
    """Gradient norm, weight norm and update-to-weight ratio of every block, and of the whole model.

    Gradients are read from ``p.grad`` as the optimizer step left them (the gradient of the step just
    taken: after unscaling and clipping, before weight decay); a loop that has already cleared them
(``zero_grad(set_to_none=True)``) gets no gradient norms. The update is the change of the weights
    across the step, for which the weights are copied by :meth:`before_step` one step before a check
    (a loop that does not call it gets no ratio). Logs ``norms_grad``, ``norms_weight`` and
    ``norms_update_ratio`` for the whole model and ``norms/<block>/grad``, ``norms/<block>/weight``,
    ``norms/<block>/update_ratio`` per block (a folder of its own in TensorBoard and in an MLflow file store) (``blocks=None`` logs only the totals).
    """

    def __init__(self, every: int = 100, *, blocks: str | None = "layers", prefix: str | None = None):
        super().__init__(every, prefix=prefix)
        if blocks not in ("layers", "stages", None):
            raise ValueError(f"blocks must be 'layers', 'stages' or None, got {blocks!r}")
        self.blocks = blocks
        self._before: dict[str, torch.Tensor] | None = None
        self._before_step: int | None = None

    def _groups(self, model) -> dict[str, list[str]]:
        groups = {"": [n for n, p in model.named_parameters() if p.requires_grad]}
        if self.blocks is not None:
            groups.update(block_partition(model, self.blocks))
        return groups

    def before_step(self, model, step: int) -> None:
        if self.due(step + 1):
            model = unwrap_model(model)
            self._before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            self._before_step = step

    def measure(self, model, loss_fn, batch, optimizer, step) -> dict:
        model = unwrap_model(model)
        params = dict(model.named_parameters())
        before = self._before if self._before_step == step - 1 else None
        out: dict[str, float] = {}
        # a loop that clears the gradients before the check (transformers' Trainer): no gradient norms
        has_grads = any(p.grad is not None for p in params.values())
        for label, names in self._groups(model).items():
            def key(what: str, label: str = label) -> str:
                return f"{self.prefix}/{label}/{what}" if label else self.key(what)

            ws = [params[n] for n in names]
            w_norm = _norm(ws)
            grads = [p.grad for p in ws if p.grad is not None]
            if has_grads:
                out[key("grad")] = _norm(grads)
            out[key("weight")] = w_norm
            if before is not None:
                upd = _norm([params[n].detach() - before[n] for n in names])
                w0 = _norm([before[n] for n in names])
                out[key("update_ratio")] = upd / w0 if w0 > 0 else float("nan")
        self._before, self._before_step = None, None
        return out

    def __repr__(self) -> str:
        return f"Norms(every={self.every}, blocks={self.blocks!r})"
