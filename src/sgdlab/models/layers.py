"""Shared pieces of the CIFAR architectures: He initialization and parameter counting.

He et al., "Delving deep into rectifiers" (ICCV 2015), Sec. 2.2: a ReLU layer keeps the
variance of its signal when its weights are drawn from N(0, 2/n). The reference code of
the architectures in this package (Wide ResNet's and DenseNet's Torch code, torchvision's
ResNet and MobileNetV2) all take n = k*k*out_channels (the "fan_out" mode of eq. 14, which
preserves the variance of the back-propagated gradient), set batch-norm scales to 1 and
shifts to 0, and zero the classifier's bias.
"""

from __future__ import annotations

from torch import nn

__all__ = ["conv1x1", "conv3x3", "he_init", "num_parameters"]


def he_init(module: nn.Module) -> nn.Module:
    """Initialize ``module`` in place as the original CIFAR code does and return it.

    Convolutions: ``N(0, 2 / (k_h * k_w * out_channels))`` (He et al. 2015, eq. 14, fan-out);
    batch norm: weight 1, bias 0; linear layers: PyTorch's default weight, bias 0.
    Works on the ``meta`` device (nothing is sampled there).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return module


def num_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``; works for models built on ``meta``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (batch norm follows or precedes it)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (projection shortcuts, bottlenecks, transitions)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, padding=0, bias=False)


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_dropout(value) -> float:
    """Return ``value`` as a float if it is a probability in [0, 1), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {value!r}")
    return float(value)
