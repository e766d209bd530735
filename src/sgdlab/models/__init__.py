"""Model registry (``create``/``names``) and the architectures of the papers.

One architecture family per file; each registers its builders in :mod:`.registry`.
"""

from .registry import create, default_num_classes, input_shape, names, register
from . import small  # noqa: F401  (mlp, cnn1d, cnn2d)

__all__ = ["create", "names", "register", "input_shape", "default_num_classes"]
