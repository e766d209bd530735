"""Wide residual networks for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k has a 3x3 stem convolution with 16 channels, then three groups of n = (d - 4) / 6
residual units with 16k, 32k and 64k channels (strides 1, 2, 2), global average pooling and a
linear classifier. Two residual units are provided:

``unit="preact"`` -- the WRN authors' unit (their Sec. 2, "B(3,3)", as in their code):
    BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 on the branch; when the shape changes the shortcut is a
    1x1 convolution applied to the *pre-activated* input; the network ends with BN-ReLU before
    pooling (no batch norm after the stem).
``unit="bnadd"`` -- the "BN after addition" unit of He et al., "Identity Mappings in Deep Residual
    Networks" (ECCV 2016), Fig. 4(b), which the sequenced-replacement-sampling paper (SRS, Sec. 4,
    "WRN") uses: branch conv3x3-BN-ReLU-[dropout]-conv3x3-BN, add the shortcut (identity, or a 1x1
    convolution of the input when the shape changes), then BN, then ReLU. The stem is
    conv3x3-BN-ReLU and the network ends with pooling (every unit already ends with BN-ReLU).

Both share every convolution and the classifier; the bnadd network has one more batch norm per
unit (after the addition) plus one after the stem, and lacks the pre-activation network's final
batch norm, which amounts to exactly ``2 * sum(out_channels of the units)`` more parameters.
Parameter counts (CIFAR-100): WRN-28-10 36.5M as in the SRS paper's Table 2; WRN-70-10 104.3M, 2% below
the 106.4M printed there. No WRN-70-10 with 1x1 projections reaches that figure, but the same network
with 3x3 projection shortcuts (``projection=3``) has 106.40M, exactly the printed count: preset
``wrn70_10_bnadd_proj3``. The paper does not describe its shortcuts; its 28-10 figure is the 1x1 one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import check_dropout, check_positive_int, conv1x1, conv3x3, he_init
from .registry import register

__all__ = ["BNAddUnit", "PreActUnit", "WideResNet", "wrn_blocks_per_group"]

UNITS = ("preact", "bnadd")


def _shortcut(in_channels: int, out_channels: int, stride: int, kernel: int) -> nn.Conv2d | None:
    """The projection shortcut (a ``kernel`` x ``kernel`` convolution) where the shape changes, else None."""
    if in_channels == out_channels and stride == 1:
        return None
    conv = conv1x1 if kernel == 1 else conv3x3
    return conv(in_channels, out_channels, stride)


def wrn_blocks_per_group(depth: int) -> int:
    """Units per group n = (depth - 4) / 6 (WRN paper, Sec. 2); ``depth`` must be 6n + 4, n >= 1."""
    check_positive_int("depth", depth)
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ..., 70), got {depth}")
    return (depth - 4) // 6


class PreActUnit(nn.Module):
    """The WRN authors' pre-activation unit: x + conv(drop(relu(bn(conv(relu(bn(x)))))))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float = 0.0,
                 projection: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        # As in the authors' code: the projection sees the pre-activated input, the identity the raw one.
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class BNAddUnit(nn.Module):
    """"BN after addition" unit (He et al. 2016b, Fig. 4(b)): relu(bn(x + bn(conv(drop(relu(bn(conv(x))))))))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float = 0.0,
                 projection: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.bn_add = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(self.dropout(y)))
        s = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(self.bn_add(y + s))


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` for 32x32 inputs (any size works: the pooling is global).

    Args:
        depth: 6n + 4 (28 for WRN-28-10, 70 for WRN-70-10).
        width: widening factor k (group widths 16k, 32k, 64k).
        num_classes: outputs of the linear classifier.
        dropout: drop probability between the two convolutions of each unit (WRN paper: 0.3).
        unit: ``"preact"`` (WRN authors) or ``"bnadd"`` (BN after addition, SRS paper).
        in_channels: input channels (3 for CIFAR).
        projection: kernel size of the projection shortcuts where the shape changes: 1 (the WRN
            authors' code) or 3 (the variant whose WRN-70-10 count matches the SRS paper's 106.4M).
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        unit: str = "preact",
        in_channels: int = 3,
        projection: int = 1,
    ):
        super().__init__()
        n = wrn_blocks_per_group(depth)
        check_positive_int("width", width)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        dropout = check_dropout(dropout)
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if projection not in (1, 3):
            raise ValueError(f"projection must be 1 or 3 (kernel size of the projection shortcuts), "
                             f"got {projection!r}")
        self.depth, self.width, self.unit, self.projection = depth, width, unit, projection
        block = PreActUnit if unit == "preact" else BNAddUnit
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = conv3x3(in_channels, widths[0])
        # The post-activation (bnadd) net normalizes its stem; the pre-activation units do it themselves.
        self.stem_bn = nn.BatchNorm2d(widths[0]) if unit == "bnadd" else None
        units: list[nn.Module] = []
        c = widths[0]
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                units.append(block(c, widths[g + 1], stride if i == 0 else 1, dropout, projection))
                c = widths[g + 1]
        self.units = nn.Sequential(*units)
        # Pre-activation nets end with BN-ReLU; bnadd units already end with BN-ReLU.
        self.final_bn = nn.BatchNorm2d(c) if unit == "preact" else None
        self.fc = nn.Linear(c, num_classes)
        self.num_features = c
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        if self.stem_bn is not None:
            h = F.relu(self.stem_bn(h))
        h = self.units(h)
        if self.final_bn is not None:
            h = F.relu(self.final_bn(h))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc(h)


@register("wrn", input_shape=(3, 32, 32), num_classes=10)
def wrn(num_classes: int = 10, depth: int = 16, width: int = 2, dropout: float = 0.0, unit: str = "preact",
        in_channels: int = 3, projection: int = 1) -> WideResNet:
    """Generic WRN-``depth``-``width`` (Zagoruyko & Komodakis 2016); defaults give the small WRN-16-2."""
    return WideResNet(depth, width, num_classes, dropout, unit, in_channels, projection)


@register("wrn28_10", input_shape=(3, 32, 32), num_classes=100)
def wrn28_10(num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 with the WRN authors' pre-activation unit (36.5M parameters; "Wide ResNet" in SRS Table 2)."""
    return WideResNet(28, 10, num_classes, dropout, "preact")


@register("wrn28_10_bnadd", input_shape=(3, 32, 32), num_classes=100)
def wrn28_10_bnadd(num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 with the "BN after addition" unit: the SRS paper's "WRN" (Sec. 4; use dropout 0.3)."""
    return WideResNet(28, 10, num_classes, dropout, "bnadd")


@register("wrn70_10_bnadd", input_shape=(3, 32, 32), num_classes=100)
def wrn70_10_bnadd(num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
    """WRN-70-10 with the "BN after addition" unit and 1x1 projections: the SRS paper's "WRN-70" built as
    the WRN authors build every depth (104.3M parameters; the paper prints 106.4M, see the module notes)."""
    return WideResNet(70, 10, num_classes, dropout, "bnadd")


@register("wrn70_10_bnadd_proj3", input_shape=(3, 32, 32), num_classes=100)
def wrn70_10_bnadd_proj3(num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
    """WRN-70-10, "BN after addition" unit, 3x3 projection shortcuts: 106.40M parameters with 100 classes,
    the count the SRS paper prints for its "WRN-70" (Table 2); the only difference from
    ``wrn70_10_bnadd`` is the kernel of the three projection convolutions."""
    return WideResNet(70, 10, num_classes, dropout, "bnadd", projection=3)


@register("wrn28_2", input_shape=(3, 32, 32), num_classes=10)
def wrn28_2(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-28-2, pre-activation unit: the importance-sampling paper's CIFAR model (Katharopoulos &
    Fleuret 2018, Sec. 4.2)."""
    return WideResNet(28, 2, num_classes, dropout, "preact")
