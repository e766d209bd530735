"""ResNet-18/34 for CIFAR (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

The random-gradient paper (Wei, Fig. 5) trains ResNet-34 on CIFAR-10. This is the common CIFAR
adaptation of the ImageNet networks of He et al. (their Table 1): the 7x7 stride-2 stem and the
max-pool are replaced by one 3x3 stride-1 convolution with 64 channels followed by BN-ReLU, then four
stages of basic units (conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU) with 64, 128, 256 and 512
channels (strides 1, 2, 2, 2); projection shortcuts are conv1x1-BN ("option B"). Global average
pooling and a linear classifier end the network. ResNet-18 has about 11.2M parameters, ResNet-34
about 21.3M (10 classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import check_positive_int, conv1x1, conv3x3, he_init
from .registry import register

__all__ = ["BasicUnit", "ResNet"]


class BasicUnit(nn.Module):
    """Post-activation basic unit: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with basic units; ``layers`` gives units per stage, e.g. (2, 2, 2, 2) for ResNet-18.

    Args:
        layers: units per stage (four stages of 64, 128, 256, 512 channels times ``width / 64``).
        num_classes: outputs of the linear classifier.
        width: channels of the first stage (64 in the papers; smaller values for quick tests).
        in_channels: input channels.
    """

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        layers = tuple(layers)
        if len(layers) == 0:
            raise ValueError("layers must list at least one stage")
        for n in layers:
            check_positive_int("layers[i]", n)
        check_positive_int("num_classes", num_classes)
        check_positive_int("width", width)
        check_positive_int("in_channels", in_channels)
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        units: list[nn.Module] = []
        c = width
        for i, n in enumerate(layers):
            out = width * 2**i
            for j in range(n):
                units.append(BasicUnit(c, out, 2 if (i > 0 and j == 0) else 1))
                c = out
        self.units = nn.Sequential(*units)
        self.fc = nn.Linear(c, num_classes)
        self.num_features = c
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.units(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@register("resnet18", input_shape=(3, 32, 32), num_classes=10)
def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """CIFAR ResNet-18 (He et al. 2016, Table 1 with a 3x3 stem and no max-pool), about 11.2M parameters."""
    return ResNet((2, 2, 2, 2), num_classes, width)


@register("resnet34", input_shape=(3, 32, 32), num_classes=10)
def resnet34(num_classes: int = 10, width: int = 64) -> ResNet:
    """CIFAR ResNet-34 (random-gradient paper, Fig. 5), about 21.3M parameters."""
    return ResNet((3, 4, 6, 3), num_classes, width)
