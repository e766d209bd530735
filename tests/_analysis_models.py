"""Small models with closed-form losses shared by the analysis tests."""

from __future__ import annotations

import torch
import torch.nn as nn


class Quadratic(nn.Module):
    """Output ``0.5 w^T H w`` for every example, so the mean loss is that quadratic and its Hessian is H."""

    def __init__(self, H: torch.Tensor, w0: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("H", H.clone())
        self.w = nn.Parameter(torch.zeros(H.shape[0], dtype=H.dtype) if w0 is None else w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.w @ self.H @ self.w).expand(x.shape[0])


def mean_output(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.mean()


def quad_data(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 1, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)


def sym_with_eigs(eigs: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def synthetic(n: int = 256, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, d, generator=gen)
    return x, y


def trained_mlp(batchnorm: bool = False, steps: int = 300, seed: int = 0) -> tuple[nn.Module, tuple]:
    """A tiny MLP trained with full-batch SGD on Gaussian clusters (a fraction of a second on CPU)."""
    torch.manual_seed(seed)
    x, y = synthetic(seed=seed)
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, (x, y)
