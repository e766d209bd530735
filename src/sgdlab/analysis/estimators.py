"""Matrix-free estimators on any symmetric operator with ``matvec``, ``dim`` and ``device``.

- :func:`lanczos`: Lanczos tridiagonalisation with full reorthogonalisation (float64).
- :func:`top_eigenvalues`: the ``k`` largest algebraic eigenvalues by Lanczos, or the largest in
  magnitude by power iteration with deflation; residuals and convergence flags.
- :func:`trace`: Hutchinson (1990) with Rademacher probes, Hutch++ (Meyer, Musco, Musco & Woodruff
  2021, Algorithm 1) or the exact sum of ``e_i^T A e_i`` (small blocks); every estimate carries a
  standard error over the probes.
- :func:`slq`: the spectral density by stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani,
  Krishnan & Xiao 2019) with Gaussian broadening and a pointwise standard error over the start vectors.

With ``data_resamples=n`` (operators that have ``resample``, such as
:class:`sgdlab.analysis.HessianOperator`), an estimate is repeated on ``n`` bootstrap resamples of the
examples, each with fresh probes; the standard deviation of those repeats (``data_stderr``) is the
error of the estimate against the curvature of the population the data were drawn from: it includes the
probe noise as well as the data noise.

XTrace (Epperly, Tropp & Webber 2024) is not provided: at equal products it improves on Hutch++ by a
constant factor, while Hutch++ keeps a simple, honest error bar (conditional on its sketch, the residual
part is a plain Hutchinson mean), which is what this module promises for every result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

__all__ = [
    "LanczosRun",
    "EigenResult",
    "TraceEstimate",
    "SpectralDensity",
    "lanczos",
    "top_eigenvalues",
    "estimate_trace",
    "slq",
    "TRACE_METHODS",
]

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "krylov", "exact")


def rademacher(dim: int, generator: torch.Generator, device: Any = "cpu", n: int | None = None) -> torch.Tensor:
    """Rademacher (+-1) float64 vector of length ``dim`` (or ``dim x n`` matrix), drawn on the CPU."""
    shape = (dim,) if n is None else (dim, n)
    z = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
    return z.to(device)


# --------------------------------------------------------------------------------------------- Lanczos


@dataclass
class LanczosRun:
    """Result of :func:`lanczos`: the tridiagonal ``T = Q^T A Q`` and the basis ``Q`` (rows)."""

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
            theta, s = tridiag_eig(np.array(alphas), np.array(betas))
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


def tridiag_eig(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix (float64)."""
    if len(alpha) == 1:
        return alpha.astype(np.float64), np.ones((1, 1))
    return eigh_tridiagonal(alpha.astype(np.float64), beta.astype(np.float64))


# ------------------------------------------------------------------------------------------ eigenvalues


@dataclass
class EigenResult:
    """Eigenvalues (largest algebraic first for Lanczos, largest magnitude first for power iteration),
    flat float64 eigenvectors (rows), residuals ``||A v - lambda v||`` (Lanczos: the estimates
    ``|beta_m s_{m,i}|``, which bound the eigenvalue error), per-value convergence flags, the method,
    iterations and operator products. With ``data_resamples``, ``data_stderr`` holds the bootstrap
    standard deviation of each eigenvalue over resampled data (and ``data_values`` the repeats)."""

    values: torch.Tensor
    vectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    method: str
    iterations: int
    num_matvecs: int
    data_stderr: torch.Tensor | None = None
    data_values: torch.Tensor | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        out = {
            "values": self.values.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": [bool(c) for c in self.converged],
            "method": self.method,
            "iterations": self.iterations,
            "num_matvecs": self.num_matvecs,
        }
        if self.data_stderr is not None:
            out["data_stderr"] = self.data_stderr.tolist()
        return out


def _check_resamples(op: Any, data_resamples: int) -> int:
    n = int(data_resamples)
    if n != data_resamples or n < 0 or n == 1:
        raise ValueError(f"data_resamples must be 0 or an integer >= 2, got {data_resamples!r}")
    if n and not hasattr(op, "resample"):
        raise ValueError("data_resamples needs an operator built from data (with a resample method)")
    return n


def top_eigenvalues(
    op: Any,
    *,
    k: int = 1,
    method: str = "lanczos",
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    data_resamples: int = 0,
    v0: torch.Tensor | None = None,
) -> EigenResult:
    """Top-``k`` eigenvalues of a symmetric operator with convergence information.

    ``method="lanczos"``: Lanczos with full reorthogonalisation; the ``k`` largest *algebraic* Ritz
    values, stopping when every residual estimate ``|beta_m s_{m,i}|`` is at most ``tol * |theta|_max``
    (default ``tol=1e-5``; ``max_iter`` steps, default 100, each one product; ``tol=0`` runs exactly
    ``max_iter`` products). ``method="power"``: power iteration with deflation, each eigenvalue the largest
    in *magnitude* of the remaining spectrum (it may be negative); stops when the Rayleigh quotient
    changes by at most ``tol * |lambda|`` and the residual ``||Av - lambda v||`` is at most
    ``sqrt(tol) * |lambda|`` (default ``tol=1e-4``, ``max_iter=200`` per eigenvalue); otherwise
    ``converged`` is False. ``v0`` sets the (first) start vector instead of a seeded Gaussian one, e.g.
    the top eigenvector of an earlier checkpoint to track it during training. The lecture notes "Towards Understanding SGD" (papers/004, section 2) use the
    top Hessian eigenvalue as the flatness measure.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k > op.dim:
        raise ValueError(f"k={k} exceeds the number of parameters of the block ({op.dim})")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    n_res = _check_resamples(op, data_resamples)
    start = getattr(op, "num_matvecs", 0)
    gen = torch.Generator().manual_seed(int(seed))
    try:
        res = _lanczos_top(op, k, max_iter, tol, gen, return_vectors, v0) if method == "lanczos" else \
            _power_top(op, k, max_iter, tol, gen, return_vectors, v0)
    finally:
        if hasattr(op, "release"):
            op.release()
    if n_res:
        data_gen = torch.Generator().manual_seed(int(seed) + 7919)
        reps = []
        for r in range(n_res):
            sub = op.resample(data_gen)
            reps.append(top_eigenvalues(sub, k=k, method=method, max_iter=max_iter, tol=tol,
                                        seed=int(seed) + 1 + r).values)
        res.data_values = torch.stack(reps)
        res.data_stderr = res.data_values.std(dim=0, unbiased=True)
    res.num_matvecs = getattr(op, "num_matvecs", 0) - start if hasattr(op, "num_matvecs") else res.num_matvecs
    return res


def _lanczos_top(op, k, max_iter, tol, gen, return_vectors, v0=None) -> EigenResult:
    tol = 1e-5 if tol is None else float(tol)
    steps = min(op.dim, max(int(max_iter or 100), k + 1) if op.dim > k else op.dim)
    run = lanczos(op.matvec, op.dim, steps, v0=v0, generator=gen, device=op.device, k=k,
                  tol=tol if tol > 0 else None)
    theta, s = tridiag_eig(run.alpha, run.beta)
    order = np.argsort(theta)[::-1][:k]
    values = torch.tensor(theta[order].copy(), dtype=torch.float64)
    resid = torch.tensor(np.abs(run.last_beta * s[-1, order]), dtype=torch.float64)
    if run.steps >= op.dim:
        resid = torch.zeros_like(resid)  # the Krylov space is the whole space: exact
    scale = float(np.max(np.abs(theta))) or 1.0
    converged = resid <= (tol if tol > 0 else 1e-5) * scale
    vectors = None
    if return_vectors and run.basis is not None:
        vectors = torch.tensor(s[:, order].T.copy(), dtype=torch.float64, device=op.device) @ run.basis
    return EigenResult(values, vectors, resid, converged, "lanczos", run.steps, run.steps)


def _deflate(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for u in basis:
        v = v - torch.dot(u, v) * u
    return v


def _power_top(op, k, max_iter, tol, gen, return_vectors, v0=None) -> EigenResult:
    tol = 1e-4 if tol is None else float(tol)
    max_iter = int(max_iter or 200)
    found: list[torch.Tensor] = []
    vals, ress, conv = [], [], []
    total_iters = 0
    for i in range(k):
        v = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.device)
        if i == 0 and v0 is not None:
            v = v0.reshape(-1).to(device=op.device, dtype=torch.float64).clone()
        v = _deflate(v, found)
        v /= v.norm()
        lam_prev = None
        ok = False
        lam, res = 0.0, float("inf")
        for _it in range(max_iter):
            total_iters += 1
            w = _deflate(op.matvec(v).to(torch.float64), found)
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
        total_iters,
    )


# ------------------------------------------------------------------------------------------------ trace


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error over the probe vectors.

    ``value`` and ``stderr``: for Hutchinson the mean of ``z^T A z`` over ``num_samples`` Rademacher
    vectors and ``std / sqrt(num_samples)``; for Hutch++ the exact trace of the sketched part plus the
    Hutchinson mean of the projected residual, whose standard error (conditional on the sketch) is the
    estimate's; for ``"exact"`` zero. ``samples`` holds the individual quadratic forms, ``dof`` the degrees
    of freedom of ``stderr`` (``num_samples - 1``), ``num_matvecs`` the products used. With
    ``data_resamples``: ``data_stderr`` (bootstrap standard deviation over resampled data, probe noise
    included) and ``data_values``.
    """

    value: float
    stderr: float
    num_samples: int
    samples: list[float] = field(repr=False, default_factory=list)
    method: str = "hutchinson"
    num_matvecs: int = 0
    data_stderr: float | None = None
    data_values: list[float] | None = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.value)

    @property
    def dof(self) -> int:
        return max(self.num_samples - 1, 1)

    def interval(self, level: float = 0.95, *, data: bool = True) -> tuple[float, float]:
        """A two-sided interval at ``level``: ``value +- t_{dof} stderr`` (Student's t over the probes),
        or with ``data`` and ``data_stderr`` available, ``value +- z data_stderr`` (normal quantile)."""
        from scipy import stats

        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        if data and self.data_stderr is not None:
            half = float(stats.norm.ppf(0.5 + level / 2)) * self.data_stderr
        else:
            half = float(stats.t.ppf(0.5 + level / 2, self.dof)) * self.stderr
        return self.value - half, self.value + half

    def as_dict(self) -> dict:
        out = {"value": self.value, "stderr": self.stderr, "num_samples": self.num_samples,
               "method": self.method, "num_matvecs": self.num_matvecs}
        if self.data_stderr is not None:
            out["data_stderr"] = self.data_stderr
        return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("inf")


def estimate_trace(
    op: Any,
    *,
    method: str = "hutch++",
    num_matvecs: int = 99,
    seed: int = 0,
    rtol: float | None = None,
    min_samples: int = 10,
    data_resamples: int = 0,
    sketch: int | None = None,
) -> TraceEstimate:
    """Estimate ``tr(A)`` of a symmetric operator with ``num_matvecs`` products.

    ``"hutchinson"``: ``mean_i z_i^T A z_i`` over Rademacher ``z_i`` (Hutchinson 1990); with ``rtol``,
    stops once at least ``min_samples`` probes were drawn and ``stderr <= rtol |estimate|``.
    ``"hutch++"`` (Meyer et al. 2021, Algorithm 1): ``s = num_matvecs // 3`` Rademacher sketch vectors
    ``S``, ``Q = orth(A S)``, the exact ``tr(Q^T A Q)`` (``s`` products), plus Hutchinson with the
    remaining ``num_matvecs - 2 s`` probes projected off ``Q``; its error falls like ``1/m`` instead of
    ``1/sqrt(m)`` when the spectrum is dominated by a few large eigenvalues. ``"xtrace"`` (Epperly, Tropp
    and Webber 2024, the exchangeable estimator): ``k = num_matvecs // 2`` Rademacher vectors are each
    the test vector once and part of the sketch otherwise; see :func:`_xtrace`. ``"exact"``: the sum of
    ``e_i^T A e_i`` (``dim`` products; small blocks and tests).

    ``sketch`` sets the split of the budget between the low-rank part and the probes: Hutch++'s number of
    sketch vectors ``s`` (default ``m // 3``; it leaves ``m - 2 s`` probes) or the Krylov variant's number
    of Lanczos steps (default ``m // 2``; it leaves ``m - sketch`` probes). The defaults suit spectra that
    decay fast, where deflation removes most of the variance; on flat spectra a smaller sketch leaves more
    probes (docs/curvature.md measures both cases).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {', '.join(TRACE_METHODS)}, got {method!r}")
    m = int(num_matvecs)
    need = {"hutchinson": 2, "hutch++": 4, "xtrace": 6, "krylov": 3, "exact": 0}[method]
    if m != num_matvecs or m < need:
        raise ValueError(f"num_matvecs must be an integer >= {need} for {method}, got {num_matvecs!r}")
    if sketch is not None:
        room = {"hutch++": (m - 2) // 2, "krylov": m - 2}.get(method)
        if room is None:
            raise ValueError(f"sketch applies to hutch++ and krylov, not {method}")
        if isinstance(sketch, bool) or int(sketch) != sketch or not 1 <= sketch <= room:
            raise ValueError(f"sketch must be an integer in [1, {room}] for {method} with num_matvecs={m} "
                             f"(at least 2 probes must remain), got {sketch!r}")
        sketch = int(sketch)
    n_res = _check_resamples(op, data_resamples)
    gen = torch.Generator().manual_seed(int(seed))
    start = getattr(op, "num_matvecs", 0)
    try:
        if method == "hutchinson":
            samples: list[float] = []
            for i in range(m):
                z = rademacher(op.dim, gen, op.device)
                samples.append(float(torch.dot(z, op.matvec(z).to(torch.float64))))
                if rtol is not None and i + 1 >= max(2, min_samples):
                    mu, se = mean_se(samples)
                    if se <= rtol * abs(mu):
                        break
            value, se = mean_se(samples)
        elif method == "hutch++":
            value, se, samples = _hutchpp(op, m, gen, sketch)
        elif method == "xtrace":
            value, se, samples = _xtrace(op, m, gen)
        elif method == "krylov":
            value, se, samples = _krylov_deflated(op, m, gen, sketch)
        else:
            eye = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
            total = 0.0
            for i in range(op.dim):
                eye.zero_()
                eye[i] = 1.0
                total += float(op.matvec(eye)[i])
            value, se, samples = total, 0.0, []
    finally:
        if hasattr(op, "release"):
            op.release()
    used = getattr(op, "num_matvecs", 0) - start if hasattr(op, "num_matvecs") else m
    est = TraceEstimate(value, se, len(samples), samples, method, used)
    if n_res:
        data_gen = torch.Generator().manual_seed(int(seed) + 7919)
        reps = [float(estimate_trace(op.resample(data_gen), method=method, num_matvecs=m, seed=int(seed) + 1 + r,
                            rtol=rtol, min_samples=min_samples, sketch=sketch).value) for r in range(n_res)]
        est.data_values = reps
        est.data_stderr = float(np.std(reps, ddof=1))
    return est


def _hutchpp(op: Any, m: int, gen: torch.Generator, sketch: int | None = None) -> tuple[float, float, list[float]]:
    s = m // 3 if sketch is None else sketch
    r = m - 2 * s
    sketch = rademacher(op.dim, gen, op.device, n=s)
    y = torch.stack([op.matvec(sketch[:, j]).to(torch.float64) for j in range(s)], dim=1)
    q, _ = torch.linalg.qr(y)
    top = sum(float(torch.dot(q[:, j], op.matvec(q[:, j]).to(torch.float64))) for j in range(q.shape[1]))
    samples = []
    for _ in range(r):
        z = rademacher(op.dim, gen, op.device)
        z = z - q @ (q.T @ z)
        samples.append(float(torch.dot(z, op.matvec(z).to(torch.float64))))
    mu, se = mean_se(samples)
    return top + mu, se, samples


def _xtrace(op: Any, m: int, gen: torch.Generator) -> tuple[float, float, list[float]]:
    """XTrace (Epperly, Tropp & Webber, SIAM J. Matrix Anal. Appl. 2024, section 2): every probe serves
    both roles of Hutch++.

    With ``k = m // 2`` Rademacher vectors ``W``, ``Y = A W`` and ``Q R = Y``, ``Z = A Q`` (``2k``
    products). For each ``i``, ``Q_i = orth(Y`` without column ``i)`` does not depend on ``w_i``, so
    ``t_i = tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i`` is unbiased; the estimate is the
    mean of the ``t_i``. ``Q_i = Q U_i`` with ``U_i = orth(R`` without column ``i)``, so every term comes
    from ``Y``, ``Z`` and small ``k x k`` algebra, with no further products. The standard error is the
    paper's estimate, the spread of the ``t_i`` over ``sqrt(k)``.
    """
    k = m // 2
    if k >= op.dim:  # the sketch spans the space: tr(Q^T A Q) is the trace
        k = op.dim
    w = rademacher(op.dim, gen, op.device, n=k)
    y = torch.stack([op.matvec(w[:, j]).to(torch.float64) for j in range(k)], dim=1)
    q, r = torch.linalg.qr(y)
    z = torch.stack([op.matvec(q[:, j]).to(torch.float64) for j in range(k)], dim=1)
    qtz = q.T @ z
    qtz = 0.5 * (qtz + qtz.T)
    if k == op.dim:
        return float(torch.trace(qtz)), 0.0, []
    qtw = q.T @ w
    samples = []
    for i in range(k):
        u, _ = torch.linalg.qr(torch.cat([r[:, :i], r[:, i + 1:]], dim=1))  # k x (k-1)
        small = u.T @ qtz @ u
        c = u.T @ qtw[:, i]  # Q_i^T w_i
        resid = w[:, i] - q @ (u @ c)  # (I - Q_i Q_i^T) w_i
        a_resid = y[:, i] - z @ (u @ c)  # A (I - Q_i Q_i^T) w_i
        samples.append(float(torch.trace(small)) + float(torch.dot(resid, a_resid)))
    mu, se = mean_se(samples)
    return mu, se, samples


def _krylov_deflated(op: Any, m: int, gen: torch.Generator,
                     sketch: int | None = None) -> tuple[float, float, list[float]]:
    steps = min(m // 2 if sketch is None else sketch, op.dim)
    run = lanczos(op.matvec, op.dim, steps, v0=rademacher(op.dim, gen, op.device), generator=gen,
                  device=op.device, keep_basis=True)
    q = run.basis.T  # dim x steps, orthonormal columns
    top = float(np.sum(run.alpha))  # tr(Q^T A Q): the Lanczos diagonal q_j^T A q_j
    samples = []
    for _ in range(m - run.steps):
        z = rademacher(op.dim, gen, op.device)
        z = z - q @ (q.T @ z)
        z = z - q @ (q.T @ z)  # twice: the projection must hold to rounding
        samples.append(float(torch.dot(z, op.matvec(z).to(torch.float64))))
    if run.steps >= op.dim:  # the Krylov space is the whole space: exact
        return top, 0.0, []
    mu, se = mean_se(samples)
    return top + mu, se, samples


# ------------------------------------------------------------------------------------- spectral density


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature of a spectrum.

    ``nodes[v]`` and ``weights[v]`` are the Ritz values and squared first components of the Ritz vectors
    of run ``v`` (each row's weights sum to 1); the spectral measure is
    ``mu ~ (1/n_v) sum_v sum_j weights[v, j] delta(t - nodes[v, j])``, so
    ``tr f(A) ~ dim * E[sum_j w f(theta)]``.
    ``grid``/``density`` hold the Gaussian-broadened density (integrating to 1) with width ``sigma``;
    ``density_stderr`` its pointwise standard error over the ``n_v`` start vectors.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    density_stderr: np.ndarray | None = None

    def _per_vector(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        g = np.asarray(grid, dtype=np.float64)[None, :, None]
        th, w = self.nodes[:, None, :], self.weights[:, None, :]
        return (w * np.exp(-0.5 * ((g - th) / sigma) ** 2)).sum(-1) / (sigma * math.sqrt(2 * math.pi))

    def broadened(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        """The density on ``grid`` with Gaussian broadening of standard deviation ``sigma``."""
        return self._per_vector(grid, sigma).mean(0)

    def trace_of(self, fn: Callable[[np.ndarray], np.ndarray]) -> float:
        """SLQ estimate of ``tr f(A)`` (e.g. ``np.log`` for the log-determinant of a positive-definite A)."""
        return self.trace_of_with_stderr(fn)[0]

    def trace_of_with_stderr(self, fn: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
        """SLQ estimate of ``tr f(A)`` and its standard error over the start vectors."""
        vals = np.array([float(np.sum(w * fn(th))) for th, w in zip(self.nodes, self.weights)]) * self.dim
        se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("inf")
        return float(vals.mean()), se

    def as_dict(self) -> dict:
        out = {
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "dim": self.dim,
            "sigma": self.sigma,
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
        }
        if self.density_stderr is not None:
            out["density_stderr"] = self.density_stderr.tolist()
        return out


def slq(
    op: Any,
    *,
    num_vectors: int = 4,
    num_steps: int = 64,
    sigma: float | None = None,
    num_points: int = 512,
    seed: int = 0,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature, Gaussian broadening.

    ``num_vectors`` Rademacher start vectors, ``num_steps`` Lanczos steps each (full reorthogonalisation),
    Gauss quadrature nodes and weights from each tridiagonal matrix (Golub & Meurant; Lin, Saad & Yang
    2016; Ghorbani et al. 2019). The broadened density is
    ``phi(t) = (1/n_v) sum_v sum_j w_vj N(t; theta_vj, sigma^2)``, a Gaussian of standard deviation
    ``sigma`` on every node; ``sigma`` defaults to 1% of the spread of the nodes (wider smooths the bulk,
    narrower resolves outliers but shows the quadrature's discreteness). It is evaluated on
    ``num_points`` points spanning the nodes with a margin of ``5 sigma``.
    """
    if num_vectors < 1 or num_steps < 1:
        raise ValueError("num_vectors and num_steps must be >= 1")
    if isinstance(num_points, bool) or int(num_points) != num_points or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2 (the density's grid), got {num_points!r}")
    gen = torch.Generator().manual_seed(int(seed))
    nodes, weights = [], []
    try:
        for _ in range(int(num_vectors)):
            z = rademacher(op.dim, gen, op.device)
            run = lanczos(op.matvec, op.dim, num_steps, v0=z, generator=gen, device=op.device, keep_basis=False)
            theta, s = tridiag_eig(run.alpha, run.beta)
            nodes.append(theta)
            weights.append(s[0, :] ** 2)
    finally:
        if hasattr(op, "release"):
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
    per = sd._per_vector(grid, float(sigma))
    sd.density = per.mean(0)
    if len(per) > 1:
        sd.density_stderr = per.std(0, ddof=1) / math.sqrt(len(per))
    return sd
