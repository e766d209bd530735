"""Run under torchrun (gloo): each rank holds every other example; rank 0 writes the curvature results."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _analysis_models import trained_mlp  # noqa: E402

from sgdlab.analysis import HessianOperator, curvature_blocks, estimate_trace, top_eigenvalues  # noqa: E402


def results(data, dtype):
    model, _ = trained_mlp(batchnorm=True, steps=50)
    model = model.to(dtype)
    x, y = data
    data = [(x[i : i + 50].to(dtype), y[i : i + 50]) for i in range(0, x.shape[0], 50)]
    op = HessianOperator(model, F.cross_entropy, data)
    eig = top_eigenvalues(op, k=2, tol=1e-10, max_iter=80)
    tr = estimate_trace(op, method="hutch++", num_matvecs=30, seed=3)
    table = curvature_blocks(model, F.cross_entropy, data, num_matvecs=12, max_iter=20, include_total=False)
    return {"eig": eig.values.tolist(), "trace": tr.value, "trace_stderr": tr.stderr,
            "blocks": [r.trace.value for r in table.rows], "num_examples": op.num_examples,
            "distributed": op.distributed}


def main() -> None:
    _, (x, y) = trained_mlp(batchnorm=True, steps=50)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = results((x[rank::world], y[rank::world]), torch.float32)
    dist.destroy_process_group()
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
