"""Variance reduction of importance-sampling schemes on a trained network (Katharopoulos & Fleuret 2018, 4.1).

The paper's ablation (section 4.1, Fig. 2): from a trained network, presample ``B = 1,024`` examples
uniformly, resample ``b = 128`` of them by each scheme (uniform, loss, the upper bound of eq. 19, the
exact per-example gradient norm), reweight by ``1 / (B g_i)``, and measure how far the weighted
mini-batch gradient lands from the presample's full gradient; and how well each cheap score
correlates with the exact gradient norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..sampling.importance import _check_loss, _loss, normalize_scores, tau, upper_bound_scores
from ._data import as_batches, eval_mode, model_device, trainable_parameters, unwrap_model

__all__ = ["SCHEMES", "variance_reduction"]

SCHEMES = ("uniform", "loss", "upper_bound", "gradnorm")


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Any, chunk: int) -> torch.Tensor:
    """Flattened per-example gradients ``(n, P)`` over the trainable parameters (torch.func)."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in trainable_parameters(model)]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return _loss(out, yi.unsqueeze(0), loss).sum()

    f = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
    out = []
    for i in range(0, x.shape[0], chunk):
        g = f(params, x[i:i + chunk], y[i:i + chunk])
        out.append(torch.cat([g[n].flatten(1) for n in names], dim=1).double())
    return torch.cat(out)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = a.norm() * b.norm()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _ranks(a: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (presamples drawn with replacement repeat examples)."""
    from scipy.stats import rankdata

    return torch.as_tensor(rankdata(a.double().numpy()), dtype=torch.float64)


def variance_reduction(model: nn.Module, data: Any, *, presample: int = 1024, batch: int = 128,
                       schemes: Sequence[str] = SCHEMES, repeats: int = 10,
                       loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
                       chunk_size: int = 256, seed: int = 0) -> dict:
    """Section 4.1 ablation: gradient error of each resampling scheme and score/gradient-norm correlations.

    Each repeat draws ``presample`` examples uniformly with replacement from ``data`` (an ``(x, y)``
    pair or an iterable of batches), computes their exact per-example gradients (``torch.func``) and
    the presample's mean gradient ``G``, then for every scheme in ``schemes`` draws ``batch`` slots
    with replacement with probabilities ``g ∝ score`` (``uniform``: equal), forms the weighted
    estimate ``mean(w_i grad_i)``, ``w_i = 1 / (B g_i)``, and records ``||estimate - G||``.

    Returns ``{"presample", "batch", "repeats", "full_grad_norm", "schemes": {name: {...}},
    "correlation": {name: {"pearson", "spearman"}}}`` where each scheme has ``distance`` (mean over
    repeats), ``distance_se`` (its standard error), ``relative_distance`` (``distance / ||G||``, mean),
    ``expected_sq_distance`` (the exact ``E||estimate - G||^2 = (sum_i ||grad_i||^2 / (B^2 g_i) -
    ||G||^2) / b``, mean over repeats) and ``tau`` (:func:`~sgdlab.sampling.importance.tau`, "std", mean);
    correlations are pooled over repeats for every non-uniform scheme, against the exact gradient norm.
    The model is evaluated in eval mode and its mode restored.
    """
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown or not schemes:
        raise ValueError(f"schemes must be a non-empty subset of {SCHEMES}, got {list(schemes)!r}")
    for name, v in (("presample", presample), ("batch", batch), ("repeats", repeats), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    _check_loss(loss)
    model = unwrap_model(model)
    device = model_device(model)
    batches = as_batches(data, device=device)
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    n = x_all.shape[0]
    gen = torch.Generator().manual_seed(seed)
    dist: dict[str, list[float]] = {s: [] for s in schemes}
    rel: dict[str, list[float]] = {s: [] for s in schemes}
    expected: dict[str, list[float]] = {s: [] for s in schemes}
    taus: dict[str, list[float]] = {s: [] for s in schemes}
    pooled: dict[str, list[torch.Tensor]] = {s: [] for s in ("loss", "upper_bound", "gradnorm")}
    full_norms = []
    with eval_mode(model):
        for _ in range(repeats):
            pre = torch.randint(n, (presample,), generator=gen)
            x, y = x_all[pre.to(device)], y_all[pre.to(device)]
            grads = _per_example_grads(model, x, y, loss, chunk_size)
            full = grads.mean(0)
            full_norm = float(full.norm())
            full_norms.append(full_norm)
            gnorm = grads.norm(dim=1)
            with torch.no_grad():
                z = torch.cat([model(x[i:i + chunk_size]).float() for i in range(0, presample, chunk_size)])
            scores = {
                "uniform": torch.ones(presample, dtype=torch.float64),
                "loss": _loss(z, y, loss).detach().double().cpu(),
                "upper_bound": upper_bound_scores(z, y, loss).double().cpu(),
                "gradnorm": gnorm.cpu(),
            }
            for s, acc in pooled.items():
                acc.append(scores[s])
            gn_cpu = grads.cpu()
            for s in schemes:
                g = normalize_scores(scores[s])
                slots = torch.multinomial(g, batch, replacement=True, generator=gen)
                w = 1.0 / (presample * g[slots])
                est = (w.unsqueeze(1) * gn_cpu[slots]).mean(0)
                d = float((est - full.cpu()).norm())
                dist[s].append(d)
                rel[s].append(d / full_norm if full_norm > 0 else float("nan"))
                pos = g > 0
                sq = gnorm.cpu().pow(2)
                if bool((sq[~pos] > 0).any()):
                    expected[s].append(float("inf"))  # a zero-probability example with a nonzero gradient
                else:
                    second = float((sq[pos] / g[pos]).sum()) / presample ** 2
                    expected[s].append(max(second - full_norm ** 2, 0.0) / batch)
                taus[s].append(tau(g))

    def mean(v):
        return sum(v) / len(v)

    def se(v):
        if len(v) < 2:
            return float("nan")
        m = mean(v)
        return math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1) / len(v))

    out_schemes = {s: {"distance": mean(dist[s]), "distance_se": se(dist[s]), "relative_distance": mean(rel[s]),
                       "expected_sq_distance": mean(expected[s]), "tau": mean(taus[s])} for s in schemes}
    exact = torch.cat(pooled["gradnorm"])
    corr = {}
    for s in ("loss", "upper_bound", "gradnorm"):
        if s in schemes or s != "gradnorm":
            v = torch.cat(pooled[s])
            corr[s] = {"pearson": _pearson(v, exact), "spearman": _pearson(_ranks(v), _ranks(exact))}
    return {"presample": presample, "batch": batch, "repeats": repeats, "full_grad_norm": mean(full_norms),
            "schemes": out_schemes, "correlation": corr}
