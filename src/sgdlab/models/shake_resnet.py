"""Shake-Shake ResNets (Gastaldi, "Shake-Shake regularization", 2017, section 2.1.1 and section 5).

Shake-ResNet-26 2xKd as in the author's code: stem Conv3x3(3->16, no bias) + BN (no ReLU);
3 stages of ``(depth - 2) / 6`` blocks with widths K, 2K, 4K and strides 1, 2, 2 (on the first
conv of each branch); each of the two branches is ReLU-Conv3x3-BN-ReLU-Conv3x3-BN and they are
blended by :class:`sgdlab.regularize.Shake`; no ReLU after the sum. When the channel count changes
(also in the first block of stage 1) the shortcut is ReLU, then two paths AvgPool(1, stride) ->
Conv1x1(to half the width), the second on the map shifted one pixel right and down (zeros entering
at the top and left), concatenated, then BN.
Head: ReLU, global average pool, Linear. He (fan-out) init, no conv biases, BN weight 1, Linear
bias 0. Parameter counts: 2x32d 2.92M (paper 2.9M), 2x96d 26.19M (paper 26.2M).

Section-5 variants are options: ``skip=False`` (architecture A), ``single_conv=True`` (B: one conv
per branch, twice the blocks) and ``batchnorm=False`` (C: no batch norm; convs then carry biases).
The same code builds the 1-D version for MNIST-1D (``dims=1``, see :mod:`.shake1d`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..regularize.shake import Shake
from .registry import register

__all__ = ["ShakeBlock", "ShakeResNet", "shake_resnet", "shake_settings"]

_SHAKE_KEYS = ("forward", "backward", "level", "rule", "alpha_range")


def shake_settings(shake: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a model's ``shake`` option (keys forward, backward, level, rule, alpha_range)."""
    if shake is None:
        return {}
    if not isinstance(shake, Mapping):
        raise ValueError(f"shake must be a mapping with keys {_SHAKE_KEYS}, got {type(shake).__name__}")
    unknown = [k for k in shake if k not in _SHAKE_KEYS]
    if unknown:
        raise ValueError(f"shake has unknown key(s) {unknown}; valid keys: {list(_SHAKE_KEYS)}")
    out = dict(shake)
    if "alpha_range" in out:
        out["alpha_range"] = tuple(out["alpha_range"])
    Shake(**out)  # validates the values
    return out


def _layers(dims: int):
    if dims == 2:
        return nn.Conv2d, nn.BatchNorm2d
    if dims == 1:
        return nn.Conv1d, nn.BatchNorm1d
    raise ValueError(f"dims must be 1 or 2, got {dims!r}")


class _ShiftConcatShortcut(nn.Module):
    """ReLU, two strided 1x1 paths (the second on the map shifted by one pixel), concat, BN."""

    def __init__(self, cin: int, cout: int, stride: int, dims: int, batchnorm: bool):
        super().__init__()
        if cout % 2:
            raise ValueError(f"the shortcut needs an even output width, got {cout}")
        conv, bn = _layers(dims)
        self.stride = stride
        self.dims = dims
        self.conv1 = conv(cin, cout // 2, 1, bias=not batchnorm)
        self.conv2 = conv(cin, cout // 2, 1, bias=not batchnorm)
        self.bn = bn(cout) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        s = self.stride
        # The second path sees the map moved one pixel right and down, a zero row and column entering
        # at the top and left (the paper's section 2; the author's code pads (1, -1, 1, -1)).
        if self.dims == 2:
            shifted = F.pad(x[:, :, :-1, :-1], (1, 0, 1, 0))
            p1, p2 = x[:, :, ::s, ::s], shifted[:, :, ::s, ::s]
        else:
            shifted = F.pad(x[:, :, :-1], (1, 0))
            p1, p2 = x[:, :, ::s], shifted[:, :, ::s]
        # AvgPool with kernel 1 and stride s is plain subsampling
        return self.bn(torch.cat([self.conv1(p1), self.conv2(p2)], dim=1))


def _branch(cin: int, cout: int, stride: int, dims: int, batchnorm: bool, single_conv: bool) -> nn.Sequential:
    conv, bn = _layers(dims)
    layers: list[nn.Module] = [nn.ReLU(inplace=False), conv(cin, cout, 3, stride, 1, bias=not batchnorm)]
    if batchnorm:
        layers.append(bn(cout))
    if not single_conv:
        layers += [nn.ReLU(inplace=True), conv(cout, cout, 3, 1, 1, bias=not batchnorm)]
        if batchnorm:
            layers.append(bn(cout))
    return nn.Sequential(*layers)


class ShakeBlock(nn.Module):
    """Two-branch residual block ``x -> shortcut(x) + shake(branch1(x), branch2(x))``.

    ``branch1``/``branch2`` are exposed as attributes (``branch_correlation`` hooks them).
    """

    def __init__(self, cin: int, cout: int, stride: int, *, dims: int = 2, shake: Mapping | None = None,
                 skip: bool = True, batchnorm: bool = True, single_conv: bool = False):
        super().__init__()
        self.branch1 = _branch(cin, cout, stride, dims, batchnorm, single_conv)
        self.branch2 = _branch(cin, cout, stride, dims, batchnorm, single_conv)
        self.shake = Shake(**shake_settings(shake))
        self.skip = skip
        if not skip:
            self.shortcut = None
        elif cin != cout or stride != 1:
            self.shortcut = _ShiftConcatShortcut(cin, cout, stride, dims, batchnorm)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shake(self.branch1(x), self.branch2(x))
        if self.shortcut is not None:
            h = h + self.shortcut(x)
        return h


class ShakeResNet(nn.Module):
    """Shake-ResNet (Gastaldi 2017, section 2.1.1): stem, 3 stages of :class:`ShakeBlock`, head."""

    def __init__(self, depth: int = 26, width: int = 32, num_classes: int = 10, *, in_channels: int = 3,
                 stem_width: int = 16, dims: int = 2, shake: Mapping | None = None, skip: bool = True,
                 single_conv: bool = False, batchnorm: bool = True):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (e.g. 14, 20, 26), got {depth!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
            raise ValueError(f"width must be an even positive integer, got {width!r}")
        conv, bn = _layers(dims)
        settings = shake_settings(shake)
        n = (depth - 2) // 6
        if single_conv:
            n *= 2
        self.stem = nn.Sequential(conv(in_channels, stem_width, 3, 1, 1, bias=not batchnorm),
                                  bn(stem_width) if batchnorm else nn.Identity())
        blocks: list[nn.Module] = []
        cin = stem_width
        for stage, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2))):
            cout = width * mult
            for i in range(n):
                blocks.append(ShakeBlock(cin, cout, stride if i == 0 else 1, dims=dims, shake=settings,
                                         skip=skip, batchnorm=batchnorm, single_conv=single_conv))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        self.dims = dims
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 1 and x.dim() == 2:
            x = x.unsqueeze(1)
        h = self.blocks(self.stem(x))
        h = F.relu(h).flatten(2).mean(-1)
        return self.fc(h)


def shake_resnet(num_classes: int = 10, depth: int = 26, width: int = 32, *, shake: Mapping | None = None,
                 skip: bool = True, single_conv: bool = False, batchnorm: bool = True,
                 in_channels: int = 3) -> ShakeResNet:
    """Generic Shake-ResNet-``depth`` 2x``width``d builder (section 2.1.1; variants of section 5).

    ``skip=False``: architecture A (no skip connection); ``single_conv=True``: B (one conv per
    branch, twice the blocks); ``batchnorm=False``: C (no batch norm, used with depth 14 and a
    narrowed ``alpha_range`` in the paper's Table 5).
    """
    return ShakeResNet(depth, width, num_classes, in_channels=in_channels, shake=shake, skip=skip,
                       single_conv=single_conv, batchnorm=batchnorm)


register("shake_resnet", input_shape=(3, 32, 32))(shake_resnet)


def _fixed(width: int):
    def builder(num_classes: int = 10, shake: Mapping | None = None, **kw) -> ShakeResNet:
        return shake_resnet(num_classes, 26, width, shake=shake, **kw)

    builder.__doc__ = f"Shake-ResNet-26 2x{width}d (Gastaldi 2017, Table 1)."
    return builder


for _w in (32, 64, 96, 112):
    register(f"shake_resnet26_2x{_w}d", input_shape=(3, 32, 32))(_fixed(_w))
