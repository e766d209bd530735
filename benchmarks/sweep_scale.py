"""Sweep bookkeeping at scale: time to the first trial, and time to honour SIGTERM, for a big sweep plan.

``sgdlab sweep`` is started as a process on a plan of ``--points x --seeds`` trials (default 200 x 100 =
20,000) of a one-step config, and, as the baseline in the same run, on a plan of 2 x 100 = 200 trials. For
each, it reports the seconds from the start of the process until ``sweep.json`` is written (the plan is
validated) and until the first trial's folder holds its ``config.yaml`` (the first trial runs), then, once
two trials have finished, sends SIGTERM and reports the seconds until the process has exited (the running
trial stops, the manifest is written, the process ends). The ratios big / baseline show what the plan's size costs; the process's own start-up (importing
torch) is in both. docs/robustness.md states the targets: the first trial in under 5 s after start-up and the
stop within 2 s.

    python benchmarks/sweep_scale.py [--points 200] [--seeds 100] [--jobs 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CONFIG = {"duration": "1 steps", "data": {"name": "synthetic", "num_samples": 64, "num_test": 16},
          "model": {"name": "mlp", "hidden": [8]}, "sampler": {"name": "epoch", "batch_size": 16},
          "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"every": 1}}


def one(points: int, seeds: int, root: Path, jobs: int = 1) -> dict[str, float]:
    """Start the sweep, wait for its plan and first trial, send SIGTERM; the three times in seconds."""
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = root / f"sweep-{points}x{seeds}"
    lrs = ",".join(f"{0.001 * (i + 1):.3f}" for i in range(points))
    cmd = [sys.executable, "-c", "import sys; from sgdlab.cli import main; sys.exit(main())", "sweep", str(cfg),
           "--grid", f"optim.lr={lrs}", "--seeds", str(seeds), "--out", str(out), "--quiet", "--no-report", "--jobs", str(jobs)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    times: dict[str, float] = {}
    first = None
    while proc.poll() is None:
        if "plan" not in times and (out / "sweep.json").is_file():
            times["plan"] = time.perf_counter() - t0
        if first is None and "plan" in times:
            first = next((p for p in out.glob("*/config.yaml")), None)
            if first is not None:
                times["first_trial"] = time.perf_counter() - t0
        log = out / "sweep.jsonl"
        if first is not None and log.is_file() and log.read_text().count("\n") >= 2:
            break  # two trials done: the imports a first trial pays are behind, the sweep is in its stride
        time.sleep(0.01)
    if first is None or proc.poll() is not None:
        raise SystemExit(f"the sweep ended before its second trial: {proc.stderr.read()[-500:]}")
    t1 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(f"the sweep did not stop within 120 s of SIGTERM ({points * seeds} trials)") from None
    times["stop"] = time.perf_counter() - t1
    times["exit_code"] = proc.returncode
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (more: the workers' start-up, "
                    "importing torch, is in the time to the first trial)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = one(2, args.seeds, Path(tmp), args.jobs)
        big = one(args.points, args.seeds, Path(tmp), args.jobs)
    n_base, n_big = 2 * args.seeds, args.points * args.seeds
    print(f"{'trials':>8} {'plan written (s)':>17} {'first trial (s)':>16} {'SIGTERM to exit (s)':>20} {'exit':>5}")
    for n, t in ((n_base, base), (n_big, big)):
        print(f"{n:>8,} {t['plan']:>17.2f} {t['first_trial']:>16.2f} {t['stop']:>20.2f} {t['exit_code']:>5}")
    print(f"ratio {n_big:,} / {n_base:,} trials: first trial x{big['first_trial'] / base['first_trial']:.2f}, "
          f"stop x{big['stop'] / max(base['stop'], 1e-9):.2f}; first trial {big['first_trial'] - base['first_trial']:+.2f} s "
          f"beyond the baseline's start-up")


if __name__ == "__main__":
    main()
