"""Benchmark: top Hessian eigenvalue, sgdlab (Lanczos) vs PyHessian (power iteration) and a dense Hessian.

Both run on the same model, the same data (one batch, eval mode) and in the same process; times are
medians over ``--repeats`` runs and include building the gradient graph. PyHessian is a benchmark-only
dependency that is not vendored: it is imported if installed (``pip install pyhessian``) or loaded from
``--pyhessian-path`` / the ``PYHESSIAN_PATH`` environment variable; without it the script says so and
reports ours against the dense Hessian only. The dense Hessian (``torch.func.hessian`` on the flat
parameter vector, float64) is computed where it fits (``--dense-max`` parameters).

Targets: agreement within 1% and time ratio ours / PyHessian <= 1.0.

    python benchmarks/hessian.py [--steps 300] [--repeats 3] [--pyhessian-path DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdlab.analysis import hessian_eigen


def load_pyhessian(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        from pyhessian import hessian as pyhessian_cls  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pyhessian_cls


def synthetic(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = 0.4 * torch.randn(classes, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return centers[y] + torch.randn(n, d, generator=gen), y


class CNN1d(nn.Module):
    """The MNIST-1D convolutional baseline shape (3 strided convs of 25 channels + linear)."""

    def __init__(self, channels: int = 25, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.c2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.c3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.head = nn.Linear(channels * 5, classes)

    def forward(self, x):
        h = x.unsqueeze(1)
        h = self.c3(self.c2(self.c1(h).relu()).relu()).relu()
        return self.head(h.flatten(1))


def build(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))
    if name == "mlp-bn":
        return nn.Sequential(nn.Linear(40, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    if name == "cnn1d":
        return CNN1d()
    raise SystemExit(f"unknown model {name}")


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def dense_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    m = model.eval()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    params64 = {n: p.detach().double() for n, p in m.named_parameters()}
    buffers = {k: (b.double() if b.is_floating_point() else b) for k, b in m.named_buffers()}
    flat0 = torch.cat([p.reshape(-1) for p in params64.values()])

    def f(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            ps[n] = flat[i : i + k].view(s)
            i += k
        return F.cross_entropy(torch.func.functional_call(m, {**buffers, **ps}, (x.double(),)), y)

    t0 = time.perf_counter()
    h = torch.func.hessian(f)(flat0)
    top = float(torch.linalg.eigvalsh(0.5 * (h + h.T))[-1])
    return top, time.perf_counter() - t0


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run_case(name: str, args, pyhessian_cls) -> dict:
    torch.manual_seed(0)
    x, y = synthetic(args.examples, 40, 10, seed=0)
    model = build(name)
    train(model, x, y, args.steps)
    model.eval()
    dim = sum(p.numel() for p in model.parameters())
    ours, t_ours = timed(
        lambda: hessian_eigen(model, F.cross_entropy, (x, y), k=1, tol=args.tol), args.repeats
    )
    row = {
        "model": name,
        "params": dim,
        "ours": float(ours.values[0]),
        "ours_s": t_ours,
        "ours_matvecs": ours.num_matvecs,
        "ours_residual": float(ours.residuals[0]),
    }
    if pyhessian_cls is not None:

        def pyh():
            model.zero_grad(set_to_none=True)
            hc = pyhessian_cls(model, F.cross_entropy, data=(x, y), cuda=False)
            vals, _ = hc.eigenvalues(top_n=1)
            model.zero_grad(set_to_none=True)
            return vals[0]

        torch.manual_seed(0)
        val, t_pyh = timed(pyh, args.repeats)
        row.update(
            pyhessian=float(val),
            pyhessian_s=t_pyh,
            ratio=t_ours / t_pyh,
            rel_diff_pyhessian=abs(row["ours"] - val) / abs(val),
        )
    if dim <= args.dense_max:
        top, t_dense = dense_top(model, x, y)
        row.update(dense=top, dense_s=t_dense, rel_err_ours=abs(row["ours"] - top) / abs(top))
        if "pyhessian" in row:
            row["rel_err_pyhessian"] = abs(row["pyhessian"] - top) / abs(top)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,mlp-bn,cnn1d")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--tol",
        type=float,
        default=1e-3,
        help="Lanczos relative residual tolerance (ours; library default 1e-5)",
    )
    p.add_argument("--dense-max", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pyhessian-path", default=os.environ.get("PYHESSIAN_PATH"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pyhessian_cls = load_pyhessian(args.pyhessian_path)
    if pyhessian_cls is None:
        print(
            "PyHessian is not available (pip install pyhessian, or --pyhessian-path DIR): "
            "reporting ours against the dense Hessian only"
        )
    print(
        f"top Hessian eigenvalue, {args.examples} examples in one batch, median of {args.repeats} runs, "
        f"{args.threads} thread(s)"
    )
    for name in args.models.split(","):
        r = run_case(name, args, pyhessian_cls)
        line = (
            f"{r['model']:7s} params={r['params']:6d}  ours={r['ours']:.6g} ({r['ours_s']:.3f} s, "
            f"{r['ours_matvecs']} HVPs, residual {r['ours_residual']:.1e})"
        )
        if "pyhessian" in r:
            line += (
                f"  pyhessian={r['pyhessian']:.6g} ({r['pyhessian_s']:.3f} s)  "
                f"ratio ours/pyhessian={r['ratio']:.2f}  |diff|={100 * r['rel_diff_pyhessian']:.3f}%"
            )
        if "dense" in r:
            line += (
                f"  dense={r['dense']:.6g} ({r['dense_s']:.1f} s)  ours err={100 * r['rel_err_ours']:.2e}%"
            )
            if "rel_err_pyhessian" in r:
                line += f"  pyhessian err={100 * r['rel_err_pyhessian']:.2e}%"
        print(line, flush=True)


if __name__ == "__main__":
    main()
