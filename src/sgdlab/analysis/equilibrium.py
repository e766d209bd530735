"""Which minimum SGD settles in, under isotropic gradient noise (Jastrzebski et al. 2017, "Three factors
influencing minima in SGD"; the lecture notes "Towards Understanding SGD" section 5.3).

With ``F(w) = s^2 I`` the SDE's equilibrium is ``P(w) = P_0 exp(-2 L(w) / ((lr/B) s^2))`` (eq. 25), and the
probability of ending in the basin of minimum ``A`` is taken, as in the lecture's eq. 26, proportional to
``det(H_A)^(-1/2) exp(-L_A / ((lr/B) s^2))``. (A Laplace approximation of eq. 25 would give ``2 L_A`` in
the exponent and a ``(lr/B)``-dependent prefactor; we implement eq. 26 as stated.) Everything is
computed in logs, so log-determinants of large Hessians can be used directly; both expressions depend on
``lr`` and ``B`` only through ``lr / B``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .hessian import HessianOperator, spectral_density

__all__ = ["log_minimum_weight", "relative_minimum_probability", "log_probability_ratio", "hessian_logdet"]


def _check(lr: float, batch_size: float, noise_variance: float) -> float:
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not batch_size > 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not noise_variance > 0:
        raise ValueError(f"noise_variance must be positive, got {noise_variance}")
    return lr / batch_size * noise_variance


def log_minimum_weight(
    loss: float, logdet: float, *, lr: float, batch_size: float, noise_variance: float = 1.0
) -> float:
    """Unnormalised log-probability of a minimum: ``-logdet(H)/2 - L / ((lr/B) s^2)`` (the lecture notes "Towards Understanding SGD" eq. 26)."""
    temp = _check(lr, batch_size, noise_variance)
    return float(-0.5 * logdet - loss / temp)


def relative_minimum_probability(
    losses: Sequence[float],
    logdets: Sequence[float],
    *,
    lr: float,
    batch_size: float,
    noise_variance: float = 1.0,
) -> np.ndarray:
    """Normalised probabilities of ending in each of several minima (the lecture notes "Towards Understanding SGD" eq. 26).

    ``losses[i]`` and ``logdets[i]`` (``log det H_i``) describe minimum ``i``; the weights
    ``det(H_i)^(-1/2) exp(-L_i / ((lr/B) s^2))`` are normalised to sum to one (a stable softmax in logs).
    For two minima, ``p[0] / p[1]`` is the relative probability (see :func:`log_probability_ratio`).
    """
    losses_a = np.asarray(losses, dtype=np.float64).reshape(-1)
    logdets_a = np.asarray(logdets, dtype=np.float64).reshape(-1)
    if losses_a.size == 0 or losses_a.shape != logdets_a.shape:
        raise ValueError("losses and logdets must be non-empty and of the same length")
    if not (np.all(np.isfinite(losses_a)) and np.all(np.isfinite(logdets_a))):
        raise ValueError("losses and logdets must be finite (a minimum needs a positive-definite Hessian)")
    temp = _check(lr, batch_size, noise_variance)
    logw = -0.5 * logdets_a - losses_a / temp
    logw -= logw.max()
    w = np.exp(logw)
    return w / w.sum()


def log_probability_ratio(
    loss_a: float,
    logdet_a: float,
    loss_b: float,
    logdet_b: float,
    *,
    lr: float,
    batch_size: float,
    noise_variance: float = 1.0,
) -> float:
    """``log(P(A) / P(B)) = -(logdet_A - logdet_B)/2 - (L_A - L_B) / ((lr/B) s^2)`` (the lecture notes "Towards Understanding SGD" eq. 26)."""
    temp = _check(lr, batch_size, noise_variance)
    return float(-0.5 * (logdet_a - logdet_b) - (loss_a - loss_b) / temp)


def hessian_logdet(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    *,
    method: str = "slq",
    num_vectors: int = 8,
    num_steps: int = 64,
    seed: int = 0,
) -> float:
    """``log det H`` of the data-loss Hessian: ``"dense"`` (exact, small models) or ``"slq"`` (stochastic
    Lanczos quadrature estimate of ``tr log H``). ``ValueError`` if H is not positive definite."""
    if method == "dense":
        op = HessianOperator(model, loss_fn, data)
        try:
            h = op.dense()
        finally:
            op.release()
        h = 0.5 * (h + h.T)
        ev = torch.linalg.eigvalsh(h)
        if float(ev.min()) <= 0:
            raise ValueError(
                f"the Hessian is not positive definite (smallest eigenvalue {float(ev.min()):.3g})"
            )
        return float(torch.log(ev).sum())
    if method == "slq":
        sd = spectral_density(model, loss_fn, data, num_vectors=num_vectors, num_steps=num_steps, seed=seed)
        if float(sd.nodes.min()) <= 0:
            raise ValueError("the Hessian is not positive definite (a non-positive Ritz value was found)")
        return sd.trace_of(np.log)
    raise ValueError(f"method must be 'slq' or 'dense', got {method!r}")
