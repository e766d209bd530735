"""Every combination of sampler x regularizer x loss transform trains, checkpoints, and resumes exactly.

The interrupted run is a forked copy of this process killed with SIGKILL a few steps after a
checkpoint (it is held there so the kill lands mid-run deterministically); the resumed run must end
with the same weights and metrics (except wall-clock time) as an uninterrupted one.
"""

import itertools
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from sgdlab import train
from sgdlab.train import engine

SAMPLERS = {
    "epoch": {"name": "epoch", "batch_size": 16},
    "srs": {"name": "srs", "batch_size": 16},
    "importance": {"name": "importance", "batch_size": 16, "presample": 64, "tau_th": 0.0},
}
MODELS = {
    "none": {"name": "cnn1d", "channels": 8},
    "shake-shake": {"name": "shake_resnet1d", "depth": 8, "width": 4,
                    "shake": {"forward": "shake", "backward": "shake", "level": "image"}},
}
TRANSFORMS = {"none": {}, "random_gradient": {"random_gradient": {"low": 0.0, "high": 1.0}}}
STEPS, CKPT, STOP = 24, 12, 16


def _config(sampler, model, transform):
    return {
        "seed": 5, "device": "cpu", "duration": f"{STEPS} steps", "data": {"name": "mnist1d"},
        "model": MODELS[model], "sampler": SAMPLERS[sampler],
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "unit": "steps"},
        "loss": dict({"name": "cross_entropy"}, **TRANSFORMS[transform]),
        "eval": {"every": 8}, "checkpoint": {"every": CKPT}, "log": {"every": 2, "progress": False},
    }


def _rows(d):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(Path(d) / "metrics.jsonl")]


def _killed_run(cfg, run_dir):
    """Fork; the child trains and stalls when it logs step STOP (> CKPT); the parent SIGKILLs it there."""
    marker = Path(str(run_dir) + ".stalled")
    pid = os.fork()
    if pid == 0:  # child
        try:
            original = engine._Metrics.write

            def write(self, row):
                original(self, row)
                if row["step"] >= STOP:
                    marker.write_text("1")
                    time.sleep(600)

            engine._Metrics.write = write
            train.run(cfg, run_dir, quiet=True)
        finally:
            os._exit(0)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert marker.exists(), "the child never reached the stop step"


@pytest.mark.parametrize("sampler,model,transform",
                         list(itertools.product(SAMPLERS, MODELS, TRANSFORMS)))
def test_combination_resumes_identically(tmp_path, sampler, model, transform):
    cfg = _config(sampler, model, transform)
    ref = tmp_path / "ref"
    train.run(cfg, ref, quiet=True)
    run_dir = tmp_path / "killed"
    _killed_run(cfg, run_dir)
    st = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert st["step"] == CKPT
    assert max(r["step"] for r in _rows(run_dir)) >= STOP  # rows past the checkpoint are on disk
    assert not (run_dir / "summary.json").exists()
    train.resume(run_dir, quiet=True)
    a = torch.load(ref / "checkpoints/last.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _rows(ref) == _rows(run_dir)
    if sampler == "importance":  # tau_th 0: importance sampling is on after the first step
        assert all(r["is_active"] == 1.0 for r in _rows(ref)[1:])
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["status"] == "completed"
    assert final["final"] == json.loads((ref / "summary.json").read_text())["final"]
