"""Overhead and accuracy of the eigenvalue monitor: training with it every 100 steps / without.

Overhead: cnn1d on MNIST-1D (batch 100, SGD momentum 0.9, as benchmarks/train_loop.py), run end to end
through ``sgdlab.train.run`` with ``monitors: [{name: sharpness, every: 100, ...}]`` and without monitors.
Each variant is a set of the monitor's options (``default`` is ``{name: sharpness, every: 100}``: a fixed
probe of the batch size, 100 examples, Lanczos started from the previous check's eigenvector and
stopped at a residual of 1e-2, at most 20 Hessian-vector products a check; ``warm_iter=3`` caps the
warm-started checks at 3; ``background=true`` runs each check in a worker thread on a copy of the
weights, on the second core when training uses one thread). Wall-clock time of the whole run (set-up, steps, monitors, the
final evaluation and checkpoint) and the process's CPU time, repeats interleaved (baseline, then each
variant, then again), so a change in the machine's load hits all of them alike. Prints every repeat's
ratios, the median with the spread (min-max), the in-run ratio (the engine's monitor clock against its
training clock, measured step by step in the same process) and the mean products a check took.

Accuracy (untimed): the same training in a plain loop for ``--accuracy-seeds`` seeds, the variant's
monitor beside a converged one on the same probe (``warm=False``: a cold Lanczos start at every check,
150 products at most, tolerance 1e-7); prints the relative error of every check after the first as a
median, 90th percentile and maximum.

    python benchmarks/monitors.py [--steps 2000] [--repeats 3] [--every 100] [--threads 1]
        [--variants "default;warm_iter=3;background=true"] [--accuracy-seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from sgdlab import data, models, train
from sgdlab.monitors import Sharpness


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


def parse_variant(spec: str) -> dict:
    """``"default"`` or ``"key=value,key=value"`` (values read as YAML) -> the monitor's options."""
    spec = spec.strip()
    if spec in ("", "default"):
        return {}
    out = {}
    for item in spec.split(","):
        k, _, v = item.partition("=")
        out[k.strip()] = yaml.safe_load(v)
    return out


def accuracy(opts: dict, steps: int, every: int, seed: int) -> list[float]:
    """Relative errors of the variant's readings against converged solves along a plain-loop run."""
    torch.manual_seed(seed)
    ds = data.create("mnist1d")
    x, y = ds.train_x, ds.train_y
    model = models.create("cnn1d", num_classes=10, **models.shape_kwargs("cnn1d", tuple(x.shape[1:])))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 7919)
    idx = torch.randperm(len(y), generator=gen)[:opts.get("probe", 100)]
    probe = (x[idx], y[idx])
    # a background check reads the same numbers as a foreground one (tests/test_monitors.py): replayed in front
    kw = {k: v for k, v in opts.items() if k not in ("probe", "background")}
    mon = Sharpness(every=every, probe=probe, seed=seed, **kw)
    ref = Sharpness(every=every, probe=probe, seed=seed, warm=False, max_iter=150, tol=1e-7, prefix="ref")
    errors = []
    order = torch.randperm(len(y), generator=gen)
    pos = 0
    for step in range(1, steps + 1):
        if pos + 100 > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        i = order[pos:pos + 100]
        pos += 100
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        a = mon(model, F.cross_entropy, None, opt, step)
        if a:
            b = ref(model, F.cross_entropy, None, opt, step)
            errors.append((a["sharpness"] - b["ref"]) / b["ref"])
    return errors[1:]  # the first check is cold in both


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--variants", default="default;warm_iter=3;background=true",
                    help="';'-separated monitor options, each 'default' or 'key=value,key=value'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--accuracy-seeds", type=int, default=3, help="seeds of the accuracy replay (0: skip it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants: dict[str, dict] = {spec.strip() or "default": parse_variant(spec) for spec in args.variants.split(";")}
    runs: dict[str, list] = {"none": []}
    for name, opts in variants.items():
        runs[name] = [{"name": "sharpness", "every": args.every, **opts}]
    res: dict[str, list[dict]] = {k: [] for k in runs}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seconds(50, [], root / "warm")
        for r in range(args.repeats):
            for name, mons in runs.items():
                res[name].append(seconds(args.steps, mons, root / f"run{len(res[name])}-{abs(hash(name))}-{r}"))
    print(f"cnn1d, {args.steps} steps, batch 100, {args.threads} thread(s); sharpness every {args.every} steps; "
          f"{args.repeats} interleaved repeats")
    base = res["none"]
    walls = ", ".join(f"{x['wall']:.2f}" for x in base)
    cpus = ", ".join(f"{x['cpu']:.2f}" for x in base)
    print(f"  without monitors: wall {walls} s; CPU {cpus} s")
    for name, opts in variants.items():
        print(f"  {name} ({statistics.mean(x['matvecs'] for x in res[name]):.2f} Hessian-vector products a check "
              "on average, the cold first check included):")
        for what, label in (("wall", "wall-clock, with / without"), ("cpu", "CPU time, with / without")):
            ratios = [a[what] / b[what] for a, b in zip(res[name], base)]
            print(f"    {label}: median {statistics.median(ratios):.3f}, spread {min(ratios):.3f}-{max(ratios):.3f} "
                  f"({', '.join(f'{x:.3f}' for x in ratios)})")
        inside = [x["inside"] for x in res[name]]
        print(f"    in-run, (training + monitor time) / training time: median {statistics.median(inside):.3f}, "
              f"spread {min(inside):.3f}-{max(inside):.3f}")
        if args.accuracy_seeds:
            errs = [e for s in range(args.accuracy_seeds) for e in accuracy(opts, args.steps, args.every, s)]
            a = sorted(abs(e) for e in errs)
            print(f"    accuracy against converged solves ({len(a)} warm checks, {args.accuracy_seeds} seeds): "
                  f"median |error| {100 * statistics.median(a):.2f}%, 90th percentile "
                  f"{100 * a[int(0.9 * (len(a) - 1))]:.2f}%, max {100 * a[-1]:.1f}%, "
                  f"{sum(x > 0.05 for x in a)} over 5%")


if __name__ == "__main__":
    main()
