"""Benchmark: top Hessian eigenvalue, sgdlab (Lanczos) vs PyHessian (power iteration) and a dense Hessian.

Both run on the same model, the same data (one batch, eval mode) and in the same process; times are
medians over ``--repeats`` runs and include building the gradient graph. PyHessian is a benchmark-only
dependency that is not vendored: it is imported if installed (``pip install pyhessian``) or loaded from
``--pyhessian-path`` / the ``PYHESSIAN_PATH`` environment variable; without it the script says so and
reports ours against the reference only.

Two iterative solvers are compared at matched accuracy, since either can be made faster by stopping
earlier. PyHessian's power iteration stops when the Rayleigh quotient changes by less than ``tol``
(relative; its default 1e-3); our Lanczos stops when the residual bound ``|beta s|`` falls below
``tol * |theta|`` (library default 1e-5). Each ``--pairs`` entry ``OURS_TOL:PYHESSIAN_TOL`` times both
and reports each one's error against a reference value: the top eigenvalue of the dense Hessian
(``torch.func.hessian`` on the flat float64 parameter vector) where it fits (``--dense-max``
parameters), else Lanczos run to a residual of 1e-9 (an eigenvalue error bound of that size). A pair is
a fair comparison when our error is no larger than PyHessian's; the script says whether it is.

Targets: agreement within 1% and time ratio ours / PyHessian <= 1.0.

    python benchmarks/hessian.py [--pairs 3e-2:1e-3,1e-2:1e-4] [--repeats 5] [--pyhessian-path DIR]
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


def reference_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dense_max: int) -> tuple[float, str, float]:
    """(value, how, seconds): dense eigendecomposition where it fits, else Lanczos to residual 1e-9."""
    dim = sum(p.numel() for p in model.parameters())
    if dim <= dense_max:
        top, t = dense_top(model, x, y)
        return top, "dense", t
    t0 = time.perf_counter()
    r = hessian_eigen(model, F.cross_entropy, (x, y), k=1, tol=1e-9, max_iter=500)
    if not bool(r.converged[0]):
        raise SystemExit("reference Lanczos did not converge")
    return float(r.values[0]), "lanczos 1e-9", time.perf_counter() - t0


def run_case(name: str, args, pyhessian_cls) -> dict:
    torch.manual_seed(0)
    x, y = synthetic(args.examples, 40, 10, seed=0)
    model = build(name)
    train(model, x, y, args.steps)
    model.eval()
    ref, how, t_ref = reference_top(model, x, y, args.dense_max)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "reference": ref,
           "reference_how": how, "reference_s": t_ref, "pairs": []}
    for ours_tol, pyh_tol in args.pairs:
        ours, t_ours = timed(lambda t=ours_tol: hessian_eigen(model, F.cross_entropy, (x, y), k=1, tol=t),
                             args.repeats)
        pair = {"ours_tol": ours_tol, "ours": float(ours.values[0]), "ours_s": t_ours,
                "ours_matvecs": ours.num_matvecs, "ours_err": abs(float(ours.values[0]) - ref) / abs(ref)}
        if pyhessian_cls is not None:

            def pyh(t=pyh_tol):
                model.zero_grad(set_to_none=True)
                hc = pyhessian_cls(model, F.cross_entropy, data=(x, y), cuda=False)
                vals, _ = hc.eigenvalues(top_n=1, tol=t)
                model.zero_grad(set_to_none=True)
                return vals[0]

            torch.manual_seed(0)
            val, t_pyh = timed(pyh, args.repeats)
            pair.update(pyhessian_tol=pyh_tol, pyhessian=float(val), pyhessian_s=t_pyh,
                        pyhessian_err=abs(float(val) - ref) / abs(ref), ratio=t_ours / t_pyh,
                        agreement=abs(pair["ours"] - float(val)) / abs(ref))
        row["pairs"].append(pair)
    return row


def _pairs(text: str) -> list[tuple[float, float]]:
    try:
        out = [tuple(float(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(p) != 2 or min(p) <= 0 for p in out):
        raise argparse.ArgumentTypeError(f"--pairs wants OURS_TOL:PYHESSIAN_TOL[,...] with positive values, got {text!r}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,mlp-bn,cnn1d")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pairs", type=_pairs, default=_pairs("3e-2:1e-3,1e-2:1e-4"),
                   help="OURS_TOL:PYHESSIAN_TOL pairs (ours: Lanczos residual; PyHessian: its relative change)")
    p.add_argument("--dense-max", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pyhessian-path", default=os.environ.get("PYHESSIAN_PATH"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pyhessian_cls = load_pyhessian(args.pyhessian_path)
    if pyhessian_cls is None:
        print(
            "PyHessian is not available (pip install pyhessian, or --pyhessian-path DIR): "
            "reporting ours against the reference only"
        )
    print(
        f"top Hessian eigenvalue, {args.examples} examples in one batch, median of {args.repeats} runs, "
        f"{args.threads} thread(s); errors relative to the reference"
    )
    for name in args.models.split(","):
        r = run_case(name, args, pyhessian_cls)
        print(f"{r['model']:7s} params={r['params']:5d}  reference={r['reference']:.7g} "
              f"({r['reference_how']}, {r['reference_s']:.1f} s)")
        for q in r["pairs"]:
            line = (f"    ours tol {q['ours_tol']:.0e}: {q['ours']:.7g} err {100 * q['ours_err']:.3f}% "
                    f"({q['ours_s']:.3f} s, {q['ours_matvecs']} HVPs)")
            if "pyhessian" in q:
                fair = "fair" if q["ours_err"] <= q["pyhessian_err"] else "NOT matched: ours less accurate"
                line += (f" | pyhessian tol {q['pyhessian_tol']:.0e}: {q['pyhessian']:.7g} "
                         f"err {100 * q['pyhessian_err']:.3f}% ({q['pyhessian_s']:.3f} s) | "
                         f"ratio ours/pyhessian={q['ratio']:.2f}  agreement {100 * q['agreement']:.3f}%  [{fair}]")
            print(line, flush=True)


if __name__ == "__main__":
    main()
