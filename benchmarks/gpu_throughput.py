"""Training throughput of the engine's fast path against a minimal hand-written PyTorch loop.

Both sides train the same registered model (same seed), with the same batch size, SGD with momentum
and weight decay, device-resident synthetic CIFAR-shaped data, batched random-crop + flip
augmentation, and on CUDA channels_last + bf16 autocast + torch.compile. The script prints the
images/s of each and the ratio engine / minimal (target: >= 0.95).

Timing. The minimal loop is timed over ``steps`` steps after ``warmup`` steps (compilation), with
device synchronisation around the timed region. The engine is timed by the difference of the
training clocks (``summary["wall_time"]``) of two complete runs of ``warmup`` and ``warmup + steps``
steps (after one discarded run that fills the compilation caches), so compilation and the first
steps cancel out.

On CUDA: wrn28_10 (and shake_resnet26_2x96d when registered), batch 128. On CPU a reduced size is
run instead (WRN-16-2 through the generic ``wrn`` builder, batch 32, a few steps, no compile/autocast)
and the script says so.

Each side is measured ``--repeats`` times, interleaved, and its best figure kept (shared machines).

    python benchmarks/gpu_throughput.py [--steps N] [--warmup N] [--batch B] [--models a,b] [--repeats R]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sgdlab import models

NUM_SAMPLES = 10_000  # 2,000 on CPU
NUM_TEST = 256
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def num_samples(device: torch.device) -> int:
    return NUM_SAMPLES if device.type == "cuda" else 2_000


def model_spec(name: str, cuda: bool) -> dict:
    return {"name": name} if cuda else {"name": "wrn", "depth": 16, "width": 2}


# ---------------------------------------------------------------------------------------------
# the baseline: a minimal training loop written directly in PyTorch


def flip_crop(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Batched random crop (padding 4) and horizontal flip, with index arithmetic only."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=gen)
    flip = torch.rand(n, 1, device=x.device, generator=gen) < 0.5
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip, (w - 1) - cols, cols) + ox            # (n, w)
    rows = torch.arange(h, device=x.device) + oy                    # (n, h)
    bi = torch.arange(n, device=x.device).view(n, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


def minimal_loop(name: str, x_train, y_train, *, batch: int, warmup: int, steps: int, device, fast: bool,
                 seed: int = 0) -> float:
    """Images/s of a bare SGD loop over ``steps`` steps after ``warmup`` steps."""
    torch.manual_seed(seed)
    spec = model_spec(name, fast)
    model = models.create(spec.pop("name"), num_classes=10, **spec).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    step_model = torch.compile(model) if fast else model
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    n = x_train.shape[0]
    perm = torch.randperm(n, device=device, generator=gen)
    pos = 0

    def one_step():
        nonlocal perm, pos
        if pos + batch > n:
            perm, pos = torch.randperm(n, device=device, generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        x = flip_crop(x_train[idx], gen)
        y = y_train[idx]
        # flip_crop's output is a permuted view laid out like channels_last: pick the layout explicitly,
        # as the engine does, so that the two sides run the same convolution kernels.
        x = x.contiguous(memory_format=torch.channels_last if fast else torch.contiguous_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            logits = step_model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    model.train()
    for _ in range(warmup):
        one_step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    float(loss.detach())
    sync(device)
    return steps * batch / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------
# the engine


def engine_config(name: str, *, batch: int, total_steps: int, device, fast: bool) -> dict:
    return {
        "seed": 0,
        "device": device.type,
        "duration": f"{total_steps} steps",
        "data": {"name": "synthetic", "shape": [3, 32, 32], "num_classes": 10, "num_samples": num_samples(device),
                 "num_test": NUM_TEST, "on_device": True, "augment": True},
        "model": model_spec(name, fast),
        "sampler": {"name": "epoch", "batch_size": batch},
        "optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WD},
        "schedule": {"name": "constant"},
        "eval": {"every": 0, "batch_size": NUM_TEST},
        "checkpoint": {"every": 0},
        "log": {"every": 1_000_000, "tensorboard": False, "progress": False},
        "fast": {"compile": fast, "channels_last": fast, "autocast": "bf16" if fast else None},
    }


def engine_images_per_s(name: str, *, batch: int, warmup: int, steps: int, device, fast: bool) -> float:
    from sgdlab import train

    def timed(total: int, tmp: Path, tag: str) -> float:
        cfg = engine_config(name, batch=batch, total_steps=total, device=device, fast=fast)
        summary = train.run(cfg, tmp / tag, quiet=True)
        if summary.get("steps") != total:
            raise RuntimeError(f"engine ran {summary.get('steps')} steps, expected {total}")
        # The engine's own training clock (excludes data set-up, evaluation and checkpoints).
        return float(summary["wall_time"])

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        timed(max(warmup, 1), tmp, "fill-caches")
        t_short = timed(warmup, tmp, "short")
        t_long = timed(warmup + steps, tmp, "long")
    return steps * batch / max(t_long - t_short, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 100 on CUDA, 20 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128 on CUDA, 32 on CPU)")
    p.add_argument("--models", default="wrn28_10,shake_resnet26_2x96d")
    p.add_argument("--repeats", type=int, default=2,
                   help="measure both sides this many times, interleaved, and keep each side's best")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (100 if cuda else 20)
    warmup = args.warmup or (20 if cuda else 3)
    batch = args.batch or (128 if cuda else 32)
    names = [n for n in args.models.split(",") if n]
    if cuda:
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}; batch {batch}, {steps} timed steps after "
              f"{warmup}; channels_last + bf16 autocast + torch.compile on both sides")
    else:
        names = names[:1]
        print(f"no CUDA device: reduced CPU run (WRN-16-2 via the generic 'wrn' builder, batch {batch}, "
              f"{steps} timed steps after {warmup}, fp32, no compile); the figures are not the GPU target's")

    try:
        from sgdlab import train
        have_engine = hasattr(train, "run")
    except ImportError:
        have_engine = False

    # Same synthetic CIFAR-shaped data for the baseline as the engine builds (Gaussian clusters).
    from sgdlab import data as sdata

    ds = sdata.create("synthetic", num_samples=num_samples(device), num_test=NUM_TEST, shape=(3, 32, 32),
                      num_classes=10, seed=0)
    x_train, y_train = ds.train_x.to(device), ds.train_y.to(device)

    for name in names:
        if cuda and name not in models.names():
            print(f"{name}: not registered, skipped")
            continue
        label = name if cuda else "wrn16_2 (CPU stand-in for " + name + ")"
        base = eng = 0.0
        for _ in range(max(args.repeats, 1)):
            base = max(base, minimal_loop(name, x_train, y_train, batch=batch, warmup=warmup, steps=steps,
                                          device=device, fast=cuda))
            if have_engine:
                eng = max(eng, engine_images_per_s(name, batch=batch, warmup=warmup, steps=steps, device=device,
                                                   fast=cuda))
        if not have_engine:
            print(f"{label}: minimal loop {base:,.1f} images/s; engine (sgdlab.train.run) not available")
            continue
        print(f"{label}: engine {eng:,.1f} images/s, minimal loop {base:,.1f} images/s, "
              f"ratio engine/minimal {eng / base:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
