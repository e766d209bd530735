"""Engine throughput against a minimal hand-written PyTorch loop (cnn1d on MNIST-1D).

Both train the same model (same init), on the same in-memory data, with the same batch size and
optimizer (SGD, momentum 0.9), reshuffling every epoch. The engine is timed end to end
(``train.run`` wall time minus the set-up time of a 1-step run: dataset load, model build,
writing the run directory), so its per-step bookkeeping — schedule, batch source, metrics,
progress, the final checkpoint — is counted.

Repeats are interleaved (set-up, engine, minimal loop, then the next repeat), so a change in the machine's
load hits both sides alike. Each repeat gives one ratio engine / minimal (the median set-up time
subtracted); the script prints their median and range (min-max), from wall-clock time and from the
process's CPU time (which does not count the time other processes hold the cores, so it is steadier on a
shared machine).

``--fast`` runs both loops with the fast-path options (the dataset on the device, bf16 autocast,
``torch.compile``; channels_last too when the model has 2-D inputs): the reference for a GPU run
(``--device cuda``). On a CPU it measures the options' overhead, not a speed-up.

    python benchmarks/train_loop.py [--steps 2000] [--repeats 5] [--threads 1] [--fast] [--device cpu]
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


def config(steps: int, threads: int, fast: bool, device: str) -> dict:
    cfg = {"seed": 0, "duration": f"{steps} steps", "threads": threads, "device": device,
           "data": {"name": "mnist1d"}, "model": {"name": "cnn1d"},
           "sampler": {"name": "epoch", "batch_size": BATCH},
           "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
           "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"every": 10, "progress": False}}
    if fast:
        cfg["data"]["on_device"] = True
        cfg["fast"] = {"autocast": "bf16", "compile": True}
    return cfg


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def engine_seconds(steps: int, root: Path, tag: str, *, threads: int = 1, fast: bool = False,
                   device: str = "cpu") -> tuple[float, float]:
    """(wall, cpu) seconds of one ``train.run``."""
    w0, c0 = _clocks()
    train.run(config(steps, threads, fast, device), root / tag, quiet=True)
    w1, c1 = _clocks()
    return w1 - w0, c1 - c0


def minimal_seconds(steps: int, ds, *, fast: bool = False, device: str = "cpu") -> tuple[float, float]:
    """(wall, cpu) seconds of the loop a user would write by hand (with ``fast``: the same fast path)."""
    w0, c0 = _clocks()
    dev = torch.device(device)
    torch.manual_seed(0)
    model = models.create("cnn1d", num_classes=10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_all, y_all = ds.train_x, ds.train_y
    if fast:
        x_all, y_all = x_all.to(dev), y_all.to(dev)
    step_model = torch.compile(model) if fast else model

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16)

    n = len(y_all)
    g = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + BATCH > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + BATCH]
        pos += BATCH
        if fast:
            idx = idx.to(dev)
            with autocast():
                logits = step_model(x_all[idx])
            loss = F.cross_entropy(logits.float(), y_all[idx])
        else:  # exactly what a user writes
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    w1, c1 = _clocks()
    return w1 - w0, c1 - c0


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f}, n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fast", action="store_true", help="both loops with the fast-path options")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = data.create("mnist1d").normalized()
    kw = {"fast": args.fast, "device": args.device}
    setups, engines, minimals = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engine_seconds(50, root, "warm", threads=args.threads, **kw)
        minimal_seconds(50, ds, **kw)
        for r in range(args.repeats):
            setups.append(engine_seconds(1, root, f"setup{r}", threads=args.threads, **kw))
            engines.append(engine_seconds(args.steps, root, f"run{r}", threads=args.threads, **kw))
            minimals.append(minimal_seconds(args.steps, ds, **kw))
    # the set-up is a constant offset: its median over the repeats is subtracted from every engine run
    setup = [statistics.median(s[i] for s in setups) for i in (0, 1)]
    wall = [m[0] / (e[0] - setup[0]) for e, m in zip(engines, minimals)]
    cpu = [m[1] / (e[1] - setup[1]) for e, m in zip(engines, minimals)]
    e_sps = [args.steps / (e[0] - setup[0]) for e in engines]
    m_sps = [args.steps / m[0] for m in minimals]
    mode = "fast path (data on device, bf16 autocast, torch.compile)" if args.fast else "default options"
    print(f"cnn1d / mnist1d, batch {BATCH}, {args.steps} steps, {args.threads} thread(s), {args.device}, {mode}, "
          f"{args.repeats} interleaved repeats")
    print(f"  minimal loop : {statistics.median(m_sps):8.1f} steps/s (median)")
    print(f"  sgdlab engine: {statistics.median(e_sps):8.1f} steps/s (median; set-up of a 1-step run subtracted)")
    print(f"  ratio engine / minimal, wall-clock: {_spread(wall)}")
    print(f"  ratio engine / minimal, CPU time  : {_spread(cpu)}   (target >= 0.98 on a quiet machine)")


if __name__ == "__main__":
    main()
