"""Loss and accuracy along a path between two solutions (the lecture notes "Towards Understanding SGD" section 3.2, Fig. 5; Keskar et al. 2017).

``curve="linear"``: ``theta(alpha) = alpha * theta_b + (1 - alpha) * theta_a`` -- the lecture's
``f(alpha x_l + (1 - alpha) x_s)`` with ``model_a = x_s`` (small batch) and ``model_b = x_l`` (large batch).
``curve="sincos"``: ``theta(alpha) = sin(alpha pi / 2) theta_b + cos(alpha pi / 2) theta_a``.
So ``alpha = 0`` is ``model_a`` and ``alpha = 1`` is ``model_b`` on both paths.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ._data import as_batches, check_loss, eval_mode, model_device, num_examples, unwrap_model

__all__ = ["interpolate", "interpolation_coefficients", "evaluate"]


def interpolation_coefficients(alpha: float, curve: str = "linear") -> tuple[float, float]:
    """``(c_a, c_b)`` with ``theta(alpha) = c_a theta_a + c_b theta_b`` on the given curve."""
    path = curve
    if path == "linear":
        return 1.0 - alpha, alpha
    if path == "sincos":
        return math.cos(alpha * math.pi / 2), math.sin(alpha * math.pi / 2)
    raise ValueError(f"curve must be 'linear' or 'sincos', got {path!r}")


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], data: Any
) -> dict:
    """Mean loss (batches weighted by size) and accuracy (``argmax`` of 2-D outputs against integer
    targets; ``None`` otherwise) of ``model`` on ``data`` in eval mode."""
    model = unwrap_model(model)
    batches = as_batches(data, device=model_device(model))
    total = num_examples(batches)
    loss, correct, has_acc = 0.0, 0, True
    with eval_mode(model):
        for x, y in batches:
            out = model(x)
            loss += float(check_loss(loss_fn(out, y))) * x.shape[0] / total
            if out.ndim == 2 and not y.is_floating_point() and y.ndim == 1:
                correct += int((out.argmax(1) == y).sum())
            else:
                has_acc = False
    return {"loss": loss, "accuracy": correct / total if has_acc else None}


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    *,
    alphas: Iterable[float] | None = None,
    curve: str = "linear",
    path: str | None = None,
) -> list[dict]:
    """Evaluate the model at ``theta(alpha)`` between ``model_a`` (alpha 0) and ``model_b`` (alpha 1).

    Implements the parametric plots of the lecture notes "Towards Understanding SGD" section 3.2 (Fig. 5). Parameters *and* floating-point
    buffers (BatchNorm running mean/var) are interpolated; integer buffers (``num_batches_tracked``) and
    floating buffers equal in both models (constants) are kept from ``model_a``; running variances are
    clamped at zero when extrapolating. ``alphas`` defaults to
    ``linspace(-1, 2, 25)``. Returns one dict per alpha: ``{"alpha", "loss", "accuracy"}`` on ``data``
    (mean loss, batches weighted by size; eval mode). The two models are not modified.

    ``curve`` is ``"linear"`` or ``"sincos"``. ``path=`` is its deprecated old name (``path`` means a file
    name everywhere else, e.g. :func:`plot_interpolation`).
    """
    if path is not None:
        warnings.warn("interpolate(path=...) is deprecated: use curve='linear' or curve='sincos' (path= is a "
                      "file name in the plot functions)", DeprecationWarning, stacklevel=2)
        curve = path
    path = curve
    interpolation_coefficients(0.0, path)  # validates the curve
    model_a, model_b = unwrap_model(model_a), unwrap_model(model_b)
    alphas = list(np.linspace(-1.0, 2.0, 25) if alphas is None else alphas)
    if not alphas:
        raise ValueError("alphas is empty")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    params = {k for k, _ in model_a.named_parameters()}
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise ValueError("model_a and model_b must have the same architecture (state_dict keys and shapes)")
    if not any(True for _ in model_a.parameters()):
        raise ValueError("model_a has no parameters")
    data = as_batches(data)  # validate early; a one-shot iterable is read once and reused for every alpha
    work = copy.deepcopy(model_a)
    work.train(model_a.training)
    results = []
    for alpha in alphas:
        ca, cb = interpolation_coefficients(float(alpha), path)
        state = {}
        for k, va in sa.items():
            vb = sb[k]
            if va.is_floating_point() and not (k not in params and torch.equal(va, vb.to(va.device))):
                v = ca * va + cb * vb.to(va.device)
                if k.endswith("running_var"):
                    v = v.clamp_min(0.0)
                state[k] = v
            else:
                state[k] = va.clone()
        work.load_state_dict(state)
        res = evaluate(work, loss_fn, data)
        results.append({"alpha": float(alpha), **res})
    return results
