"""Small models for the CPU studies: ``mlp`` and ``cnn1d`` (MNIST-1D), ``cnn2d`` (mnist5k).

``mlp`` and ``cnn1d`` follow the baselines of the MNIST-1D benchmark (Greydanus & Kobak,
"Scaling down deep learning with MNIST-1D"): a 100-100 ReLU MLP, and a three-layer 1-D CNN
with 25 channels (kernels 5, 3, 3, stride 2) that reaches about 94% test accuracy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register

__all__ = ["MLP", "CNN1d", "CNN2d"]


class MLP(nn.Module):
    """Fully connected ReLU network ``in -> hidden... -> num_classes`` on flattened inputs."""

    def __init__(self, in_features: int = 40, num_classes: int = 10, hidden: tuple[int, ...] = (100, 100)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN1d(nn.Module):
    """MNIST-1D convolutional baseline: 3 strided Conv1d layers of ``channels`` + a linear head."""

    def __init__(self, length: int = 40, num_classes: int = 10, channels: int = 25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        n = length
        for k in (5, 3, 3):
            n = (n + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * n, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


class CNN2d(nn.Module):
    """Small 2-D CNN for 28x28 digits: two conv-ReLU-maxpool stages and a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 32, size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels // 2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(channels // 2, channels, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(channels * (size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register("mlp", input_shape=(40,))
def mlp(num_classes: int = 10, in_features: int = 40, hidden=(100, 100)) -> MLP:
    """The MNIST-1D MLP baseline (Greydanus & Kobak): ``hidden`` ReLU layers, 100-100 by default."""
    return MLP(in_features, num_classes, tuple(hidden))


@register("cnn1d", input_shape=(40,))
def cnn1d(num_classes: int = 10, length: int = 40, channels: int = 25) -> CNN1d:
    """The MNIST-1D CNN baseline (Greydanus & Kobak): three strided 1-D convolutions of 25 channels."""
    return CNN1d(length, num_classes, channels)


@register("cnn2d", input_shape=(1, 28, 28))
def cnn2d(num_classes: int = 10, in_channels: int = 1, channels: int = 32, size: int = 28) -> CNN2d:
    """A small 2-D CNN for ``size`` x ``size`` digits (mnist5k): two conv-ReLU-max-pool stages, linear head."""
    return CNN2d(in_channels, num_classes, channels, size)
