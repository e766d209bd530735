"""Hessian diagnostics of a trained model: Hessian-vector products, top eigenvalues, trace, spectral density.

The Hessian is that of the data loss ``L(w) = sum_b (n_b / N) loss_fn(model(x_b), y_b)`` (the mean over
all ``N`` examples, batches weighted by their size) with respect to the trainable parameters (all, or a
``block``: a module prefix, a list of prefixes or a filter), the model in eval mode (BatchNorm with
running statistics), so every batching of the same data gives the same operator. Products ``H v`` use
double backward (Pearlmutter's trick): ``H v = d/dw (g(w) . v)``. ``curvature="ggn"`` uses the
generalised Gauss-Newton matrix instead (:class:`sgdlab.analysis.GGNOperator`).

These functions build the operator (:mod:`sgdlab.analysis.operators`) and run an estimator of
:mod:`sgdlab.analysis.estimators` on it:

- Top eigenvalues: Lanczos with full reorthogonalisation (largest *algebraic* eigenvalues), or power
  iteration (largest *magnitude*, which may be a negative eigenvalue), as used to report sharpness in the
  lecture notes "Towards Understanding SGD" (papers/004, section 2: flatness via the Hessian spectrum).
- Trace: Hutchinson's estimator ``tr(H) = E[z^T H z]`` with Rademacher ``z``, or Hutch++, with standard
  errors.
- Spectral density: stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019)
  with Gaussian broadening.

Convergence is reported: Lanczos residual estimates ``|beta_m s_{m,i}|`` and power-iteration residuals
``||H v - lambda v||``; trace standard errors over probes (and over data with ``data_resamples``).
Inside a ``torch.distributed`` job each rank passes its shard of the data and gets the result of the
union of the shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ._data import unflatten
from .estimators import (
    EigenResult,
    LanczosRun,
    SpectralDensity,
    TraceEstimate,
    estimate_trace,
    lanczos,
    slq,
    top_eigenvalues,
)
from .operators import GGNOperator, HessianOperator, as_flat, curvature_operator

__all__ = [
    "HessianOperator",
    "GGNOperator",
    "EigenResult",
    "LanczosRun",
    "TraceEstimate",
    "SpectralDensity",
    "hvp",
    "hessian_eigen",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_trace_estimate",
    "spectral_density",
    "lanczos",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def hvp(
    model: nn.Module, loss_fn: LossFn, data: Any, v: torch.Tensor | Sequence[torch.Tensor], *, block: Any = None
):
    """Hessian-vector product ``H v`` of the mean data loss by double backward (Pearlmutter 1994).

    ``v`` is a flat vector over the trainable parameters of ``block`` (all by default, in
    ``model.parameters()`` order), returned as a float64 flat vector, or a list of tensors shaped like the
    parameters, returned as such a list (in the parameters' dtype). Batches are weighted by size; the
    model is evaluated in eval mode.
    """
    op = HessianOperator(model, loss_fn, data, block=block)
    flat = as_flat(v, op.params)
    out = op.matvec(flat)
    if isinstance(v, torch.Tensor):
        return out
    return [t.to(p.dtype) for t, p in zip(unflatten(out, op.params), op.params)]


def hessian_eigen(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    k: int = 1,
    method: str = "lanczos",
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    cache_graph: bool | None = None,
    block: Any = None,
    curvature: str = "hessian",
    data_resamples: int = 0,
) -> EigenResult:
    """Top-``k`` Hessian (or ``curvature="ggn"``) eigenvalues with convergence information.

    ``method="lanczos"``: Lanczos with full reorthogonalisation; the ``k`` largest *algebraic* Ritz
    values, stopping when every residual estimate ``|beta_m s_{m,i}|`` is at most ``tol * |theta|_max``
    (default ``tol=1e-5``, ``max_iter=100`` steps). ``method="power"``: power iteration with deflation
    (orthogonalisation against the eigenvectors already found), each eigenvalue the largest in
    *magnitude* of the remaining spectrum (it may be negative); stops when the Rayleigh quotient changes
    by at most ``tol * |lambda|`` and the residual ``||Hv - lambda v||`` is at most ``sqrt(tol) * |lambda|``
    (default ``tol=1e-4``, ``max_iter=200`` per eigenvalue); otherwise ``converged`` is False.
    ``data_resamples=n`` adds the bootstrap standard deviation over resampled data (``data_stderr``).
    See :func:`sgdlab.analysis.estimators.top_eigenvalues`.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    op = curvature_operator(model, loss_fn, data, curvature=curvature, block=block, cache_graph=cache_graph)
    return top_eigenvalues(op, k=k, method=method, max_iter=max_iter, tol=tol, seed=seed,
                           return_vectors=return_vectors, data_resamples=data_resamples)


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    k: int = 1,
    method: str = "lanczos",
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    cache_graph: bool | None = None,
    block: Any = None,
    curvature: str = "hessian",
) -> torch.Tensor:
    """The ``k`` top eigenvalues of the data-loss Hessian as a float64 tensor, largest first.

    Lanczos (default) returns the largest *algebraic* eigenvalues; ``method="power"`` returns those of
    largest *magnitude* (possibly negative). The Hessian-based flatness notion of the lecture notes
    "Towards Understanding SGD" (papers/004, section 2). For residuals and convergence flags use
    :func:`hessian_eigen`, which takes the same arguments.
    """
    return hessian_eigen(
        model, loss_fn, data, k=k, method=method, max_iter=max_iter, tol=tol, seed=seed,
        cache_graph=cache_graph, block=block, curvature=curvature,
    ).values


def hessian_trace_estimate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    num_samples: int = 100,
    rtol: float | None = None,
    min_samples: int = 10,
    seed: int = 0,
    cache_graph: bool | None = None,
    method: str = "hutchinson",
    block: Any = None,
    curvature: str = "hessian",
    data_resamples: int = 0,
) -> TraceEstimate:
    """Trace of the data-loss Hessian with its standard error, from ``num_samples`` products.

    ``method="hutchinson"`` (default): ``tr(H) = E_z[z^T H z]``, ``z`` Rademacher (Hutchinson 1990); if
    ``rtol`` is given, stops early once at least ``min_samples`` have been drawn and the standard error is
    at most ``rtol * |estimate|``. ``method="hutch++"``: Meyer et al. (2021), Algorithm 1, with the same
    number of products; ``"exact"``: ``dim`` products. See :func:`sgdlab.analysis.estimators.estimate_trace`.
    """
    if method == "hutchinson" and num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to give a standard error, got {num_samples}")
    op = curvature_operator(model, loss_fn, data, curvature=curvature, block=block, cache_graph=cache_graph)
    return estimate_trace(op, method=method, num_matvecs=num_samples, seed=seed, rtol=rtol, min_samples=min_samples,
                 data_resamples=data_resamples)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    num_samples: int = 100,
    rtol: float | None = None,
    seed: int = 0,
    return_stderr: bool = False,
    cache_graph: bool | None = None,
    method: str = "hutchinson",
    block: Any = None,
) -> float | tuple[float, float]:
    """Estimate of the trace of the data-loss Hessian (Hutchinson by default, Rademacher vectors).

    Returns the estimate, or ``(estimate, standard_error)`` with ``return_stderr=True``; see
    :func:`hessian_trace_estimate` for the full result and the other methods.
    """
    est = hessian_trace_estimate(
        model, loss_fn, data, num_samples=num_samples, rtol=rtol, seed=seed, cache_graph=cache_graph,
        method=method, block=block,
    )
    return (est.value, est.stderr) if return_stderr else est.value


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    num_vectors: int = 4,
    num_steps: int = 64,
    sigma: float | None = None,
    num_points: int = 512,
    seed: int = 0,
    cache_graph: bool | None = None,
    block: Any = None,
    curvature: str = "hessian",
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature with Gaussian broadening.

    ``num_vectors`` Rademacher start vectors, ``num_steps`` Lanczos steps each (full reorthogonalisation),
    Gauss quadrature nodes/weights from each tridiagonal matrix (Golub & Meurant; Ghorbani et al. 2019).
    ``sigma`` defaults to 1% of the spread of the nodes; the density is evaluated on ``num_points`` points
    spanning the nodes with a margin of ``5 sigma``. Plot it with
    :func:`sgdlab.analysis.plot_spectral_density`; see :func:`sgdlab.analysis.estimators.slq`.
    """
    op = curvature_operator(model, loss_fn, data, curvature=curvature, block=block, cache_graph=cache_graph)
    return slq(op, num_vectors=num_vectors, num_steps=num_steps, sigma=sigma, num_points=num_points, seed=seed)
