"""The gradient noise scale during training, and the critical batch size it implies.

McCandlish et al. ("An Empirical Model of Large-Batch Training", 2018) define the simple noise scale
``B_simple = tr(Sigma) / |G|^2`` (their eq. 2.8), ``G`` the true gradient and ``Sigma`` the per-example
gradient covariance, and show that it predicts the critical batch size: training at batch ``B`` takes
``S = S_min (1 + B_noise / B)`` steps (eq. 2.11), so batches much larger than ``B_crit ~ B_simple`` buy
few steps while batches much smaller waste none. During training they estimate it from gradients at two
batch sizes that a step computes anyway (their Appendix A.1): with ``|G_B|^2`` the squared norm of a
batch-``B`` gradient, ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``, so

    |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

are unbiased (METHODS.md section 5), and they smooth the numerator and the denominator *separately* with
exponential moving averages before dividing (the ratio of two noisy estimates is biased and heavy-tailed).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..analysis._data import check_loss, eval_mode, flatten, trainable_parameters, unwrap_model
from ..analysis.noise import _bootstrap_ratio
from .base import Batch, Monitor, register

__all__ = ["GradientNoiseScale", "two_batch_estimates"]


def two_batch_estimates(sq_small: float, sq_big: float, b_small: float, b_big: float) -> tuple[float, float]:
    """``(|G|^2, tr(Sigma))`` from the squared gradient norms at two batch sizes (McCandlish et al., App. A.1)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"batch sizes must satisfy 0 < b_small < b_big, got {b_small} and {b_big}")
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    tr = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr


@register("noise_scale")
class GradientNoiseScale(Monitor):
    """``B_simple = tr(Sigma) / |G|^2`` from the batch of each check, smoothed, with an interval.

    At a check the batch (``B`` examples, the one just trained on, or ``probe``) is split into ``splits``
    disjoint sub-batches of ``B_small = B // splits`` examples; the gradient of the whole batch is the
    big one, and each sub-batch's squared gradient norm enters the small one (averaged over the
    sub-batches, which lowers its variance without biasing it: each sub-batch is itself a batch of
    ``B_small`` examples). The per-check estimates of ``|G|^2`` and ``tr(Sigma)`` are smoothed by
    exponential moving averages with factor ``ema`` (bias-corrected as in Adam, so the first checks are
    not pulled towards 0), and their ratio is logged. The interval is a percentile bootstrap of the ratio
    of means over the last ``window`` checks (:func:`sgdlab.analysis.noise.gradient_noise_stats` does the
    same over repeated pairs); with a moving model it describes the recent past, not one point.

    The estimators are unbiased when the batch is drawn with replacement; a batch drawn without
    replacement from ``N`` examples shrinks ``tr(Sigma)`` by ``(N - B) / (N - 1)``, negligible for
    ``B << N``. Gradients are taken in eval mode (dropout off), so only the sampling noise is measured.

    Logs ``noise_scale`` (smoothed ``B_simple``), ``noise_scale_lo``/``_hi`` (interval at ``level``),
    ``noise_scale_raw`` (this check's ratio), ``noise_scale_grad_sq`` and ``noise_scale_trace_cov``
    (smoothed), ``noise_scale_batch`` (``B``) and ``noise_scale_step_efficiency`` ``= 1 / (1 + B_simple /
    B)``: the fraction of an infinite batch's per-step progress a step at batch ``B`` makes (eq. 2.7;
    ``B_crit ~ B_simple`` is where it is one half).
    """

    def __init__(self, every: int = 100, *, probe: Batch | None = None, splits: int = 4, ema: float = 0.9,
                 window: int = 50, level: float = 0.9, num_bootstrap: int = 1000, seed: int = 0,
                 prefix: str | None = None):
        super().__init__(every, probe=probe, prefix=prefix)
        if isinstance(splits, bool) or not isinstance(splits, int) or splits < 2:
            raise ValueError(f"splits must be an integer >= 2 (sub-batches per check), got {splits!r}")
        if not (isinstance(ema, int | float) and 0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2 (checks in the interval), got {window!r}")
        if not (isinstance(level, int | float) and 0.0 < level < 1.0):
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, int) or num_bootstrap < 2:
            raise ValueError(f"num_bootstrap must be an integer >= 2, got {num_bootstrap!r}")
        self.splits, self.ema, self.window, self.level = splits, float(ema), window, float(level)
        self.num_bootstrap, self.seed = num_bootstrap, int(seed)
        self.g2_avg = self.tr_avg = 0.0
        self.weight = 0.0  # 1 - ema^checks: the bias correction of the moving averages
        self.history: deque[tuple[float, float]] = deque(maxlen=window)

    def estimate(self, model, loss_fn, data: Batch) -> tuple[float, float, int]:
        """This check's ``(|G|^2, tr(Sigma), B)`` from one batch."""
        x, y = data
        b = int(x.shape[0])
        b_small = b // self.splits
        if b_small < 1:
            raise ValueError(f"noise_scale: a batch of {b} examples cannot be split into {self.splits} "
                             "sub-batches; lower splits or use a larger batch")
        model = unwrap_model(model)
        params = [p for _, p in trainable_parameters(model)]

        def sq_norm(xs, ys) -> tuple[float, torch.Tensor]:
            loss = check_loss(loss_fn(model(xs), ys))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            g = flatten([torch.zeros_like(p) if gi is None else gi for gi, p in zip(grads, params)])
            g = g.to(torch.float64)
            return float(g @ g), g

        with eval_mode(model):
            small, parts = [], []
            for j in range(self.splits):
                sl = slice(j * b_small, (j + 1) * b_small)
                sq, g = sq_norm(x[sl], y[sl])
                small.append(sq)
                parts.append(g)
            used = b_small * self.splits
            if used == b:  # the big gradient is the mean of the sub-batch gradients: no extra pass
                big = torch.stack(parts).mean(0)
                sq_big = float(big @ big)
            else:
                sq_big, _ = sq_norm(x, y)
        g2, tr = two_batch_estimates(float(np.mean(small)), sq_big, b_small, b)
        return g2, tr, b

    def measure(self, model, loss_fn, batch, optimizer, step) -> dict:
        g2, tr, b = self.estimate(model, loss_fn, self.data(batch))
        a = self.ema
        self.g2_avg = a * self.g2_avg + (1 - a) * g2
        self.tr_avg = a * self.tr_avg + (1 - a) * tr
        self.weight = a * self.weight + (1 - a)
        self.history.append((g2, tr))
        g2_s, tr_s = self.g2_avg / self.weight, self.tr_avg / self.weight
        value = tr_s / g2_s if g2_s > 0 else math.inf
        out = {self.key(): value, self.key("raw"): tr / g2 if g2 > 0 else math.inf,
               self.key("grad_sq"): g2_s, self.key("trace_cov"): tr_s, self.key("batch"): float(b),
               self.key("step_efficiency"): 1.0 / (1.0 + value / b) if math.isfinite(value) and value >= 0
               else float("nan")}
        lo, hi = self.interval()
        out[self.key("lo")], out[self.key("hi")] = lo, hi
        return out

    def interval(self) -> tuple[float, float]:
        """Percentile-bootstrap interval of ``mean tr / mean |G|^2`` over the last ``window`` checks."""
        if len(self.history) < 2:
            return float("nan"), float("nan")
        h = np.asarray(self.history, dtype=np.float64)
        lo, hi, _ = _bootstrap_ratio(h[:, 1], h[:, 0], self.level, self.num_bootstrap, self.seed)
        return lo, hi

    def state_dict(self) -> dict:
        return {"g2_avg": self.g2_avg, "tr_avg": self.tr_avg, "weight": self.weight,
                "history": [list(p) for p in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.g2_avg, self.tr_avg = float(state["g2_avg"]), float(state["tr_avg"])
        self.weight = float(state["weight"])
        self.history = deque((tuple(p) for p in state["history"]), maxlen=self.window)

    def __repr__(self) -> str:
        return f"GradientNoiseScale(every={self.every}, splits={self.splits}, ema={self.ema})"
