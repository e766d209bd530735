"""Densely connected networks for CIFAR (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

One :class:`DenseNet` class covers both uses in sgdlab:

* DenseNet-BC (paper Sec. 3, "Implementation Details"; the SRS paper's "DN-SRS" uses depth 190,
  growth 40): a 3x3 stem convolution with 2*growth channels, three dense blocks of
  n = (depth - 4) / 6 bottleneck layers, each BN-ReLU-conv1x1(4*growth)-BN-ReLU-conv3x3(growth) whose
  output is concatenated to its input, and transitions BN-ReLU-conv1x1(floor(compression*c))-avgpool2
  between blocks (compression 0.5). The network ends with BN-ReLU, global average pooling and a
  linear classifier. DenseNet-BC-190-40 has 25.6M parameters and DenseNet-BC-100-12 0.8M (paper Table 2).
* The common CIFAR version of DenseNet-121 (random-gradient paper, Fig. 5): growth 32, four blocks of
  (6, 12, 24, 16) bottleneck layers, the ImageNet 7x7 stem and max-pool replaced by one 3x3 convolution
  with 2*growth channels; about 7.0M parameters.

Convolutions have no bias, as in the authors' code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import check_dropout, check_positive_int, conv1x1, conv3x3, he_init
from .registry import register

__all__ = ["Bottleneck", "DenseNet", "Transition", "densenet_bc_blocks"]


def densenet_bc_blocks(depth: int) -> int:
    """Bottleneck layers per block of a 3-block DenseNet-BC: (depth - 4) / 6; depth must be 6n + 4."""
    check_positive_int("depth", depth)
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"depth must be 6n + 4 with n >= 1 for DenseNet-BC (e.g. 100, 190), got {depth}")
    return (depth - 4) // 6


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(bottleneck)-BN-ReLU-conv3x3(growth); returns [x, new features] concatenated."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, bottleneck)
        self.bn2 = nn.BatchNorm2d(bottleneck)
        self.conv2 = conv3x3(bottleneck, growth)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(F.relu(self.bn2(h)))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return torch.cat([x, h], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1(out)-avgpool2 between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = conv1x1(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """DenseNet with bottleneck layers and compression for 32x32 inputs.

    Args:
        blocks: bottleneck layers per dense block, e.g. ``(31, 31, 31)`` for DenseNet-BC-190.
        growth: growth rate k (channels each layer adds).
        num_classes: outputs of the linear classifier.
        compression: theta, the fraction of channels a transition keeps (0.5 for "-C").
        bottleneck_factor: the 1x1 bottleneck has ``bottleneck_factor * growth`` channels (4).
        dropout: drop probability after each convolution of a layer (0 with data augmentation).
        in_channels: input channels.
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = (16, 16, 16),
        growth: int = 12,
        num_classes: int = 10,
        compression: float = 0.5,
        bottleneck_factor: int = 4,
        dropout: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("blocks must list at least one dense block")
        for b in blocks:
            check_positive_int("blocks[i]", b)
        check_positive_int("growth", growth)
        check_positive_int("num_classes", num_classes)
        check_positive_int("bottleneck_factor", bottleneck_factor)
        check_positive_int("in_channels", in_channels)
        if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        dropout = check_dropout(dropout)
        self.blocks, self.growth, self.compression = blocks, growth, float(compression)
        c = 2 * growth
        self.conv1 = conv3x3(in_channels, c)
        layers: list[nn.Module] = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(Bottleneck(c, growth, bottleneck_factor * growth, dropout))
                c += growth
            if i < len(blocks) - 1:
                out = math.floor(self.compression * c)
                layers.append(Transition(c, out))
                c = out
        self.features = nn.Sequential(*layers)
        self.final_bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        self.num_features = c
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.conv1(x))
        h = F.relu(self.final_bn(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def densenet_bc_model(depth: int, growth: int, num_classes: int, compression: float = 0.5,
                      dropout: float = 0.0, in_channels: int = 3) -> DenseNet:
    """DenseNet-BC-``depth``-``growth``: three blocks of (depth - 4) / 6 bottleneck layers."""
    n = densenet_bc_blocks(depth)
    return DenseNet((n, n, n), growth, num_classes, compression, 4, dropout, in_channels)


@register("densenet_bc", input_shape=(3, 32, 32), num_classes=10)
def densenet_bc(num_classes: int = 10, depth: int = 100, growth: int = 12, compression: float = 0.5,
                dropout: float = 0.0, in_channels: int = 3) -> DenseNet:
    """Generic DenseNet-BC-``depth``-``growth`` (Huang et al. 2017, Sec. 3); defaults give DenseNet-BC-100-12."""
    return densenet_bc_model(depth, growth, num_classes, compression, dropout, in_channels)


@register("densenet_bc190_40", input_shape=(3, 32, 32), num_classes=100)
def densenet_bc190_40(num_classes: int = 100, dropout: float = 0.0) -> DenseNet:
    """DenseNet-BC-190-40 (25.6M parameters), the SRS paper's "DN-SRS" network (its Table 2)."""
    return densenet_bc_model(190, 40, num_classes, 0.5, dropout)


@register("densenet_bc100_12", input_shape=(3, 32, 32), num_classes=10)
def densenet_bc100_12(num_classes: int = 10, dropout: float = 0.0) -> DenseNet:
    """DenseNet-BC-100-12 (0.8M parameters, Huang et al. 2017 Table 2): the small DenseNet-BC."""
    return densenet_bc_model(100, 12, num_classes, 0.5, dropout)


@register("densenet121", input_shape=(3, 32, 32), num_classes=10)
def densenet121(num_classes: int = 10, dropout: float = 0.0) -> DenseNet:
    """CIFAR DenseNet-121: growth 32, blocks (6, 12, 24, 16), 3x3 stem (random-gradient paper, Fig. 5)."""
    return DenseNet((6, 12, 24, 16), 32, num_classes, 0.5, 4, dropout)
