"""The top Hessian eigenvalue during training, beside the stability threshold ``2 / lr``.

Full-batch gradient descent with step ``lr`` on a quadratic diverges along any direction whose curvature
exceeds ``2 / lr``; Cohen et al. ("Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability", ICLR 2021) observe that the top eigenvalue of the training-loss Hessian rises during
training (progressive sharpening) until it reaches about ``2 / lr`` and then hovers there (the edge of
stability). For heavy-ball momentum ``beta`` (PyTorch's SGD) the threshold is ``(2 + 2 beta) / lr``, for
Nesterov momentum ``(2 + 2 beta) / ((1 + 2 beta) lr)`` (their Appendix, the stability of momentum on a
quadratic).

The eigenvalue is tracked by Lanczos (or power iteration) on :class:`sgdlab.analysis.HessianOperator`,
started from the previous check's eigenvector: the top eigenvector moves little between checks, so a
few Hessian-vector products per check suffice where a cold start needs tens (``warm_iter`` caps them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..analysis.estimators import top_eigenvalues
from ..analysis.operators import curvature_operator
from .base import Batch, LossFn, Monitor, optimizer_hparams, register

__all__ = ["Sharpness", "stability_threshold"]


def stability_threshold(lr: float, momentum: float = 0.0, nesterov: bool = False) -> float:
    """The largest curvature at which (momentum) gradient descent with step ``lr`` is stable on a quadratic.

    ``2 / lr`` without momentum, ``(2 + 2 beta) / lr`` with heavy-ball momentum ``beta`` and
    ``(2 + 2 beta) / ((1 + 2 beta) lr)`` with Nesterov momentum (Cohen et al., ICLR 2021, section 2 and
    Appendix; the edge of stability in METHODS.md section 6).
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if nesterov:
        return (2.0 + 2.0 * momentum) / ((1.0 + 2.0 * momentum) * lr)
    return (2.0 + 2.0 * momentum) / lr


@register("sharpness")
class Sharpness(Monitor):
    """Top eigenvalue of the loss Hessian every ``every`` steps, warm-started from the last eigenvector.

    Logs ``sharpness`` (the eigenvalue), ``sharpness_2_over_lr`` (``2 / lr``), ``sharpness_threshold``
    (:func:`stability_threshold` with the optimizer's momentum; equal to ``2 / lr`` without momentum),
    ``sharpness_ratio`` (eigenvalue / threshold: 1 at the edge of stability), ``sharpness_residual`` (the
    Lanczos residual estimate, or ``||Hv - lambda v||`` for power iteration) and ``sharpness_matvecs``
    (Hessian-vector products spent by the check).

    Args:
        every: steps between checks.
        probe: a fixed ``(x, y)`` batch on which the Hessian is taken (recommended; full-batch training
            passes its whole data set); None uses the batch just trained on.
        method: ``"lanczos"`` (largest algebraic eigenvalue, default) or ``"power"`` (largest magnitude).
        max_iter: products of a cold check at most (the first check, or one whose previous eigenvector
            does not fit the model): Lanczos steps or power iterations.
        warm_iter: products of a warm-started check at most (None, the default: ``max_iter``, so a check
            stops at ``tol``). A cap makes checks cheaper and less accurate: along cnn1d runs
            (docs/monitors.md, "Cost") the uncapped warm start took 5.4 products a check and matched a
            converged solve at every check, while ``warm_iter=3`` erred by 0.5% at the median but by more
            than 5% at one check in six, where a warm start following its eigenvector misses a new,
            sharper direction; ``sharpness_residual`` shows how far a reading is from an eigenpair.
        warm: False starts every check cold from a seeded random vector (reference readings, at the cost
            of ``max_iter`` products a check).
        tol: relative tolerance of :func:`sgdlab.analysis.estimators.top_eigenvalues` on the Lanczos
            residual; the eigenvalue's error is about the squared residual over the spectral gap, so
            ``1e-2`` gives errors of 0.002-0.03% on the models of docs/benchmarks.md ("Hessian eigenvalues").
        lr, momentum, nesterov: the optimizer's hyper-parameters if no optimizer is passed at the check.
        curvature: ``"hessian"`` or ``"ggn"`` (Gauss-Newton, positive semi-definite).
        seed: seed of the first (cold) start vector.
        background: run each check in a worker thread on a copy of the weights taken at its step, while
            training goes on (:class:`~sgdlab.monitors.MonitorSet`: the reading is collected when the monitor
            next comes due, or at a checkpoint and at the end, and logged with the step it measured; it adds
            ``sharpness_seconds``, the check's own wall time). The readings are the same numbers as in the
            foreground; on a machine with a spare core the check's wall-clock cost is hidden (docs/monitors.md,
            "Cost"), its CPU cost is not. CPU models outside ``torch.distributed`` without attention only.
    """

    supports_background = True

    def __init__(self, every: int = 100, *, probe: Batch | None = None, method: str = "lanczos",
                 max_iter: int = 20, warm_iter: int | None = None, warm: bool = True, tol: float = 1e-2,
                 lr: float | None = None, momentum: float = 0.0, nesterov: bool = False,
                 curvature: str = "hessian", seed: int = 0, prefix: str | None = None,
                 background: bool = False):
        super().__init__(every, probe=probe, prefix=prefix, background=background)
        if method not in ("lanczos", "power"):
            raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 2:
            raise ValueError(f"max_iter must be an integer >= 2, got {max_iter!r}")
        if warm_iter is not None and (isinstance(warm_iter, bool) or not isinstance(warm_iter, int) or warm_iter < 2):
            raise ValueError(f"warm_iter must be an integer >= 2 or None (use max_iter), got {warm_iter!r}")
        if not (isinstance(tol, int | float) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        if lr is not None:
            stability_threshold(lr, momentum, nesterov)  # validates
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
        self.method, self.max_iter, self.tol = method, max_iter, float(tol)
        self.warm_iter = max_iter if warm_iter is None else warm_iter
        if not isinstance(warm, bool):
            raise ValueError(f"warm must be true or false, got {warm!r}")
        self.warm = warm
        self.lr, self.momentum, self.nesterov = lr, float(momentum), bool(nesterov)
        self.curvature, self.seed = curvature, int(seed)
        self.vector: torch.Tensor | None = None
        self.checks = 0

    def eigen(self, model, loss_fn: LossFn, data: Batch):
        """One warm-started eigen solve on ``data``; returns the :class:`~sgdlab.analysis.EigenResult`."""
        op = curvature_operator(model, loss_fn, data, curvature=self.curvature)
        v0 = self.vector if self.warm and self.vector is not None and self.vector.numel() == op.dim else None
        res = top_eigenvalues(op, k=1, method=self.method, tol=self.tol,
                              max_iter=self.max_iter if v0 is None else self.warm_iter,
                              seed=self.seed + self.checks, return_vectors=True, v0=v0)
        self.checks += 1
        if res.vectors is not None:
            self.vector = res.vectors[0].detach().clone()
        return res

    def measure(self, model, loss_fn, batch, optimizer, step) -> dict:
        res = self.eigen(model, loss_fn, self.data(batch))
        lam = float(res.values[0])
        out = {self.key(): lam, self.key("residual"): float(res.residuals[0]),
               self.key("matvecs"): float(res.num_matvecs)}
        lr, momentum, nesterov = optimizer_hparams(optimizer)
        if lr is None:
            lr, momentum, nesterov = self.lr, self.momentum, self.nesterov
        if lr is not None and lr > 0:
            thr = stability_threshold(lr, momentum, nesterov)
            out.update({self.key("2_over_lr"): 2.0 / lr, self.key("threshold"): thr,
                        self.key("ratio"): lam / thr})
        return out

    def state_dict(self) -> dict:
        return {"vector": self.vector, "checks": self.checks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vector = state.get("vector")
        self.checks = int(state.get("checks", 0))

    def __repr__(self) -> str:
        return (f"Sharpness(every={self.every}, method={self.method!r}, max_iter={self.max_iter}, "
                f"warm_iter={self.warm_iter}, background={self.background})")
