"""Overhead of the eigenvalue monitor in the engine: training time with it every 100 steps / without.

cnn1d on MNIST-1D (batch 100, SGD momentum 0.9, as benchmarks/train_loop.py), run end to end through
``sgdlab.train.run`` with ``monitors: [{name: sharpness, every: 100, probe: P}]`` and without monitors,
for each probe size ``P`` (the Hessian is that of the data loss on ``P`` fixed training examples;
1000 is the engine's default). Wall-clock time of the whole run (set-up, steps, monitors, the final
evaluation and checkpoint), repeats interleaved (baseline, then each variant, then again), so a change
in the machine's load hits all of them alike. Prints every repeat's ratio and the median with the
spread (min-max), and the mean Hessian-vector products a check took.

    python benchmarks/monitors.py [--steps 2000] [--repeats 3] [--every 100] [--probes 1000,100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sgdlab import train


def config(steps: int, monitors: list) -> dict:
    return {"seed": 0, "duration": f"{steps} steps", "data": {"name": "mnist1d"}, "model": {"name": "cnn1d"},
            "sampler": {"name": "epoch", "batch_size": 100},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"every": 10, "progress": False},
            "monitors": monitors}


def seconds(steps: int, monitors: list, out: Path) -> tuple[float, float | None]:
    t0 = time.perf_counter()
    train.run(config(steps, monitors), out, quiet=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    mv = [r["sharpness_matvecs"] for r in rows if "sharpness_matvecs" in r]
    return wall, (sum(mv) / len(mv) if mv else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--probes", default="1000,100", help="comma-separated probe sizes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probes = [int(p) for p in args.probes.split(",")]
    variants = {"none": []} | {f"probe={p}": [{"name": "sharpness", "every": args.every, "probe": p}]
                               for p in probes}
    times: dict[str, list[float]] = {k: [] for k in variants}
    matvecs: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seconds(50, [], root / "warm")
        for r in range(args.repeats):
            for name, mons in variants.items():
                wall, mv = seconds(args.steps, mons, root / f"{name}-{r}")
                times[name].append(wall)
                if mv is not None:
                    matvecs[name].append(mv)
    print(f"cnn1d, {args.steps} steps, batch 100, {args.threads} thread(s); sharpness every {args.every} steps; "
          f"{args.repeats} interleaved repeats")
    print(f"  without monitors: median {statistics.median(times['none']):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times['none'])})")
    for name in variants:
        if name == "none":
            continue
        ratios = [a / b for a, b in zip(times[name], times["none"])]
        print(f"  {name:>10}: ratio (with / without) median {statistics.median(ratios):.3f}, spread "
              f"{min(ratios):.3f}-{max(ratios):.3f} (per repeat: {', '.join(f'{x:.3f}' for x in ratios)}); "
              f"{statistics.mean(matvecs[name]):.1f} Hessian-vector products a check")


if __name__ == "__main__":
    main()
