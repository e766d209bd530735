"""Hessian diagnostics of a trained model: Hessian-vector products, top eigenvalues, trace, spectral density.

The Hessian is that of the data loss ``L(w) = sum_b (n_b / N) loss_fn(model(x_b), y_b)`` (the mean over
all ``N`` examples, batches weighted by their size) with respect to every trainable parameter, the model
in eval mode (BatchNorm with running statistics), so every batching of the same data gives the same
operator. Products ``H v`` use double backward (Pearlmutter's trick): ``H v = d/dw (g(w) . v)``.

- Top eigenvalues: Lanczos with full reorthogonalisation (largest *algebraic* eigenvalues), or power
  iteration (largest *magnitude*, which may be a negative eigenvalue), as used to report sharpness in the
  lecture notes "Towards Understanding SGD" (papers/004, section 2: flatness via the Hessian spectrum).
- Trace: Hutchinson's estimator ``tr(H) = E[z^T H z]`` with Rademacher ``z``, with its standard error.
- Spectral density: stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019)
  with Gaussian broadening.

Convergence is reported: Lanczos residual estimates ``|beta_m s_{m,i}|`` and power-iteration residuals
``||H v - lambda v||``; Hutchinson's standard error ``std(z^T H z) / sqrt(m)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from scipy.linalg import eigh_tridiagonal

from ._data import (
    as_batches,
    check_loss,
    eval_mode,
    flatten,
    model_device,
    num_examples,
    trainable_parameters,
)

__all__ = [
    "HessianOperator",
    "EigenResult",
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


class HessianOperator:
    """The data-loss Hessian of ``model`` as a linear operator on flat parameter vectors.

    ``matvec(v)`` takes a flat vector of length :attr:`dim` (any float dtype) and returns ``H v`` as a
    float64 flat vector. Batches are weighted by ``n_b / N``. With ``cache_graph`` (default: when the
    data are a single batch) the first-order gradient graph is built once and every product is a single
    backward pass through it (as PyHessian does); otherwise each product re-runs forward and backward
    per batch, so memory stays that of one batch.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, *, cache_graph: bool | None = None):
        named = trainable_parameters(model)
        self.model = model
        self.loss_fn = loss_fn
        self.params = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.device = model_device(model)
        self.dtype = self.params[0].dtype
        self.batches = as_batches(data, device=self.device)
        self.num_examples = num_examples(self.batches)
        self.dim = sum(p.numel() for p in self.params)
        self.num_matvecs = 0
        self.cache_graph = len(self.batches) == 1 if cache_graph is None else bool(cache_graph)
        self._cached: list[tuple[float, tuple[torch.Tensor, ...]]] | None = None

    def _grads(self, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
        loss = check_loss(self.loss_fn(self.model(x), y))
        return torch.autograd.grad(loss, self.params, create_graph=create_graph)

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Mean loss over the data and its gradient (flat, float64)."""
        total = 0.0
        grad = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        with eval_mode(self.model):
            for x, y in self.batches:
                w = x.shape[0] / self.num_examples
                loss = check_loss(self.loss_fn(self.model(x), y))
                g = torch.autograd.grad(loss, self.params)
                total += w * float(loss.detach())
                grad += w * flatten(g).to(torch.float64)
        return total, grad

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (returned as float64)."""
        if v.numel() != self.dim:
            raise ValueError(f"v has {v.numel()} entries, the model has {self.dim} trainable parameters")
        vs = _split(v.to(device=self.device, dtype=self.dtype), self.params)
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.num_matvecs += 1
        with eval_mode(self.model):
            if self.cache_graph:
                if self._cached is None:
                    self._cached = [
                        (x.shape[0] / self.num_examples, self._grads(x, y, True)) for x, y in self.batches
                    ]
                for w, g in self._cached:
                    hv = torch.autograd.grad(
                        g, self.params, grad_outputs=vs, retain_graph=True, allow_unused=True
                    )
                    out += w * _flat_or_zero(hv, self.params)
            else:
                for x, y in self.batches:
                    w = x.shape[0] / self.num_examples
                    g = self._grads(x, y, True)
                    dot = sum((gi * vi).sum() for gi, vi in zip(g, vs))
                    hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                    out += w * _flat_or_zero(hv, self.params)
        return out

    __call__ = matvec

    def release(self) -> None:
        """Drop the cached gradient graph."""
        self._cached = None

    def dense(self) -> torch.Tensor:
        """The full ``dim x dim`` Hessian by ``dim`` products (small models only)."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)


def _split(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _flat_or_zero(gs: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64) for g, p in zip(gs, params)]
    )


def hvp(model: nn.Module, loss_fn: LossFn, data: Any, v: torch.Tensor | Sequence[torch.Tensor]):
    """Hessian-vector product ``H v`` of the mean data loss by double backward (Pearlmutter 1994).

    ``v`` is a flat vector over all trainable parameters (in ``model.parameters()`` order), returned as a
    float64 flat vector, or a list of tensors shaped like the parameters, returned as such a list (in the
    parameters' dtype). Batches are weighted by size; the model is evaluated in eval mode.
    """
    op = HessianOperator(model, loss_fn, data)
    if isinstance(v, torch.Tensor):
        return op.matvec(v.reshape(-1))
    vs = list(v)
    if len(vs) != len(op.params) or any(a.shape != p.shape for a, p in zip(vs, op.params)):
        raise ValueError("v must be a flat vector or a list of tensors shaped like the trainable parameters")
    return [t.to(p.dtype) for t, p in zip(_split(op.matvec(flatten(vs)), op.params), op.params)]


# --------------------------------------------------------------------------------------------- Lanczos


@dataclass
class LanczosRun:
    """Result of :func:`lanczos`: the tridiagonal ``T = Q^T H Q`` and the basis ``Q`` (rows)."""

    alpha: np.ndarray
    beta: np.ndarray  # off-diagonal, length len(alpha) - 1
    basis: torch.Tensor | None
    last_beta: float  # norm of the residual after the last step
    steps: int


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    num_steps: int,
    *,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    reorthogonalize: bool = True,
    keep_basis: bool = True,
    k: int | None = None,
    tol: float | None = None,
) -> LanczosRun:
    """Lanczos tridiagonalisation of a symmetric operator with full reorthogonalisation (float64).

    Runs up to ``num_steps`` steps from ``v0`` (a seeded Gaussian vector if omitted). If ``k`` and ``tol``
    are given, stops as soon as the ``k`` largest Ritz values have residual estimates
    ``|beta_m s_{m,i}| <= tol * max|theta|``. On breakdown (an invariant subspace) it continues from a new
    random vector orthogonal to the basis so that ``num_steps`` (at most ``dim``) Ritz values can be had.
    """
    num_steps = int(min(num_steps, dim))
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    dev = torch.device(device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def rand() -> torch.Tensor:
        return torch.randn(dim, generator=gen, dtype=torch.float64).to(dev)

    q = rand() if v0 is None else v0.to(device=dev, dtype=torch.float64).reshape(-1).clone()
    q /= q.norm()
    basis = (
        torch.zeros(num_steps, dim, dtype=torch.float64, device=dev)
        if (reorthogonalize or keep_basis)
        else None
    )
    alphas: list[float] = []
    betas: list[float] = []
    q_prev = torch.zeros_like(q)
    b_prev = 0.0
    last_beta = 0.0
    for j in range(num_steps):
        if basis is not None:
            basis[j] = q
        w = matvec(q).to(device=dev, dtype=torch.float64)
        a = float(torch.dot(q, w))
        w = w - a * q - b_prev * q_prev
        if reorthogonalize and basis is not None:
            for _ in range(2):
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(w.norm())
        alphas.append(a)
        last_beta = b
        if k is not None and tol is not None and j + 1 >= k:
            theta, s = _tridiag_eig(np.array(alphas), np.array(betas))
            scale = max(float(np.max(np.abs(theta))), 1e-300)
            res = np.abs(b * s[-1, -k:])
            if np.all(res <= tol * scale):
                return LanczosRun(
                    np.array(alphas), np.array(betas), basis[: j + 1] if basis is not None else None, b, j + 1
                )
        if j + 1 == num_steps:
            break
        if b <= 1e-12 * max(1.0, max(abs(x) for x in alphas)):
            # invariant subspace found: restart orthogonally, decoupling T
            q_new = rand()
            if basis is not None:
                for _ in range(2):
                    q_new = q_new - basis[: j + 1].T @ (basis[: j + 1] @ q_new)
            q_prev, q, b_prev = q, q_new / q_new.norm(), 0.0
            betas.append(0.0)
        else:
            q_prev, q, b_prev = q, w / b, b
            betas.append(b)
    steps = len(alphas)
    return LanczosRun(
        np.array(alphas),
        np.array(betas),
        basis[:steps] if (basis is not None and keep_basis) else None,
        last_beta,
        steps,
    )


def _tridiag_eig(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix (float64)."""
    if len(alpha) == 1:
        return alpha.astype(np.float64), np.ones((1, 1))
    return eigh_tridiagonal(alpha.astype(np.float64), beta.astype(np.float64))


# ------------------------------------------------------------------------------------------ eigenvalues


@dataclass
class EigenResult:
    """Eigenvalues (largest algebraic first for Lanczos, largest magnitude first for power iteration),
    flat float64 eigenvectors (rows), residuals ``||H v - lambda v||`` (Lanczos: the estimates
    ``|beta_m s_{m,i}|``), per-value convergence flags, the method, iterations and Hessian-vector products."""

    values: torch.Tensor
    vectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    method: str
    iterations: int
    num_matvecs: int

    def as_dict(self) -> dict:
        return {
            "values": self.values.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": [bool(c) for c in self.converged],
            "method": self.method,
            "iterations": self.iterations,
            "num_matvecs": self.num_matvecs,
        }


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
) -> EigenResult:
    """Top-``k`` Hessian eigenvalues with convergence information (see :func:`hessian_eigenvalues`).

    ``method="lanczos"``: Lanczos with full reorthogonalisation; the ``k`` largest *algebraic* Ritz
    values, stopping when every residual estimate ``|beta_m s_{m,i}|`` is at most ``tol * |theta|_max``
    (default ``tol=1e-5``, ``max_iter=100`` steps). ``method="power"``: power iteration with deflation
    (orthogonalisation against the eigenvectors already found), each eigenvalue the largest in
    *magnitude* of the remaining spectrum (it may be negative); stops when the Rayleigh quotient changes
    by at most ``tol * |lambda|`` and the residual ``||Hv - lambda v||`` is at most ``sqrt(tol) * |lambda|``
    (default ``tol=1e-4``, ``max_iter=200`` per eigenvalue); otherwise ``converged`` is False.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    op = HessianOperator(model, loss_fn, data, cache_graph=cache_graph)
    if k > op.dim:
        raise ValueError(f"k={k} exceeds the number of trainable parameters ({op.dim})")
    gen = torch.Generator().manual_seed(int(seed))
    try:
        if method == "lanczos":
            tol = 1e-5 if tol is None else float(tol)
            steps = min(op.dim, max(int(max_iter or 100), k + 1) if op.dim > k else op.dim)
            run = lanczos(op.matvec, op.dim, steps, generator=gen, device=op.device, k=k, tol=tol)
            theta, s = _tridiag_eig(run.alpha, run.beta)
            order = np.argsort(theta)[::-1][:k]
            values = torch.tensor(theta[order].copy(), dtype=torch.float64)
            res = torch.tensor(np.abs(run.last_beta * s[-1, order]), dtype=torch.float64)
            if run.steps >= op.dim:
                res = torch.zeros_like(res)  # the Krylov space is the whole space: exact
            scale = float(np.max(np.abs(theta))) or 1.0
            converged = res <= tol * scale
            vectors = None
            if return_vectors and run.basis is not None:
                vectors = (
                    torch.tensor(s[:, order].T.copy(), dtype=torch.float64, device=op.device) @ run.basis
                )
            return EigenResult(values, vectors, res, converged, "lanczos", run.steps, op.num_matvecs)
        if method == "power":
            tol = 1e-4 if tol is None else float(tol)
            max_iter = int(max_iter or 200)
            found: list[torch.Tensor] = []
            vals, ress, conv = [], [], []
            total_iters = 0
            for _ in range(k):
                v = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.device)
                v = _deflate(v, found)
                v /= v.norm()
                lam_prev = None
                ok = False
                lam, res = 0.0, float("inf")
                for _it in range(max_iter):
                    total_iters += 1
                    w = _deflate(op.matvec(v), found)
                    lam = float(torch.dot(v, w))
                    res = float((w - lam * v).norm())
                    nrm = float(w.norm())
                    if nrm == 0.0:
                        ok = True
                        break
                    # Converged: the Rayleigh quotient has settled *and* v is nearly an eigenvector
                    # (the quotient's error is about the squared residual, hence sqrt(tol) for it).
                    if (lam_prev is not None and abs(lam - lam_prev) <= tol * abs(lam)
                            and res <= math.sqrt(tol) * abs(lam)):
                        ok = True
                        break
                    lam_prev = lam
                    v = w / nrm
                found.append(v)
                vals.append(lam)
                ress.append(res)
                conv.append(ok)
            return EigenResult(
                torch.tensor(vals, dtype=torch.float64),
                torch.stack(found) if return_vectors else None,
                torch.tensor(ress, dtype=torch.float64),
                torch.tensor(conv),
                "power",
                total_iters,
                op.num_matvecs,
            )
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    finally:
        op.release()


def _deflate(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for u in basis:
        v = v - torch.dot(u, v) * u
    return v


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
) -> torch.Tensor:
    """The ``k`` top eigenvalues of the data-loss Hessian as a float64 tensor, largest first.

    Lanczos (default) returns the largest *algebraic* eigenvalues; ``method="power"`` returns those of
    largest *magnitude* (possibly negative). The Hessian-based flatness notion of the lecture notes
    "Towards Understanding SGD" (papers/004, section 2). For residuals and convergence flags use
    :func:`hessian_eigen`, which takes the same arguments.
    """
    return hessian_eigen(
        model,
        loss_fn,
        data,
        k=k,
        method=method,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        cache_graph=cache_graph,
    ).values


# ------------------------------------------------------------------------------------------------ trace


@dataclass
class TraceEstimate:
    """Hutchinson estimate of ``tr(H)``: mean of ``z^T H z`` over ``num_samples`` Rademacher vectors and
    its standard error ``std / sqrt(num_samples)``; ``samples`` holds the individual ``z^T H z``."""

    value: float
    stderr: float
    num_samples: int
    samples: list[float] = field(repr=False, default_factory=list)

    def __float__(self) -> float:
        return float(self.value)

    def as_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "num_samples": self.num_samples}


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
) -> TraceEstimate:
    """Hutchinson's trace estimator ``tr(H) = E_z[z^T H z]``, ``z`` Rademacher (Hutchinson 1990).

    Draws up to ``num_samples`` vectors (seeded by ``seed``); if ``rtol`` is given, stops early once at least
    ``min_samples`` have been drawn and the standard error is at most ``rtol * |estimate|``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to give a standard error, got {num_samples}")
    op = HessianOperator(model, loss_fn, data, cache_graph=cache_graph)
    gen = torch.Generator().manual_seed(int(seed))
    samples: list[float] = []
    try:
        for i in range(int(num_samples)):
            z = torch.randint(0, 2, (op.dim,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
            z = z.to(op.device)
            samples.append(float(torch.dot(z, op.matvec(z))))
            if rtol is not None and i + 1 >= max(2, min_samples):
                m, se = _mean_se(samples)
                if se <= rtol * abs(m):
                    break
    finally:
        op.release()
    m, se = _mean_se(samples)
    return TraceEstimate(m, se, len(samples), samples)


def _mean_se(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("inf")


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
) -> float | tuple[float, float]:
    """Hutchinson estimate of the trace of the data-loss Hessian (Rademacher vectors).

    Returns the estimate, or ``(estimate, standard_error)`` with ``return_stderr=True``; see
    :func:`hessian_trace_estimate` for the full result.
    """
    est = hessian_trace_estimate(
        model, loss_fn, data, num_samples=num_samples, rtol=rtol, seed=seed, cache_graph=cache_graph
    )
    return (est.value, est.stderr) if return_stderr else est.value


# ------------------------------------------------------------------------------------- spectral density


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature of the Hessian spectrum.

    ``nodes[v]`` and ``weights[v]`` are the Ritz values and squared first components of the Ritz vectors
    of run ``v`` (each row's weights sum to 1); the spectral measure is
    ``mu ~ (1/n_v) sum_v sum_j weights[v, j] delta(t - nodes[v, j])``, so
    ``tr f(H) ~ dim * E[sum_j w f(theta)]``.
    ``grid``/``density`` hold the Gaussian-broadened density (integrating to 1) with width ``sigma``.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    grid: np.ndarray
    density: np.ndarray
    sigma: float

    def broadened(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        """The density on ``grid`` with Gaussian broadening of standard deviation ``sigma``."""
        g = np.asarray(grid, dtype=np.float64)[:, None]
        out = np.zeros(g.shape[0])
        for th, w in zip(self.nodes, self.weights):
            out += (w[None, :] * np.exp(-0.5 * ((g - th[None, :]) / sigma) ** 2)).sum(1)
        return out / (len(self.nodes) * sigma * math.sqrt(2 * math.pi))

    def trace_of(self, fn: Callable[[np.ndarray], np.ndarray]) -> float:
        """SLQ estimate of ``tr f(H)`` (e.g. ``np.log`` for the log-determinant of a positive-definite H)."""
        vals = [float(np.sum(w * fn(th))) for th, w in zip(self.nodes, self.weights)]
        return float(self.dim * np.mean(vals))

    def as_dict(self) -> dict:
        return {
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "dim": self.dim,
            "sigma": self.sigma,
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
        }


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
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature with Gaussian broadening.

    ``num_vectors`` Rademacher start vectors, ``num_steps`` Lanczos steps each (full reorthogonalisation),
    Gauss quadrature nodes/weights from each tridiagonal matrix (Golub & Meurant; Ghorbani et al. 2019).
    ``sigma`` defaults to 1% of the spread of the nodes; the density is evaluated on ``num_points`` points
    spanning the nodes with a margin of ``5 sigma``. Plot it with
    :func:`sgdlab.analysis.plot_spectral_density`.
    """
    if num_vectors < 1 or num_steps < 1:
        raise ValueError("num_vectors and num_steps must be >= 1")
    op = HessianOperator(model, loss_fn, data, cache_graph=cache_graph)
    gen = torch.Generator().manual_seed(int(seed))
    nodes, weights = [], []
    try:
        for _ in range(int(num_vectors)):
            z = torch.randint(0, 2, (op.dim,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
            run = lanczos(
                op.matvec, op.dim, num_steps, v0=z, generator=gen, device=op.device, keep_basis=False
            )
            theta, s = _tridiag_eig(run.alpha, run.beta)
            nodes.append(theta)
            weights.append(s[0, :] ** 2)
    finally:
        op.release()
    m = min(len(t) for t in nodes)  # equal lengths unless dim is tiny
    nodes_a = np.stack([t[-m:] if len(t) > m else t for t in nodes])
    weights_a = np.stack([w[-m:] / w[-m:].sum() if len(w) > m else w for w in weights])
    lo, hi = float(nodes_a.min()), float(nodes_a.max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12 * max(1.0, abs(hi)))
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(num_points))
    sd = SpectralDensity(nodes_a, weights_a, op.dim, grid, np.zeros_like(grid), float(sigma))
    sd.density = sd.broadened(grid, float(sigma))
    return sd
