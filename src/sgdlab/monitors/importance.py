"""Importance sampling during training: tau, the measured variance reduction, the effective batch size.

Katharopoulos & Fleuret ("Not All Samples Are Created Equal", ICML 2018) presample ``B`` examples
uniformly, score them by the upper bound of eq. 19 (the norm of the loss gradient with respect to the
logits), and resample ``b`` of them with probabilities ``g ∝ score`` and weights ``1 / (B g_i)``. Their
tau (eq. 21; METHODS.md section 4) predicts the gain: ``tau_var = B sum g^2 = (1 - ||g - u||^2 /
||g||^2)^-1`` is the factor by which the batch would have to grow to reduce the variance as much
(the authors' code logs its square root). This monitor measures the gain as well: with the exact
per-example gradients of the presample (``torch.func``), the expected squared distance between the
weighted mini-batch gradient and the presample's gradient is known in closed form for any ``g``
(:func:`sgdlab.analysis.variance_reduction`), so the *measured* variance ratio of uniform to importance
sampling, and the uniform batch size with the same variance, need no Monte Carlo.
"""

from __future__ import annotations

import math

from ..analysis.variance_reduction import variance_reduction
from ..sampling.importance import _check_loss
from .base import Batch, Monitor, register

__all__ = ["ImportanceMonitor"]


@register("importance")
class ImportanceMonitor(Monitor):
    """tau, the predicted and measured variance reduction and the effective batch size, every ``every`` steps.

    At a check, ``presample`` examples are drawn uniformly with replacement from ``probe`` (the training
    set, or a large fixed subset of it; without a probe, from the batch just trained on), scored by the
    upper bound of eq. 19, and for ``batch`` resampled slots the exact expected squared gradient errors
    ``E_uniform`` and ``E_importance`` are computed (:func:`sgdlab.analysis.variance_reduction`).

    Logs ``importance_tau`` (the authors' ``sqrt(B sum g^2)``), ``importance_tau_variance``
    (``B sum g^2``), ``importance_predicted_reduction`` (``||g-u||^2 / ||g||^2 = 1 - 1 / tau_variance``),
    ``importance_measured_reduction`` (``1 - E_importance / E_uniform``), ``importance_variance_ratio``
    (``E_uniform / E_importance``) and ``importance_effective_batch`` (``batch * E_uniform /
    E_importance``: the uniform batch size whose gradient has the importance-sampled batch's variance).

    Args:
        every: steps between checks.
        probe: the pool ``(x, y)`` presamples are drawn from.
        presample: ``B``; batch: ``b`` (the sampler's sizes).
        loss: the per-example loss the scores differentiate: ``"cross_entropy"``, ``"mse"``
            (``0.5 ||z - y||^2``), ``"bce"`` or a callable returning per-example losses.
        chunk_size: examples per ``vmap`` chunk of per-example gradients.
    """

    def __init__(self, every: int = 100, *, probe: Batch | None = None, presample: int = 640, batch: int = 128,
                 loss="cross_entropy", chunk_size: int = 256, seed: int = 0, prefix: str | None = None):
        super().__init__(every, probe=probe, prefix=prefix)
        for name, v in (("presample", presample), ("batch", batch), ("chunk_size", chunk_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        _check_loss(loss)
        self.presample, self.batch, self.loss = presample, batch, loss
        self.chunk_size, self.seed = chunk_size, int(seed)

    def measure(self, model, loss_fn, batch, optimizer, step) -> dict:
        r = variance_reduction(model, self.data(batch), presample=self.presample, batch=self.batch,
                               schemes=("uniform", "upper_bound"), repeats=1, loss=self.loss,
                               chunk_size=self.chunk_size, seed=self.seed + step)
        t = r["schemes"]["upper_bound"]["tau"]
        e_u = r["schemes"]["uniform"]["expected_sq_distance"]
        e_is = r["schemes"]["upper_bound"]["expected_sq_distance"]
        ratio = e_u / e_is if e_is > 0 else (math.inf if e_u > 0 else 1.0)
        tv = t * t
        return {self.key("tau"): t, self.key("tau_variance"): tv,
                self.key("predicted_reduction"): 1.0 - 1.0 / tv,
                self.key("measured_reduction"): 1.0 - e_is / e_u if e_u > 0 else 0.0,
                self.key("variance_ratio"): ratio, self.key("effective_batch"): self.batch * ratio}

    def __repr__(self) -> str:
        return f"ImportanceMonitor(every={self.every}, presample={self.presample}, batch={self.batch})"
