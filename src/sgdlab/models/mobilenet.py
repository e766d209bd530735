"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

The random-gradient paper (Wei, Fig. 5) trains MobileNetV2 on CIFAR-10. The network follows the
paper's Table 2 (width multiplier 1): a 3x3 stem with 32 channels, seventeen inverted-residual
units (expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> linear 1x1 projection, each convolution
followed by BN; the shortcut is added only when the stride is 1 and the channel counts agree, Fig. 4),
a 1x1 convolution to 1280 channels, global average pooling and a linear classifier. For 32x32 inputs
the stem and the first strided stage (24 channels) use stride 1 instead of 2, as the common CIFAR
version does, so the last feature map is 4x4. About 2.24M parameters with 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import check_dropout, check_positive_int, he_init
from .registry import register

__all__ = ["CIFAR_SETTINGS", "InvertedResidual", "MobileNetV2"]

# (expansion t, output channels c, repeats n, stride s) of the paper's Table 2, with the CIFAR strides.
CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
             relu6: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu6:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Inverted residual unit with a linear bottleneck (Sandler et al. 2018, Table 1 and Fig. 4)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(in_channels, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))
        layers.append(_conv_bn(hidden, out_channels, 1, relu6=False))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2.

    Args:
        num_classes: outputs of the linear classifier.
        settings: (t, c, n, s) rows; defaults to :data:`CIFAR_SETTINGS`.
        stem_channels, last_channels: 32 and 1280 in the paper.
        dropout: drop probability before the classifier (0 here; the ImageNet model uses 0.2).
        in_channels: input channels.
    """

    def __init__(self, num_classes: int = 10, settings=CIFAR_SETTINGS, stem_channels: int = 32,
                 last_channels: int = 1280, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("stem_channels", stem_channels)
        check_positive_int("last_channels", last_channels)
        check_positive_int("in_channels", in_channels)
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = [_conv_bn(in_channels, stem_channels, 3, 1)]
        c = stem_channels
        for row in settings:
            if len(row) != 4:
                raise ValueError(f"settings rows must be (t, c, n, s), got {row!r}")
            t, out, n, s = (check_positive_int("settings entry", int(v)) for v in row)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers.append(_conv_bn(c, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(last_channels, num_classes)
        self.num_features = last_channels
        he_init(self)
        # torchvision's initialization of the classifier: N(0, 0.01), zero bias.
        nn.init.normal_(self.fc.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean((2, 3))
        return self.fc(self.dropout(h))


@register("mobilenetv2", input_shape=(3, 32, 32), num_classes=10)
def mobilenetv2(num_classes: int = 10, dropout: float = 0.0) -> MobileNetV2:
    """CIFAR MobileNetV2 (Sandler et al. 2018; random-gradient paper, Fig. 5), about 2.24M parameters."""
    return MobileNetV2(num_classes, dropout=dropout)
