"""Time per batch of the blind samplers against PyTorch's RandomSampler + BatchSampler.

Usage::

    python benchmarks/samplers.py [--sizes 50000 10000000] [--batch 128] [--repeats 5]

For each dataset size N the script measures, in the same run, the steady-state time per batch of

- the baseline: iterating ``BatchSampler(RandomSampler(range(N)), batch, drop_last=False)`` (lists);
- each sgdlab sampler through ``next_batch()`` (LongTensor) and through ``iter()`` (lists, like the
  baseline).

Each measurement runs after a warm-up over a window of whole epochs (at least 20,000 batches, so the
baseline's per-epoch ``randperm(N).tolist()`` and the epoch sampler's permutation are amortised as in
training) and reports the median over repeats.  The ratio column is time / baseline time at the same N.

SRS at the largest N against SRS at the smallest is then timed in alternating chunks (the median
ratio of the pairs cancels slow drifts of the machine), next to a *memory probe*: the same 128 random
reads and writes that an SRS step does to its pool, with nothing else, on arrays of the two pool sizes
and on a ladder of sizes in between.  SRS does the same O(B) work at every N; the probe shows how much
of its extra time at large N the machine charges for random access into a large array (cache and TLB
misses), which no exact SRS implementation can avoid: each step must read B uniformly random slots of
an N-slot pool.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch.utils.data import BatchSampler, RandomSampler

from sgdlab.sampling import EpochSampler, ReplacementSampler, SequencedReplacementSampler


def _window(steps_per_epoch: int, minimum: int = 20000) -> int:
    return math.ceil(minimum / steps_per_epoch) * steps_per_epoch


def _puller(make_iter):
    """``pull(k)``: take ``k`` batches from an iterator that is restarted whenever it ends."""
    state = {"it": make_iter()}

    def pull(k):
        it = state["it"]
        for _ in range(k):
            try:
                next(it)
            except StopIteration:
                it = state["it"] = make_iter()
                next(it)
    return pull


def _time_iter(make_iter, n_batches: int, repeats: int) -> float:
    """Median seconds per batch of pulling ``n_batches`` from a restarting iterator."""
    pull = _puller(make_iter)
    pull(min(n_batches, 2000))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pull(n_batches)
        times.append((time.perf_counter() - t0) / n_batches)
    return statistics.median(times)


def _time_next(sampler, n_batches: int, repeats: int) -> float:
    nb = sampler.next_batch
    for _ in range(min(n_batches, 2000)):
        nb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_batches):
            nb()
        times.append((time.perf_counter() - t0) / n_batches)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 10_000_000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    rows = []
    for n in args.sizes:
        b = args.batch
        repeats = args.repeats if n <= 1_000_000 else max(1, min(args.repeats, 3))
        base_window = _window(n // b)
        batch_sampler = BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(0)), b,
                                     drop_last=False)
        base = _time_iter(lambda bs=batch_sampler: iter(bs), base_window, repeats)
        rows.append((n, "RandomSampler+BatchSampler", "iter (lists)", base, 1.0))
        results[(n, "baseline", "iter")] = base
        for name, cls in (("SequencedReplacementSampler", SequencedReplacementSampler),
                          ("ReplacementSampler", ReplacementSampler), ("EpochSampler", EpochSampler)):
            sampler = cls(n, b, seed=0)
            window = _window(len(sampler))
            t_next = _time_next(sampler, window, repeats)
            sampler = cls(n, b, seed=0)
            t_iter = _time_iter(lambda s=sampler: iter(s), window, repeats)
            rows.append((n, name, "next_batch (tensor)", t_next, t_next / base))
            rows.append((n, name, "iter (lists)", t_iter, t_iter / base))
            results[(n, name, "next")] = t_next
            results[(n, name, "iter")] = t_iter

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(f"{'N':>10}  {'sampler':<28} {'path':<20} {'us/batch':>9} {'ratio':>6}")
    for n, name, path, t, ratio in rows:
        print(f"{n:>10}  {name:<28} {path:<20} {t * 1e6:9.2f} {ratio:6.2f}")
    if len(args.sizes) >= 2:
        lo, hi = min(args.sizes), max(args.sizes)
        for path in ("next", "iter"):
            r = results[(hi, "SequencedReplacementSampler", path)] / results[(lo, "SequencedReplacementSampler", path)]
            print(f"SRS {path}: time per batch at N={hi} / at N={lo} = {r:.2f} (separate windows)")
        pairs = max(7, 2 * args.repeats)
        for path in ("next", "iter"):
            med, ratios, extra = _srs_scaling(lo, hi, args.batch, path, pairs=pairs)
            results[("srs_scaling", path)] = med
            results[("srs_extra_us", path)] = extra * 1e6
            print(f"SRS {path}: time per batch at N={hi} / at N={lo} = {med:.2f} (median of {len(ratios)} "
                  f"interleaved pairs, range {min(ratios):.2f}-{max(ratios):.2f}); extra {extra * 1e6:.2f} us/batch")
        probe = _memory_probe(lo, hi, args.batch, pairs=pairs)
        results[("probe_extra_us",)] = probe["extra"] * 1e6
        print(f"memory probe: {args.batch} random reads + writes of an int64 array of N={hi} vs N={lo}: "
              f"extra {probe['extra'] * 1e6:.2f} us/batch (median of {pairs} interleaved pairs)")
        print("memory probe ladder (us/batch by array size): " + ", ".join(
            f"{mb:g} MB {t * 1e6:.2f}" for mb, t in probe["ladder"]))
    return results


def _srs_scaling(lo: int, hi: int, batch: int, path: str, pairs: int, chunk: int = 20000):
    """Median over ``pairs`` of (time at N=hi) / (time at N=lo), the two chunks timed back to back.

    Timing the two sizes alternately cancels slow drifts of the machine's load, which separate
    windows minutes apart do not.
    """
    def stepper(n):
        sampler = SequencedReplacementSampler(n, batch, seed=0)
        if path == "next":
            nb = sampler.next_batch

            def pull_next(k):
                for _ in range(k):
                    nb()
            return pull_next
        return _puller(lambda: iter(sampler))

    return _interleaved(stepper(lo), stepper(hi), pairs, chunk)


def _interleaved(run_lo, run_hi, pairs: int, chunk: int):
    """Time ``run_lo(chunk)`` and ``run_hi(chunk)`` back to back ``pairs`` times after a warm-up.

    Returns the median ratio hi / lo, the list of ratios and the median extra seconds per step.
    """
    run_lo(chunk)
    run_hi(chunk)
    ratios, extras = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        run_lo(chunk)
        t1 = time.perf_counter()
        run_hi(chunk)
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        extras.append(((t2 - t1) - (t1 - t0)) / chunk)
    return statistics.median(ratios), ratios, statistics.median(extras)


def _memory_probe(lo: int, hi: int, batch: int, pairs: int, chunk: int = 20000) -> dict:
    """The random-access cost of one SRS step with the sampler's logic removed.

    Each probe step reads ``batch`` random entries of an int64 array (like ``pool[slots]``) and writes
    them back (like the refill), with precomputed slot rows.  ``extra`` is the median extra time per
    step at ``hi`` entries over ``lo`` entries (interleaved pairs); ``ladder`` is the time per step for
    array sizes from 0.5 MB up to the pool size at ``hi``, to locate where the cost steps up.
    """
    gen = torch.Generator().manual_seed(0)

    def stepper(n):
        pool = torch.randperm(n, generator=gen).numpy()
        rows = torch.randint(n, (4096, batch), generator=gen).numpy()

        def run(k):
            for i in range(k):
                s = rows[i & 4095]
                pool[s] = pool[s]
        return run

    _, _, extra = _interleaved(stepper(lo), stepper(hi), pairs, chunk)
    ladder = []
    mb = 0.5
    while mb * 2**20 / 8 < hi:
        ladder.append((mb, int(mb * 2**20 / 8)))
        mb *= 2
    ladder.append((round(hi * 8 / 2**20), hi))
    timed = []
    for mb, n in ladder:
        run = stepper(n)
        run(chunk)
        t0 = time.perf_counter()
        run(chunk)
        timed.append((mb, (time.perf_counter() - t0) / chunk))
    return {"extra": extra, "ladder": timed}


if __name__ == "__main__":
    main()
