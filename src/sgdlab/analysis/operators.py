"""Curvature operators: the Hessian and the generalised Gauss-Newton matrix of a model's data loss.

Both act on flat parameter vectors of a *block* of the trainable parameters (all of them by default; a
module prefix, a list of prefixes or a filter selects fewer) and are built from the data loss
``L(w) = sum_b (n_b / N) loss_fn(model(x_b), y_b)`` evaluated in eval mode, so every batching of the same
data gives the same operator.

- :class:`HessianOperator`: ``H v = d/dw (grad L(w) . v)`` by double backward (Pearlmutter 1994).
- :class:`GGNOperator`: ``G v = J^T H_out J v`` (Schraudolph 2002), ``J`` the Jacobian of the model's
  outputs with respect to the block and ``H_out`` the Hessian of the loss with respect to the outputs.
  ``G`` is positive semi-definite for a convex loss and equals ``H`` when the model is linear in the
  block (the second term of the Gauss-Newton decomposition ``H = G + sum_i (dL/df_i) d^2 f_i/dw^2``
  vanishes).

Models that call ``scaled_dot_product_attention`` (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
Hugging Face models with ``attn_implementation="sdpa"``) work unchanged: every product and gradient runs
under :func:`sgdlab.analysis.differentiable_attention` (and eval mode), which selects the math attention kernel (the fused
kernels have no double backward, PyTorch #116350) and switches off the fused fast path of
``torch.nn``'s attention layers. ``data`` may also be Hugging Face dict batches (see
:mod:`sgdlab.analysis.losses` for the matching ``loss_fn``).

Inside a ``torch.distributed`` job (gloo or nccl) each rank passes its own shard of the data; the
example count and every product are all-reduced, so every rank holds the operator of the union of the
shards (``distributed=False`` keeps a rank's operator local). ``to_scipy()`` wraps an operator as a
``scipy.sparse.linalg.LinearOperator`` (so ``scipy.sparse.linalg.eigsh`` works on it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import NonFiniteLossError
from ._data import (
    Batches,
    analysis_mode,
    as_batches,
    check_loss,
    flatten,
    forward,
    model_device,
    num_examples,
    select_parameters,
    take,
    unflatten,
    unwrap_model,
)

__all__ = ["CurvatureOperator", "HessianOperator", "GGNOperator", "curvature_operator"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _dist_active(distributed: bool | None) -> bool:
    if distributed is False:
        return False
    active = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not active:
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return bool(active)


class CurvatureOperator:
    """A symmetric curvature matrix of the data loss as a linear operator on flat block vectors.

    Attributes: ``dim`` (parameters in the block), ``shape`` ``(dim, dim)``, ``names``/``params`` (the
    block's parameters, in ``model.named_parameters()`` order), ``device``, ``dtype`` (the parameters'
    dtype, in which the products are computed; results are accumulated and returned in float64),
    ``num_examples`` (over all ranks when distributed), ``num_matvecs`` (products so far).
    Subclasses implement one batch's product; this class weights batches by ``n_b / N``, all-reduces
    across ranks and converts.
    """

    kind = "curvature"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        block: Any = None,
        distributed: bool | None = None,
    ):
        self.model = unwrap_model(model)
        self.loss_fn = loss_fn
        named = select_parameters(self.model, block)
        self.block = block
        self.params = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.device = model_device(self.model)
        self.dtype = self.params[0].dtype
        self.batches: Batches = as_batches(data, device=self.device, dicts=True)
        self.distributed = _dist_active(distributed)
        n = float(num_examples(self.batches))
        if self.distributed:
            t = torch.tensor([n], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            n = float(t.item())
        self.num_examples = int(round(n))
        self.weights = [y.shape[0] / n for _, y in self.batches]
        self.dim = sum(p.numel() for p in self.params)
        self.shape = (self.dim, self.dim)
        self.num_matvecs = 0

    # -- products ------------------------------------------------------------------------------------

    def _batch_product(self, i: int, x: torch.Tensor, y: torch.Tensor, vs: list[torch.Tensor]):
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The product with a flat vector ``v`` of length :attr:`dim` (any float dtype), as float64."""
        v = torch.as_tensor(v)
        if v.numel() != self.dim:
            raise ValueError(f"v has {v.numel()} entries, the block has {self.dim} trainable parameters")
        vs = unflatten(v.reshape(-1).to(device=self.device, dtype=self.dtype), self.params)
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        with analysis_mode(self.model), _explain_missing_derivative():
            for i, ((x, y), w) in enumerate(zip(self.batches, self.weights)):
                out += w * _flat_or_zero(self._batch_product(i, x, y, vs), self.params)
        if self.distributed:
            torch.distributed.all_reduce(out)
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(v).all()):
            # every curvature analysis (eigenvalues, traces, densities) goes through here: one line, not a
            # solver's error about NaN entries several calls later
            raise NonFiniteLossError(f"{type(self).__name__}: the curvature product is NaN or infinite: the loss or "
                                     "its derivatives are not finite at these parameters (a diverged model?)")
        self.num_matvecs += 1
        return out

    __call__ = matvec

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """Products with the columns of a ``dim x k`` matrix (float64 result)."""
        return torch.stack([self.matvec(vs[:, j]) for j in range(vs.shape[1])], dim=1)

    def release(self) -> None:
        """Drop cached graphs (if any)."""

    def dense(self) -> torch.Tensor:
        """The full ``dim x dim`` matrix by ``dim`` products (small blocks only)."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)

    def to_scipy(self):
        """This operator as a float64 ``scipy.sparse.linalg.LinearOperator`` of shape ``(dim, dim)``.

        It is symmetric (``rmatvec`` is ``matvec``), so ``scipy.sparse.linalg.eigsh`` applies; vectors
        cross between NumPy (CPU) and the operator's device.
        """
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(t).cpu().numpy()

        def mm(xs: np.ndarray) -> np.ndarray:
            return np.stack([mv(xs[:, j]) for j in range(xs.shape[1])], axis=1)

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)

    # -- data resampling -----------------------------------------------------------------------------

    def resample(self, generator: torch.Generator) -> CurvatureOperator:
        """The same operator on a bootstrap resample of the examples (Efron 1979), stratified by batch:
        each batch of ``n_b`` examples is replaced by ``n_b`` draws with replacement from itself."""
        batches = []
        for x, y in self.batches:
            n = y.shape[0]
            idx = torch.randint(0, n, (n,), generator=generator).to(y.device)
            batches.append((take(x, idx, n), y[idx]))
        return type(self)(
            self.model, self.loss_fn, batches, block=self.block, distributed=self.distributed,
            **self._extra_kwargs(),
        )

    def _extra_kwargs(self) -> dict:
        return {}

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Mean loss over the data and its gradient with respect to the block (flat, float64)."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        grad = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        with analysis_mode(self.model):
            for (x, y), w in zip(self.batches, self.weights):
                loss = check_loss(self.loss_fn(forward(self.model, x), y))
                g = torch.autograd.grad(loss, self.params, allow_unused=True)
                total += w * loss.detach().to(torch.float64)
                grad += w * _flat_or_zero(g, self.params)
        if self.distributed:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(grad)
        return float(total.item()), grad

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, examples={self.num_examples}, "
                f"batches={len(self.batches)}, dtype={self.dtype}, device={self.device}"
                f"{', distributed' if self.distributed else ''})")


class HessianOperator(CurvatureOperator):
    """The data-loss Hessian of ``model`` (on ``block``) as a linear operator on flat parameter vectors.

    ``matvec(v)`` returns ``H v`` by double backward (Pearlmutter 1994) as a float64 flat vector. With
    ``cache_graph`` (default: when the data are a single batch) the first-order gradient graph is built
    once and every product is a single backward pass through it; otherwise each product re-runs forward
    and backward per batch, so memory stays that of one batch.
    """

    kind = "hessian"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        block: Any = None,
        cache_graph: bool | None = None,
        distributed: bool | None = None,
    ):
        super().__init__(model, loss_fn, data, block=block, distributed=distributed)
        self.cache_graph = len(self.batches) == 1 if cache_graph is None else bool(cache_graph)
        self._cached: dict[int, tuple[torch.Tensor, ...]] = {}

    def _extra_kwargs(self) -> dict:
        return {"cache_graph": self.cache_graph}

    def _grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = check_loss(self.loss_fn(forward(self.model, x), y))
        return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

    def _batch_product(self, i, x, y, vs):
        if self.cache_graph:
            if i not in self._cached:
                self._cached[i] = self._grads(x, y)
            g = self._cached[i]
        else:
            g = self._grads(x, y)
        pairs = [(gi, vi) for gi, vi in zip(g, vs) if gi is not None and gi.requires_grad]
        if not pairs:
            return [None] * len(self.params)
        return torch.autograd.grad(
            [gi for gi, _ in pairs], self.params, grad_outputs=[vi for _, vi in pairs],
            retain_graph=self.cache_graph, allow_unused=True,
        )

    def release(self) -> None:
        """Drop the cached gradient graph."""
        self._cached = {}


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = sum_b (n_b/N) J_b^T H_out,b J_b`` (Schraudolph 2002).

    Each product costs a forward pass and three backward passes per batch: ``J v`` by the double-vjp
    trick (the derivative of ``u -> J^T u`` applied to ``v``), ``H_out (J v)`` by double backward
    through the loss at the outputs, and ``J^T`` of that by one more backward. Equals the Hessian for a
    model linear in the block (e.g. a linear model with squared error).
    """

    kind = "ggn"

    def _batch_product(self, i, x, y, vs):
        out = forward(self.model, x)
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(out, self.params, grad_outputs=u, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(jtu, vs) if g is not None]
        if not pairs:
            return [None] * len(self.params)
        (jv,) = torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[v for _, v in pairs])
        o = out.detach().requires_grad_(True)
        (gl,) = torch.autograd.grad(check_loss(self.loss_fn(o, y)), o, create_graph=True)
        if not gl.requires_grad:  # the loss is linear in the outputs: H_out = 0
            return [None] * len(self.params)
        (hjv,) = torch.autograd.grad(gl, o, grad_outputs=jv)
        return torch.autograd.grad(out, self.params, grad_outputs=hjv, allow_unused=True)


OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator}


def curvature_operator(
    model: nn.Module, loss_fn: LossFn, data: Any, *, curvature: str = "hessian", block: Any = None, **kwargs
) -> CurvatureOperator:
    """Build the ``curvature`` (``"hessian"`` or ``"ggn"``) operator of ``model``'s data loss on ``block``."""
    if curvature not in OPERATORS:
        raise ValueError(f"curvature must be one of {', '.join(OPERATORS)}, got {curvature!r}")
    if curvature != "hessian":
        kwargs.pop("cache_graph", None)
    return OPERATORS[curvature](model, loss_fn, data, block=block, **kwargs)


@contextlib.contextmanager
def _explain_missing_derivative():
    """Re-raise autograd's "derivative for X is not implemented" with what to do about it."""
    try:
        yield
    except RuntimeError as exc:
        if "derivative for" not in str(exc) or "not implemented" not in str(exc):
            raise
        raise RuntimeError(
            f"{exc}. Curvature products differentiate the model twice and this operation has no second "
            "derivative; scaled_dot_product_attention is already run with its math kernel here, so the op "
            "comes from elsewhere (for a Hugging Face model, try attn_implementation='eager')"
        ) from exc


def _flat_or_zero(gs: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64) for g, p in zip(gs, params)]
    )


def as_flat(v: Any, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A flat vector from a flat tensor or a list of tensors shaped like ``params``."""
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)
    vs = list(v)
    if len(vs) != len(params) or any(a.shape != p.shape for a, p in zip(vs, params)):
        raise ValueError("v must be a flat vector or a list of tensors shaped like the trainable parameters")
    return flatten(vs)
