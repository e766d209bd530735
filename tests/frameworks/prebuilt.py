"""Run under torchrun with 2 processes: samplers built before the process group exists."""

import json
import os
import sys

import torch
import torch.distributed as dist

from sgdlab.sampling import EpochSampler, ImportanceSampler, ReplacementSampler, SequencedReplacementSampler

CLASSES = [EpochSampler, ReplacementSampler, SequencedReplacementSampler]
early = [cls(64, 4, seed=3) for cls in CLASSES]          # built at module level, never touched
sized = [cls(64, 4, seed=3) for cls in CLASSES]          # touched (len) before the group exists
lengths = [len(s) for s in sized]
iterated = [cls(64, 4, seed=3) for cls in CLASSES]
lengths += [len(s) for s in iterated]
importance = ImportanceSampler(64, 4, presample=16, score_fn=lambda i: torch.ones(len(i)))

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {"rank": rank, "slices": [], "raised": [], "iter_raised": []}
for cls, s in zip(CLASSES, early):
    glob = cls(64, 4 * world, seed=3, rank=0, world_size=1)
    mine = [s.next_batch().indices.tolist() for _ in range(5)] + list(s)[:3]
    want = [glob.next_batch().indices.tolist()[rank * 4:(rank + 1) * 4] for _ in range(8)]
    out["slices"].append(mine == want)
for s in sized:
    try:
        s.next_batch()
        out["raised"].append("")
    except ValueError as e:
        out["raised"].append(str(e))
for s in iterated:
    try:
        next(iter(s))
        out["iter_raised"].append("")
    except ValueError as e:
        out["iter_raised"].append(str(e))
try:
    importance.next_batch()
    out["importance"] = ""
except ValueError as e:
    out["importance"] = str(e)
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
