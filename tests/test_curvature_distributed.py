"""Curvature under torch.distributed: two gloo ranks with halves of the data give the one-process result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = Path(__file__).parent / "_ddp_curvature_worker.py"


def _forked_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from _analysis_models import trained_mlp
    from _ddp_curvature_worker import results

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _, (x, y) = trained_mlp(batchnorm=True, steps=50)
        res = results((x[rank::world], y[rank::world]), torch.float32)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(res))


def _compare(a: dict, b: dict) -> None:
    assert a["distributed"] and not b["distributed"]
    assert a["num_examples"] == b["num_examples"] == 256
    # float32 products summed in another order: equal to rounding, well within 1e-6 relative
    assert a["eig"] == pytest.approx(b["eig"], rel=1e-6)
    assert a["trace"] == pytest.approx(b["trace"], rel=1e-6)
    assert a["trace_stderr"] == pytest.approx(b["trace_stderr"], rel=1e-4)
    assert a["blocks"] == pytest.approx(b["blocks"], rel=1e-6)


def _single() -> dict:
    sys.path.insert(0, str(WORKER.parent))
    from _analysis_models import trained_mlp
    from _ddp_curvature_worker import results

    return results(trained_mlp(batchnorm=True, steps=50)[1], torch.float32)  # one process, all the data


def test_two_gloo_processes_match_one_process_on_the_union(tmp_path):
    """Two forked processes (gloo, file store): fast, since the children inherit the imported modules."""
    import multiprocessing as mp

    single = _single()  # first: the children then inherit every lazily imported module
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_forked_rank, args=(r, 2, str(tmp_path / "store"), str(tmp_path / "ddp.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    _compare(json.loads((tmp_path / "ddp.json").read_text()), single)


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_match_one_process_on_the_union(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(tmp_path / "ddp.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _compare(json.loads((tmp_path / "ddp.json").read_text()), _single())
