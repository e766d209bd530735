"""Data parallelism with the blind samplers: two CPU processes (gloo) against one with the same global batch.

Every rank draws the same global batch and keeps its slice, and DDP averages the ranks' gradients, so
two ranks with batch B/2 follow the single-process run with batch B up to floating-point rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
train = pytest.importorskip("sgdlab.train")

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mini"
CONFIG = {"srs": CONFIGS / "srs_srs_late.yaml", "epoch": CONFIGS / "srs_epoch_late.yaml"}
COMMON = ["duration=50 steps", "log.every=10", "eval.every=0", "checkpoint.every=0"]


def _final(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": summary, "losses": [r["train_loss"] for r in rows if "train_loss" in r]}


@pytest.mark.parametrize("sampler", ["srs", "epoch"])
def test_two_ranks_match_one_process(tmp_path, sampler):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    ddp_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sgdlab.cli", "run", str(CONFIG[sampler]), *COMMON,
           "sampler.batch_size=16", "--out", str(ddp_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single_dir = tmp_path / "single"
    train.run(str(CONFIG[sampler]), single_dir, overrides=[*COMMON, "sampler.batch_size=32"])

    ddp, single = _final(ddp_dir), _final(single_dir)
    assert ddp["summary"]["status"] == single["summary"]["status"] == "completed"
    assert ddp["summary"]["steps"] == single["summary"]["steps"] == 50
    assert ddp["summary"].get("world_size") == 2
    assert len(ddp["losses"]) == len(single["losses"]) > 0
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-6)
    for key in ("test_loss", "test_acc"):
        assert ddp["summary"]["final"][key] == pytest.approx(single["summary"]["final"][key], rel=1e-4, abs=1e-6)


SHAKE = CONFIGS / "shake_ssi.yaml"  # image-level shake: every example draws its own coefficients
SHAKE_COMMON = ["sampler.batch_size=8", "schedule.name=constant", "checkpoint.every=20", "eval.every=20",
                "log.every=10"]


def _torchrun(args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sgdlab.cli",
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ranks_draw_their_own_noise_and_resume_exactly(tmp_path):
    """Each rank has its own torch stream (dropout), shake coefficients are keyed by example (no state), and a
    resumed two-process run continues every rank's stream: it ends bit-identical to an uninterrupted one."""
    import yaml

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    full, part = tmp_path / "full", tmp_path / "part"
    _torchrun(["run", str(SHAKE), *SHAKE_COMMON, "duration=40 steps", "--out", str(full)], env)
    ckpt = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    r0, r1 = ckpt["rng_ranks"]
    assert not torch.equal(r0["torch"], r1["torch"]) and "augment" not in r0
    assert ckpt["global_batch"] == 16 and ckpt["world_size"] == 2

    # the state of an interrupted 40-step run at its step-20 checkpoint: a 20-step run, lengthened
    _torchrun(["run", str(SHAKE), *SHAKE_COMMON, "duration=20 steps", "--out", str(part)], env)
    cfg = yaml.safe_load((part / "config.yaml").read_text())
    cfg["duration"] = "40 steps"
    (part / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (part / "summary.json").unlink()
    _torchrun(["resume", str(part)], env)

    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _final(full)["losses"] == _final(part)["losses"]
