"""sgdlab: the stochastic side of training deep networks.

How mini-batches are drawn (:mod:`sgdlab.sampling`), where noise is injected
(:mod:`sgdlab.regularize`), and diagnostics of the solutions SGD finds
(:mod:`sgdlab.analysis`), tied together by a config-driven engine (:mod:`sgdlab.train`).
"""

import os as _os

# Intel MKL (PyTorch's CPU BLAS on x86) picks its kernels by the memory alignment of the operands unless
# told not to, so the same product can round differently in another process or heap layout: a sweep
# worker that ran another trial first gave different numbers than a fresh run of the same config.
# STRICT conditional numerical reproducibility removes that. It must be set before MKL's first call, so
# it is set here, on import; a value the user set wins; child processes inherit it.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# The package's version: pyproject.toml reads it from here, and CHANGELOG.md's latest entry names it.
__version__ = "0.2.0"
