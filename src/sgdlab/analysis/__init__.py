"""Diagnostics of trained models: sharpness, interpolation, Hessian spectrum, noise scales.

Every function takes ``data`` as an ``(x, y)`` pair of tensors or an iterable of such batches and a
``loss_fn(logits, y)`` returning the mean loss of a batch; results are averages over examples (batches
weighted by size), computed with the model in eval mode (its mode is restored). The curvature tools and
``model_sharpness`` also take Hugging Face dict batches and ``ModelOutput``s (see :mod:`.losses`).
"""

from ._data import differentiable_attention
from .blocks import BlockTable, block_partition, curvature_blocks
from .equilibrium import (
    hessian_logdet,
    log_minimum_weight,
    log_probability_ratio,
    relative_minimum_probability,
)
from .estimators import estimate_trace, slq, top_eigenvalues
from .hessian import (
    EigenResult,
    GGNOperator,
    HessianOperator,
    SpectralDensity,
    TraceEstimate,
    hessian_eigen,
    hessian_eigenvalues,
    hessian_trace,
    hessian_trace_estimate,
    hvp,
    lanczos,
    spectral_density,
)
from .interpolation import evaluate, interpolate, interpolation_coefficients
from .losses import causal_lm_loss, hf_loss
from .noise import gradient_noise_scale, gradient_noise_stats, sgd_noise_scale
from .operators import CurvatureOperator, curvature_operator
from .plots import plot_interpolation, plot_sharpness_vs_batch, plot_spectral_density
from .sharpness import keskar_sharpness, model_sharpness, random_subspace

__all__: list[str] = [
    "keskar_sharpness",
    "model_sharpness",
    "random_subspace",
    "hvp",
    "HessianOperator",
    "GGNOperator",
    "CurvatureOperator",
    "curvature_operator",
    "top_eigenvalues",
    "estimate_trace",
    "slq",
    "curvature_blocks",
    "block_partition",
    "BlockTable",
    "EigenResult",
    "TraceEstimate",
    "SpectralDensity",
    "hessian_eigen",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_trace_estimate",
    "spectral_density",
    "lanczos",
    "interpolate",
    "interpolation_coefficients",
    "evaluate",
    "sgd_noise_scale",
    "gradient_noise_scale",
    "gradient_noise_stats",
    "relative_minimum_probability",
    "log_probability_ratio",
    "log_minimum_weight",
    "hessian_logdet",
    "causal_lm_loss",
    "differentiable_attention",
    "hf_loss",
    "plot_interpolation",
    "plot_spectral_density",
    "plot_sharpness_vs_batch",
]

from .variance_reduction import variance_reduction  # noqa: E402  (importance sampling, section 4.1)

__all__.append("variance_reduction")
