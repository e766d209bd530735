"""Overhead of the eigenvalue monitor in the engine: training time with it every 100 steps / without.

cnn1d on MNIST-1D (batch 100, SGD momentum 0.9, as benchmarks/train_loop.py), run end to end through
``sgdlab.train.run`` with ``monitors: [{name: sharpness, every: 100, probe: P}]`` and without monitors,
for each probe size ``P`` (``P:M`` also caps the Hessian-vector products of a check at ``M``; the Hessian is that of the data loss on ``P`` fixed training examples;
1000 is the engine's default). Wall-clock time of the whole run (set-up, steps, monitors, the final
evaluation and checkpoint) and the process's CPU time (steadier on a shared machine: other jobs stretch
wall-clock time, not this process's CPU time), repeats interleaved (baseline, then each variant, then again), so a change
in the machine's load hits all of them alike. Prints every repeat's ratios and the median with the
spread (min-max), the in-run ratio (the engine's monitor clock against its training clock, measured step
by step in the same process) and the mean Hessian-vector products a check took.

    python benchmarks/monitors.py [--steps 2000] [--repeats 3] [--every 100] [--probes 1000,100,100:3] [--threads 1]
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


def seconds(steps: int, monitors: list, out: Path) -> dict:
    """Wall-clock and CPU seconds of a whole run, its in-run ratio and the products a check took."""
    t0, c0 = time.perf_counter(), time.process_time()
    train.run(config(steps, monitors), out, quiet=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    mv = [r["sharpness_matvecs"] for r in rows if "sharpness_matvecs" in r]
    last = rows[-1]
    inside = 1.0 + last.get("monitor_time", 0.0) / last["time"]
    return {"wall": wall, "cpu": cpu, "inside": inside, "matvecs": sum(mv) / len(mv) if mv else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--probes", default="1000,100,100:3",
                    help="comma-separated probe sizes, each optionally with :MAX_ITER (products a check at most)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants: dict[str, list] = {"none": []}
    for spec in args.probes.split(","):
        probe, _, max_iter = spec.partition(":")
        mon = {"name": "sharpness", "every": args.every, "probe": int(probe)}
        if max_iter:
            mon["max_iter"] = int(max_iter)
        variants[f"probe={probe}" + (f", max_iter={max_iter}" if max_iter else "")] = [mon]
    res: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seconds(50, [], root / "warm")
        for r in range(args.repeats):
            for name, mons in variants.items():
                res[name].append(seconds(args.steps, mons, root / f"{name}-{r}"))
    print(f"cnn1d, {args.steps} steps, batch 100, {args.threads} thread(s); sharpness every {args.every} steps; "
          f"{args.repeats} interleaved repeats")
    base = res["none"]
    walls = ", ".join(f"{x['wall']:.2f}" for x in base)
    cpus = ", ".join(f"{x['cpu']:.2f}" for x in base)
    print(f"  without monitors: wall {walls} s; CPU {cpus} s")
    for name in variants:
        if name == "none":
            continue
        print(f"  {name} ({statistics.mean(x['matvecs'] for x in res[name]):.1f} Hessian-vector products a check):")
        for what, label in (("wall", "wall-clock, with / without"), ("cpu", "CPU time, with / without")):
            ratios = [a[what] / b[what] for a, b in zip(res[name], base)]
            print(f"    {label}: median {statistics.median(ratios):.3f}, spread {min(ratios):.3f}-{max(ratios):.3f} "
                  f"({', '.join(f'{x:.3f}' for x in ratios)})")
        inside = [x["inside"] for x in res[name]]
        print(f"    in-run, (training + monitor time) / training time: median {statistics.median(inside):.3f}, "
              f"spread {min(inside):.3f}-{max(inside):.3f}")


if __name__ == "__main__":
    main()
