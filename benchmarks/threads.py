"""Training-step time against the torch CPU thread count, for models of several sizes.

For each model, a training step (forward, backward, SGD step) is timed at 1 thread and at
``min(cores, 8)`` threads, in interleaved chunks, and the median seconds per step and the ratio
(many threads / one thread) are printed, with the spread (max / min over the chunks) that shows how
stable each setting is. ``threads: auto`` in a config (sgdlab.train.engine.auto_threads) uses one
thread below the size where more threads start to pay.

    python benchmarks/threads.py [--chunks 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from sgdlab import models

CASES = [  # (registry name, options, input shape, batch)
    ("cnn1d", {}, (40,), 100),
    ("mlp", {"hidden": [512, 512]}, (40,), 100),
    ("shake_resnet1d", {}, (40,), 100),
    ("wrn", {"depth": 16, "width": 2}, (3, 32, 32), 32),
    ("wrn", {"depth": 16, "width": 4}, (3, 32, 32), 32),
]


def step_seconds(model, opt, x, y, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    many = max(1, min(os.cpu_count() or 1, 8))
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; threads 1 vs {many}")
    print(f"{'model':<28} {'params':>10} {'1 thread':>11} {f'{many} threads':>11} {'ratio':>6} "
          f"{'spread 1':>9} {f'spread {many}':>9}")
    for name, opts, shape, batch in CASES:
        torch.manual_seed(0)
        model = models.create(name, num_classes=10, **opts)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        step_seconds(model, opt, x, y, 3, 1)  # warm-up
        one, more = [], []
        for _ in range(args.chunks):
            one.append(step_seconds(model, opt, x, y, args.steps, 1))
            more.append(step_seconds(model, opt, x, y, args.steps, many))
        params = sum(p.numel() for p in model.parameters())
        label = name + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in opts.items()))
        m1, mn = statistics.median(one), statistics.median(more)
        print(f"{label:<28} {params:>10,} {m1 * 1e3:>9.2f}ms {mn * 1e3:>9.2f}ms {mn / m1:>6.2f} "
              f"{max(one) / min(one):>9.2f} {max(more) / min(more):>9.2f}")


if __name__ == "__main__":
    main()
