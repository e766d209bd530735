"""Shake-ResNet for MNIST-1D (a 1-D port of Gastaldi's Shake-ResNet, "Shake-Shake regularization", 2017).

Same structure as :class:`sgdlab.models.shake_resnet.ShakeResNet` with 1-D convolutions: stem
Conv1d(1->16) + BN, 3 stages of ``(depth - 2) / 6`` two-branch blocks (widths K, 2K, 4K, strides
1, 2, 2), shift-and-concat shortcut, ReLU, global average pool, Linear. The default (depth 14,
K = 16, about 0.1M parameters) trains on MNIST-1D (inputs of length 40) on a CPU in a minute or two.
"""

from __future__ import annotations

from typing import Mapping

from .registry import register
from .shake_resnet import ShakeResNet

__all__ = ["shake_resnet1d"]


@register("shake_resnet1d", input_shape=(40,))
def shake_resnet1d(num_classes: int = 10, depth: int = 14, width: int = 16, *, shake: Mapping | None = None,
                   skip: bool = True, single_conv: bool = False, batchnorm: bool = True) -> ShakeResNet:
    """1-D Shake-ResNet-``depth`` 2x``width``d for MNIST-1D; inputs ``(N, 40)`` or ``(N, 1, 40)``."""
    return ShakeResNet(depth, width, num_classes, in_channels=1, dims=1, shake=shake, skip=skip,
                       single_conv=single_conv, batchnorm=batchnorm)
