"""Keskar et al.'s (C_eps, A)-sharpness (lecture notes "Towards Understanding SGD", Definition 2).

    phi_{x,f}(eps, A) = (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)) * 100            (eq. 2)
    C_eps = { z in R^p : |z_i| <= eps (|(A^+ x)_i| + 1) }                                     (eq. 3)

The inner maximisation uses L-BFGS-B with the box as bounds (``scipy.optimize.minimize``) in float64,
started from a seeded uniform point inside the box: at an exact minimum the gradient vanishes and a
start at ``y = 0`` would never move. The variables are rescaled to the unit box and the objective is
scaled so that its gradient at the start has unit max-norm, so that very flat functions such as
``x^8`` (gradients of 1e-21) are still maximised (the lecture's Table 1 rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import minimize

from ._data import (
    analysis_mode,
    as_batches,
    check_loss,
    flatten,
    logits_of,
    model_device,
    num_examples,
    trainable_parameters,
    unwrap_model,
)

__all__ = ["keskar_sharpness", "model_sharpness", "random_subspace"]


def random_subspace(n: int, p: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random ``n x p`` matrix with i.i.d. standard normal entries (seeded), Keskar et al.'s ``A``."""
    if n < 1 or p < 1:
        raise ValueError(f"subspace shape must be positive, got {n} x {p}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, p, generator=gen, dtype=dtype)


def keskar_sharpness(
    f: Callable[[torch.Tensor], torch.Tensor | float],
    x: torch.Tensor | np.ndarray | float,
    *,
    eps: float = 1e-3,
    A: torch.Tensor | np.ndarray | None = None,
    max_iter: int = 10,
    seed: int = 0,
    return_info: bool = False,
) -> float | tuple[float, dict]:
    """(C_eps, A)-sharpness of ``f`` at ``x`` (the lecture notes "Towards Understanding SGD" eqs. 2-3; Keskar et al. 2017, section 2.2.2).

    ``f`` maps a flat float64 tensor of length ``n`` to a scalar; if its output carries autograd history
    the gradient is taken by autograd, otherwise scipy uses finite differences. ``A`` is ``None`` (the
    identity: the full space) or an ``n x p`` matrix (e.g. :func:`random_subspace`). The maximisation is
    L-BFGS-B under box bounds with at most ``max_iter`` iterations, from a uniform start in the box drawn
    with ``seed``. Returns phi in percent (``return_info=True`` also returns a dict with ``f0``, ``fmax``,
    the maximiser ``y``, the box radius and scipy's status).
    """
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    x64 = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(-1)
    n = x64.numel()
    if n == 0:
        raise ValueError("x is empty")
    if A is None:
        A64 = None
        radius = eps * (x64.abs() + 1.0)
    else:
        A64 = torch.as_tensor(np.asarray(A, dtype=np.float64))
        if A64.ndim == 1:
            A64 = A64.reshape(-1, 1)
        if A64.ndim != 2 or A64.shape[0] != n:
            raise ValueError(
                f"A must be an n x p matrix with n = {n} rows (the length of x), got shape {tuple(A64.shape)}"
            )
        radius = eps * ((torch.linalg.pinv(A64) @ x64).abs() + 1.0)
    p = radius.numel()

    def value(y: torch.Tensor) -> torch.Tensor | float:
        return f(x64 + (y if A64 is None else A64 @ y))

    with torch.no_grad():
        f0 = float(value(torch.zeros(p, dtype=torch.float64)))
    if not 1.0 + f0 > 0:
        raise ValueError(
            f"f(x) = {f0} makes 1 + f(x) non-positive: the sharpness of eq. 2 is defined for f > -1 "
            "(e.g. a non-negative loss)"
        )
    best = {"f": f0, "y": np.zeros(p)}

    def fun_and_grad(zn: np.ndarray, scale: float = 1.0) -> tuple[float, np.ndarray | None]:
        z = torch.tensor(zn, dtype=torch.float64, requires_grad=True)
        out = value(radius * z)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            (g,) = torch.autograd.grad(out, z)
            fv, gv = float(out.detach()), g.numpy().astype(np.float64)
        else:
            fv, gv = float(out), None
        if fv > best["f"] and np.isfinite(fv):
            best["f"], best["y"] = fv, (radius.numpy() * zn).copy()
        return -(fv - f0) * scale, (None if gv is None else -gv * scale)

    rng = np.random.default_rng(int(seed))
    z0 = rng.uniform(-1.0, 1.0, size=p)
    _, g0 = fun_and_grad(z0)
    uses_autograd = g0 is not None
    if uses_autograd:
        gmax = float(np.max(np.abs(g0)))
        scale = 1.0 / gmax if gmax > 0 and np.isfinite(gmax) else 1.0
    else:
        fz = abs(fun_and_grad(z0)[0])
        scale = 1.0 / fz if fz > 0 else 1.0

    if uses_autograd:
        res = minimize(
            lambda z: fun_and_grad(z, scale),
            z0,
            jac=True,
            method="L-BFGS-B",
            bounds=[(-1.0, 1.0)] * p,
            options={"maxiter": int(max_iter), "ftol": 0.0, "gtol": 0.0},
        )
    else:
        res = minimize(
            lambda z: fun_and_grad(z, scale)[0],
            z0,
            method="L-BFGS-B",
            bounds=[(-1.0, 1.0)] * p,
            options={"maxiter": int(max_iter), "ftol": 0.0, "gtol": 0.0},
        )
    fmax = max(best["f"], f0)
    phi = (fmax - f0) / (1.0 + f0) * 100.0
    if return_info:
        return phi, {
            "f0": f0,
            "fmax": fmax,
            "y": best["y"],
            "radius": radius.numpy(),
            "nit": int(res.nit),
            "nfev": int(res.nfev),
            "message": str(res.message),
        }
    return phi


def model_sharpness(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    *,
    eps: float = 1e-3,
    subspace_dim: int | None = None,
    A: torch.Tensor | None = None,
    max_iter: int = 10,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
    return_info: bool = False,
) -> float | tuple[float, dict]:
    """Keskar sharpness of the mean data loss of ``model`` at its current parameters (the lecture notes "Towards Understanding SGD" eq. 2).

    ``x`` is the flat vector of all trainable parameters; ``f(x)`` the mean of ``loss_fn`` over ``data``
    (batches weighted by size) in eval mode. ``subspace_dim=None`` (default) maximises over the full
    space (``A = I``, Keskar et al.'s main setting); ``subspace_dim=p`` uses a random ``n x p`` Gaussian
    ``A`` drawn with ``seed`` (Keskar et al. use ``p = 100``); or pass ``A`` directly. The loss is evaluated
    with every parameter and buffer in ``dtype`` (float64 by default; ``None`` keeps the parameters' dtype),
    supplied through ``torch.func.functional_call``: the model itself is not modified or cast.
    """
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    model = unwrap_model(model)
    named = trainable_parameters(model)
    device = model_device(model)
    batches = as_batches(data, device=device, dicts=True)
    total = num_examples(batches)
    names = [n for n, _ in named]
    base = flatten([p.detach() for _, p in named])
    n = base.numel()
    if A is not None and subspace_dim is not None:
        raise ValueError("give either A or subspace_dim, not both")
    if subspace_dim is not None:
        if subspace_dim < 1:
            raise ValueError(f"subspace_dim must be a positive integer, got {subspace_dim}")
        A = random_subspace(n, int(subspace_dim), seed=seed)
    if A is not None:
        A = torch.as_tensor(A)
        if A.ndim != 2 or A.shape[0] != n:
            raise ValueError(f"A must have one row per trainable parameter ({n}), got shape {tuple(A.shape)}")
    work_dtype = dtype or base.dtype
    shapes = [p.shape for _, p in named]
    # Every floating tensor the forward pass reads is supplied in the working dtype (buffers and frozen
    # parameters as constants), so the model itself is never cast.
    buffers = {k: (b.to(work_dtype) if b.is_floating_point() else b) for k, b in model.named_buffers()}
    trainable = set(names)
    buffers.update({k: p.detach().to(work_dtype) for k, p in model.named_parameters()
                    if k not in trainable and p.is_floating_point()})
    def cast(t: Any) -> Any:
        return t.to(work_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    # dict batches (Hugging Face inputs) go in as keyword arguments
    calls = [(((), {k: cast(v) for k, v in x.items()}) if isinstance(x, dict) else ((cast(x),), {}), y)
             for x, y in batches]

    def f(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(device=device, dtype=work_dtype)
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = int(np.prod(shape)) if len(shape) else 1
            params[name] = flat[i : i + k].view(shape)
            i += k
        out = 0.0
        for (args, kwargs), y in calls:
            logits = logits_of(torch.func.functional_call(model, {**buffers, **params}, args, kwargs))
            out = out + check_loss(loss_fn(logits, y)) * (y.shape[0] / total)
        return out.to(torch.float64).cpu()

    with analysis_mode(model):
        return keskar_sharpness(
            f,
            base.to(torch.float64).cpu(),
            eps=eps,
            A=A,
            max_iter=max_iter,
            seed=seed,
            return_info=return_info,
        )
