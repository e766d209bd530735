"""Shake-ResNeXt-29 2x4x64d for CIFAR-100 (Gastaldi, "Shake-Shake regularization", 2017, section 2.2).

ResNeXt without pre-activation: stem Conv3x3(3->64) + BN + ReLU; 3 stages of 3 bottleneck blocks
with output widths 256, 512, 1024 (strides 1, 2, 2). Each of the two branches is Conv1x1 -> BN ->
ReLU -> grouped Conv3x3 (4 groups; inner width 4 x 64, 4 x 128, 4 x 256) -> BN -> ReLU -> Conv1x1
-> BN; the branches are blended by :class:`sgdlab.regularize.Shake`; the shortcut is Conv1x1 + BN
when the shape changes; ReLU after the addition. Head: global average pool, Linear.
34.4M parameters in the paper (Table 2/3).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..regularize.shake import Shake
from .registry import register
from .shake_resnet import shake_settings

__all__ = ["ShakeResNeXtBlock", "ShakeResNeXt", "shake_resnext29_2x4x64d"]


def _branch(cin: int, inner: int, cout: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
        nn.Conv2d(inner, inner, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(inner),
        nn.ReLU(inplace=True),
        nn.Conv2d(inner, cout, 1, bias=False), nn.BatchNorm2d(cout),
    )


class ShakeResNeXtBlock(nn.Module):
    """Bottleneck block with two shaken branches; ``branch1``/``branch2`` are exposed."""

    def __init__(self, cin: int, inner: int, cout: int, stride: int, groups: int,
                 shake: Mapping | None = None):
        super().__init__()
        self.branch1 = _branch(cin, inner, cout, stride, groups)
        self.branch2 = _branch(cin, inner, cout, stride, groups)
        self.shake = Shake(**shake_settings(shake))
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.shake(self.branch1(x), self.branch2(x)))


class ShakeResNeXt(nn.Module):
    """Shake-ResNeXt-``depth`` 2 x ``cardinality`` x ``base_width``d (section 2.2)."""

    def __init__(self, depth: int = 29, cardinality: int = 4, base_width: int = 64, num_classes: int = 100,
                 *, shake: Mapping | None = None, in_channels: int = 3):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
            raise ValueError(f"depth must be 9n + 2 with n >= 1 (e.g. 29), got {depth!r}")
        for name, v in (("cardinality", cardinality), ("base_width", base_width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        settings = shake_settings(shake)
        n = (depth - 2) // 9
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        cin = 64
        for stage, stride in enumerate((1, 2, 2)):
            inner = cardinality * base_width * 2 ** stage
            cout = 256 * 2 ** stage
            for i in range(n):
                s = stride if i == 0 else 1
                blocks.append(ShakeResNeXtBlock(cin, inner, cout, s, cardinality, settings))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(h.flatten(2).mean(-1))


@register("shake_resnext29_2x4x64d", input_shape=(3, 32, 32), num_classes=100)
def shake_resnext29_2x4x64d(num_classes: int = 100, shake: Mapping | None = None, **kw) -> ShakeResNeXt:
    """Shake-ResNeXt-29 2x4x64d (Gastaldi 2017, Table 2; 34.4M parameters)."""
    return ShakeResNeXt(29, 4, 64, num_classes, shake=shake, **kw)
