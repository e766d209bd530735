"""Noise scales of SGD.

- :func:`sgd_noise_scale`: Smith & Le's noise scale of the SGD dynamics, ``g = lr (N/B - 1) ~ lr N / B``
  (lecture notes papers/004, section 5.2, eq. 24); with momentum ``m`` (Smith et al. 2018, "Don't decay
  the learning rate, increase the batch size", eq. 6): ``g = lr / (1 - m) (N/B - 1)``.
- :func:`gradient_noise_scale`: McCandlish et al.'s "simple" gradient noise scale
  ``B_simple = tr(Sigma) / |G|^2`` ("An Empirical Model of Large-Batch Training", 2018, eq. 2.8), ``G`` the
  mean gradient over the data and ``Sigma`` the covariance of the per-example gradients over the data
  (normalised by ``N``: the noise of a batch drawn with replacement is ``Sigma / B``). Either exactly from
  per-example gradients (``torch.func.vmap(grad)`` over ``functional_call``), or by McCandlish et al.'s
  unbiased two-batch-size estimators (their Appendix A.1):
  ``|G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)`` and
  ``tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)``, averaged over repeated draws (with
  replacement) before taking the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import NonFiniteLossError
from ._data import (
    as_batches,
    check_loss,
    eval_mode,
    flatten,
    model_device,
    num_examples,
    trainable_parameters,
    unwrap_model,
)

__all__ = ["sgd_noise_scale", "gradient_noise_scale", "gradient_noise_stats"]


def sgd_noise_scale(lr: float, num_samples: int, batch_size: int, momentum: float = 0.0) -> float:
    """SGD noise scale ``g = lr / (1 - momentum) * (N / B - 1)`` (papers/004 eq. 24; Smith et al. 2018)."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 1 <= batch_size <= num_samples:
        raise ValueError(f"batch_size must be in [1, num_samples={num_samples}], got {batch_size}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return lr / (1.0 - momentum) * (num_samples / batch_size - 1.0)


def _concat(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


EXACT_BUDGET = 2e9  # examples x parameters up to which method="auto" computes per-example gradients
CHUNK_FLOATS = 2**24  # per-example gradients held at once (64 MiB in float32)


def gradient_noise_stats(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    *,
    method: str = "exact",
    batch_sizes: tuple[int, int] = (16, 256),
    num_pairs: int = 32,
    seed: int = 0,
    level: float = 0.95,
    num_bootstrap: int = 2000,
) -> dict:
    """``|G|^2``, ``tr(Sigma)`` and ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, eq. 2.8).

    ``method="exact"``: per-example gradients by ``torch.func.vmap(torch.func.grad(...))`` over
    ``functional_call`` (``loss_fn`` applied to one-example batches), in chunks of at most
    ``CHUNK_FLOATS`` numbers, accumulated in float64: ``G = mean_i g_i``, ``tr(Sigma) = mean_i |g_i - G|^2``.
    ``method="two_batch"``: ``num_pairs`` independent pairs of batches of sizes ``batch_sizes =
    (B_small, B_big)`` drawn with replacement (seeded); the unbiased estimates of ``|G|^2`` and
    ``tr(Sigma)`` (McCandlish et al., Appendix A.1) are averaged over the pairs and then divided. The
    ratio of means is biased and heavy-tailed when ``|G|^2`` is small, so its interval is a percentile
    bootstrap over the pairs (``num_bootstrap`` resamples, two-sided ``level``); a resample whose mean
    ``|G|^2`` is not positive gives ``B_simple = inf``. ``reliable`` is False when the ``|G|^2`` estimate is
    within three standard errors of zero: then the upper end of the interval is unbounded in practice.
    ``method="auto"``: exact when ``examples x parameters <= EXACT_BUDGET`` and ``vmap`` supports the
    model, else two_batch. The model is evaluated in eval mode. Returns a dict with ``b_simple``,
    ``grad_norm_sq``, ``trace_cov``, ``method``, ``num_examples`` (and ``*_stderr``, ``b_simple_interval``,
    ``b_simple_stderr``, ``reliable``, ``batch_sizes``, ``num_pairs`` for two_batch).
    """
    if method not in ("exact", "two_batch", "auto"):
        raise ValueError(f"method must be 'exact', 'two_batch' or 'auto', got {method!r}")
    model = unwrap_model(model)
    named = trainable_parameters(model)
    device = model_device(model)
    batches = as_batches(data, device=device)
    total = num_examples(batches)
    params = [p for _, p in named]
    dim = sum(p.numel() for p in params)
    if method == "auto":
        if total * dim <= EXACT_BUDGET:
            try:
                return _exact(model, loss_fn, batches, named, total, dim, device)
            except RuntimeError:  # an operation vmap does not support: fall back to two batches
                pass
        method = "two_batch"
    if method == "exact":
        return _exact(model, loss_fn, batches, named, total, dim, device)
    b_small, b_big = (int(b) for b in batch_sizes)
    if not 1 <= b_small < b_big:
        raise ValueError(
            f"batch_sizes must be (B_small, B_big) with 1 <= B_small < B_big, got {batch_sizes}"
        )
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(num_bootstrap, bool) or int(num_bootstrap) != num_bootstrap or num_bootstrap < 2:
        raise ValueError(f"num_bootstrap must be an integer >= 2, got {num_bootstrap!r}")
    x_all, y_all = _concat(batches)
    gen = torch.Generator().manual_seed(int(seed))

    def sq_norm(idx: torch.Tensor) -> float:
        idx = idx.to(device)
        loss = check_loss(loss_fn(model(x_all[idx]), y_all[idx]))
        g = flatten(torch.autograd.grad(loss, params)).to(torch.float64)
        return _finite(float(g @ g))

    g2s, trs = [], []
    with eval_mode(model):
        for _ in range(int(num_pairs)):
            s = sq_norm(torch.randint(0, total, (b_small,), generator=gen))
            b = sq_norm(torch.randint(0, total, (b_big,), generator=gen))
            g2s.append((b_big * b - b_small * s) / (b_big - b_small))
            trs.append((s - b) / (1.0 / b_small - 1.0 / b_big))
    g2s_a, trs_a = np.asarray(g2s), np.asarray(trs)
    g2, tr = float(g2s_a.mean()), float(trs_a.mean())
    g2_se = float(g2s_a.std(ddof=1) / math.sqrt(len(g2s)))
    lo, hi, boot_sd = _bootstrap_ratio(trs_a, g2s_a, level, int(num_bootstrap), int(seed))
    return {
        "method": "two_batch",
        "b_simple": tr / g2 if g2 > 0 else math.inf,
        "b_simple_interval": [lo, hi],
        "b_simple_stderr": boot_sd,
        "level": level,
        "reliable": bool(g2 > 3 * g2_se),
        "grad_norm_sq": g2,
        "trace_cov": tr,
        "grad_norm_sq_stderr": g2_se,
        "trace_cov_stderr": float(trs_a.std(ddof=1) / math.sqrt(len(trs))),
        "num_examples": total,
        "batch_sizes": [b_small, b_big],
        "num_pairs": int(num_pairs),
    }


def _bootstrap_ratio(num: np.ndarray, den: np.ndarray, level: float, reps: int, seed: int):
    """Percentile bootstrap of ``mean(num) / mean(den)`` over paired rows (Efron & Tibshirani 1993, ch. 13)."""
    rng = np.random.default_rng(seed + 104729)
    idx = rng.integers(0, len(num), size=(reps, len(num)))
    n_m, d_m = num[idx].mean(1), den[idx].mean(1)
    ratio = np.where(d_m > 0, n_m / np.where(d_m > 0, d_m, 1.0), np.inf)
    ordered = np.sort(ratio)  # order statistics, so that infinite ratios stay infinite
    lo = ordered[int(math.floor((0.5 - level / 2) * (reps - 1)))]
    hi = ordered[int(math.ceil((0.5 + level / 2) * (reps - 1)))]
    finite = ratio[np.isfinite(ratio)]
    sd = float(finite.std(ddof=1)) if len(finite) > 1 and len(finite) == len(ratio) else math.inf
    return float(lo), float(hi), sd


def _finite(value: float) -> float:
    """``value``, or NonFiniteLossError: a NaN or infinite loss or gradient would make the noise scale
    ``inf`` or NaN, a number that looks like a measurement."""
    if not math.isfinite(value):
        raise NonFiniteLossError("gradient noise: the loss or its gradients are NaN or infinite at these "
                                 "parameters (a diverged model?)")
    return value


def _exact(model, loss_fn, batches, named, total, dim, device) -> dict:
    names = [n for n, _ in named]
    detached = {n: p.detach() for n, p in named}
    others = {k: v for k, v in model.named_buffers()}
    others.update({n: p.detach() for n, p in model.named_parameters() if n not in detached})

    def one_loss(ps: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**others, **ps}, (x.unsqueeze(0),))
        return check_loss(loss_fn(out, y.unsqueeze(0)))

    per_example = torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0, 0))
    chunk = max(1, CHUNK_FLOATS // max(dim, 1))
    g_sum = torch.zeros(dim, dtype=torch.float64, device=device)
    sq_sum = 0.0
    with eval_mode(model):
        for xb, yb in batches:
            for i in range(0, xb.shape[0], chunk):
                x, y = xb[i : i + chunk], yb[i : i + chunk]
                grads = per_example(detached, x, y)
                flat = torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], dim=1).to(torch.float64)
                g_sum += flat.sum(0)
                sq_sum += float((flat * flat).sum())
    mean = g_sum / total
    g2 = _finite(float(mean @ mean))
    _finite(sq_sum)
    trace = max(sq_sum / total - g2, 0.0)
    return {
        "method": "exact",
        "b_simple": trace / g2 if g2 > 0 else math.inf,
        "grad_norm_sq": g2,
        "trace_cov": trace,
        "num_examples": total,
    }


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    *,
    method: str = "exact",
    batch_sizes: tuple[int, int] = (16, 256),
    num_pairs: int = 32,
    seed: int = 0,
) -> float:
    """McCandlish et al.'s simple noise scale ``B_simple = tr(Sigma) / |G|^2`` (2018, eq. 2.8).

    See :func:`gradient_noise_stats` for the two methods (``"exact"`` per-example gradients, or the
    unbiased ``"two_batch"`` estimator) and for the components with their standard errors.
    """
    return gradient_noise_stats(
        model, loss_fn, data, method=method, batch_sizes=batch_sizes, num_pairs=num_pairs, seed=seed
    )["b_simple"]
