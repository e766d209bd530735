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


def gradient_noise_stats(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    *,
    method: str = "exact",
    batch_sizes: tuple[int, int] = (16, 256),
    num_pairs: int = 32,
    seed: int = 0,
) -> dict:
    """``|G|^2``, ``tr(Sigma)`` and ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, eq. 2.8).

    ``method="exact"``: per-example gradients by ``torch.func.vmap(torch.func.grad(...))`` over
    ``functional_call`` (``loss_fn`` applied to one-example batches), per data batch, accumulated in
    float64: ``G = mean_i g_i``, ``tr(Sigma) = mean_i |g_i - G|^2``.
    ``method="two_batch"``: ``num_pairs`` independent pairs of batches of sizes ``batch_sizes =
    (B_small, B_big)`` drawn with replacement (seeded); the unbiased estimates of ``|G|^2`` and
    ``tr(Sigma)`` are averaged over the pairs (their standard errors are reported) and then divided.
    The model is evaluated in eval mode. Returns a dict with ``b_simple``, ``grad_norm_sq``, ``trace_cov``,
    ``method``, ``num_examples`` (and ``*_stderr``, ``batch_sizes``, ``num_pairs`` for two_batch).
    """
    model = unwrap_model(model)
    named = trainable_parameters(model)
    device = model_device(model)
    batches = as_batches(data, device=device)
    total = num_examples(batches)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    if method == "exact":
        detached = {n: p.detach() for n, p in named}
        others = {k: v for k, v in model.named_buffers()}
        others.update({n: p.detach() for n, p in model.named_parameters() if n not in detached})

        def one_loss(ps: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(model, {**others, **ps}, (x.unsqueeze(0),))
            return check_loss(loss_fn(out, y.unsqueeze(0)))

        per_example = torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0, 0))
        g_sum = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
        sq_sum = 0.0
        with eval_mode(model):
            for x, y in batches:
                grads = per_example(detached, x, y)
                flat = torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], dim=1).to(torch.float64)
                g_sum += flat.sum(0)
                sq_sum += float((flat * flat).sum())
        mean = g_sum / total
        g2 = float(mean @ mean)
        trace = max(sq_sum / total - g2, 0.0)
        return {
            "method": "exact",
            "b_simple": trace / g2 if g2 > 0 else math.inf,
            "grad_norm_sq": g2,
            "trace_cov": trace,
            "num_examples": total,
        }
    if method == "two_batch":
        b_small, b_big = (int(b) for b in batch_sizes)
        if not 1 <= b_small < b_big:
            raise ValueError(
                f"batch_sizes must be (B_small, B_big) with 1 <= B_small < B_big, got {batch_sizes}"
            )
        if num_pairs < 2:
            raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
        x_all, y_all = _concat(batches)
        gen = torch.Generator().manual_seed(int(seed))

        def sq_norm(idx: torch.Tensor) -> float:
            idx = idx.to(device)
            loss = check_loss(loss_fn(model(x_all[idx]), y_all[idx]))
            g = flatten(torch.autograd.grad(loss, params)).to(torch.float64)
            return float(g @ g)

        g2s, trs = [], []
        with eval_mode(model):
            for _ in range(int(num_pairs)):
                s = sq_norm(torch.randint(0, total, (b_small,), generator=gen))
                b = sq_norm(torch.randint(0, total, (b_big,), generator=gen))
                g2s.append((b_big * b - b_small * s) / (b_big - b_small))
                trs.append((s - b) / (1.0 / b_small - 1.0 / b_big))
        g2s_a, trs_a = np.asarray(g2s), np.asarray(trs)
        g2, tr = float(g2s_a.mean()), float(trs_a.mean())
        return {
            "method": "two_batch",
            "b_simple": tr / g2 if g2 > 0 else math.inf,
            "grad_norm_sq": g2,
            "trace_cov": tr,
            "grad_norm_sq_stderr": float(g2s_a.std(ddof=1) / math.sqrt(len(g2s))),
            "trace_cov_stderr": float(trs_a.std(ddof=1) / math.sqrt(len(trs))),
            "num_examples": total,
            "batch_sizes": [b_small, b_big],
            "num_pairs": int(num_pairs),
        }
    raise ValueError(f"method must be 'exact' or 'two_batch', got {method!r}")


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
