"""Diagnostics during training: every ``k`` steps, named scalars (uses :mod:`sgdlab.analysis`).

- :class:`Sharpness`: the top Hessian eigenvalue (warm-started Lanczos) beside ``2 / lr`` and the
  momentum-corrected threshold (edge of stability, Cohen et al. 2021).
- :class:`GradientNoiseScale`: McCandlish et al.'s ``B_simple`` from the per-step small/large batch
  estimator, smoothed, with a bootstrap interval, and the step efficiency at the current batch it implies.
- :class:`ImportanceMonitor`: tau, the measured variance reduction and the effective batch size of
  importance sampling (Katharopoulos & Fleuret 2018).
- :class:`Norms`: per-block gradient and weight norms and the update-to-weight ratio.

All share one protocol (:class:`Monitor`); :class:`MonitorSet` drives several from a plain loop, and
:class:`~sgdlab.monitors.mlflow.MlflowLogger` writes scalars to a local MLflow file store. See
docs/monitors.md.
"""

from .base import Monitor, MonitorSet, create, names, optimizer_hparams, register
from .importance import ImportanceMonitor
from .noise import GradientNoiseScale, two_batch_estimates
from .norms import Norms
from .sharpness import Sharpness, stability_threshold

__all__ = ["Monitor", "MonitorSet", "create", "names", "register", "optimizer_hparams", "Sharpness",
           "stability_threshold", "GradientNoiseScale", "two_batch_estimates", "ImportanceMonitor", "Norms"]
