"""Cost of shake-shake in a training step (Gastaldi, "Shake-Shake regularization", 2017).

Times one training step (forward + backward + SGD step) of ``shake_resnet26_2x32d`` on CPU with
Shake-Shake-Image (S-S-I) against the same network whose branches are plainly averaged
(Even-Even-Batch, E-E-B: ``0.5 * (x1 + x2)``), interleaving the two in every repeat and reporting
the ratio of the medians. Target: S-S-I / E-E-B <= 1.05.

It also times the elastic (world-size invariant) draws: a step with batched CIFAR augmentation, S-S-I
and per-sample Random Gradient whose draws are streamed from generators ("streamed") against the same
step with every per-example draw keyed by (seed, stream, step, example index) through
``sgdlab.keyed`` ("keyed"). Target: keyed / streamed <= 1.05.

    python benchmarks/shake.py [--batch 16] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sgdlab import keyed, models, regularize
from sgdlab.data import cifar_augment

SETTINGS = {
    "E-E-B": {"forward": "even", "backward": "even", "level": "batch"},
    "S-S-I": {"forward": "shake", "backward": "shake", "level": "image"},
    "S-E-I": {"forward": "shake", "backward": "even", "level": "image"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shake_resnet26_2x32d")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = models.input_shape(args.model)
    x = torch.randn(args.batch, *shape)
    y = torch.randint(0, 10, (args.batch,))
    runs = {}
    for name, shake in SETTINGS.items():
        torch.manual_seed(0)  # identical initial weights for every variant
        m = models.create(args.model, num_classes=10, shake=shake).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        runs[name] = (m, opt)

    for name in ("streamed", "keyed"):  # S-S-I + augmentation + per-sample Random Gradient
        torch.manual_seed(0)
        m = models.create(args.model, num_classes=10, shake=SETTINGS["S-S-I"]).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        runs[name] = (m, opt)
    rg = {k: regularize.RandomGradient(per_sample=True, seed=1) for k in ("streamed", "keyed")}
    aug_gen, shake_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    for mod in runs["streamed"][0].modules():
        if isinstance(mod, regularize.Shake):
            mod.generator = shake_gen
    images = x.dim() == 4
    indices = torch.randperm(50_000)[:args.batch]
    counter = [0]

    def step(m, opt, name=None):
        opt.zero_grad(set_to_none=True)
        if name is None:
            F.cross_entropy(m(x), y).backward()
        elif name == "streamed":
            xa = cifar_augment(x, generator=aug_gen) if images else x
            rg[name](F.cross_entropy(m(xa), y, reduction="none")).mean().backward()
        else:
            counter[0] += 1
            with keyed.keyed(0, counter[0], indices) as keys:
                xa = cifar_augment(x, keys=keys) if images else x
                rg[name](F.cross_entropy(m(xa), y, reduction="none")).mean().backward()
        opt.step()

    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.warmup + args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            t = time.perf_counter()
            step(*runs[name], name if name in ("streamed", "keyed") else None)
            dt = time.perf_counter() - t
            if r >= args.warmup:
                times[name].append(dt)
    base = statistics.median(times["E-E-B"])
    print(f"{args.model}, batch {args.batch}, CPU threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats (median)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name}: {med * 1e3:8.1f} ms/step   ratio vs E-E-B {med / base:.3f}")
    ratio = statistics.median(times["S-S-I"]) / base
    print(f"S-S-I / E-E-B = {ratio:.3f} (target <= 1.05): {'OK' if ratio <= 1.05 else 'ABOVE TARGET'}")
    ratio = statistics.median(times["keyed"]) / statistics.median(times["streamed"])
    print(f"keyed / streamed draws (S-S-I + augmentation + per-sample RG) = {ratio:.3f} (target <= 1.05): "
          f"{'OK' if ratio <= 1.05 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
