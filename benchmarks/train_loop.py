"""Engine throughput against a minimal hand-written PyTorch loop (cnn1d on MNIST-1D).

Both train the same model (same init), on the same in-memory data, with the same batch size and
optimizer (SGD, momentum 0.9), reshuffling every epoch. The engine is timed end to end
(``train.run`` wall time minus the set-up time of a 1-step run: dataset load, model build,
writing the run directory), so its per-step bookkeeping — schedule, batch source, metrics,
progress, the final checkpoint — is counted. Repeats are interleaved; medians are reported.

    python benchmarks/train_loop.py [--steps 2000] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sgdlab import data, models, train

BATCH = 100


def config(steps: int) -> dict:
    return {"seed": 0, "duration": f"{steps} steps", "data": {"name": "mnist1d"}, "model": {"name": "cnn1d"},
            "sampler": {"name": "epoch", "batch_size": BATCH},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"every": 10, "progress": False}}


def engine_seconds(steps: int, root: Path, tag: str) -> float:
    t0 = time.perf_counter()
    train.run(config(steps), root / tag, quiet=True)
    return time.perf_counter() - t0


def minimal_seconds(steps: int, ds) -> float:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = models.create("cnn1d", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_all, y_all = ds.train_x, ds.train_y
    n = len(y_all)
    g = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + BATCH > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + BATCH]
        pos += BATCH
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = data.create("mnist1d").normalized()
    eng, mini, setup = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engine_seconds(50, root, "warm")
        minimal_seconds(50, ds)
        for r in range(args.repeats):
            setup.append(engine_seconds(1, root, f"setup{r}"))
            eng.append(engine_seconds(args.steps, root, f"run{r}"))
            mini.append(minimal_seconds(args.steps, ds))
    s = statistics.median(setup)
    e_sps = args.steps / (statistics.median(eng) - s)
    m_sps = args.steps / statistics.median(mini)
    print(f"cnn1d / mnist1d, batch {BATCH}, {args.steps} steps, {args.threads} thread(s), median of {args.repeats}")
    print(f"  minimal loop : {m_sps:8.1f} steps/s")
    print(f"  sgdlab engine: {e_sps:8.1f} steps/s   (set-up {s:.2f} s subtracted)")
    print(f"  ratio engine / minimal = {e_sps / m_sps:.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
