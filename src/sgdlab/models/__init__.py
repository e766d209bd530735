"""Model registry (``create``/``names``) and the architectures of the papers.

One architecture family per file; each registers its builders in :mod:`.registry`.
"""

from .registry import create, default_num_classes, input_shape, names, register, shape_kwargs
from . import small  # noqa: F401  (mlp, cnn1d, cnn2d)
from . import wrn  # noqa: F401  (wrn, wrn28_10, wrn28_10_bnadd, wrn70_10_bnadd, wrn28_2)
from . import densenet  # noqa: F401  (densenet_bc, densenet_bc190_40, densenet_bc100_12, densenet121)
from . import resnet  # noqa: F401  (resnet18, resnet34)
from . import mobilenet  # noqa: F401  (mobilenetv2)
from . import lstm  # noqa: F401  (lstm_pixel)
from . import shake_resnet  # noqa: F401  (shake_resnet, shake_resnet26_2x{32,64,96,112}d)
from . import shake_resnext  # noqa: F401  (shake_resnext29_2x4x64d)
from . import shake1d  # noqa: F401  (shake_resnet1d)

__all__ = ["create", "names", "register", "input_shape", "default_num_classes", "shape_kwargs"]
