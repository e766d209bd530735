"""sgdlab's transformers Trainer under torchrun (2 CPU processes, gloo), SRS, 2 workers: full run, stop, resume.

Usage: python -m torch.distributed.run --nproc_per_node=2 hf_ddp.py OUT_DIR.  Each rank writes
OUT_DIR/{full,stopped,resumed}-rank{r}.json (its dataset indices per step); rank 0 writes OUT_DIR/{full,resumed}.pt
(final weights).  Per-device batch 2: the global batch of 4 is the one-process run's batch.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _hf_tiny import N, checkpoint, run

from sgdlab.sampling import SequencedReplacementSampler

OUT = Path(sys.argv[1])


def factory(trainer):
    return SequencedReplacementSampler(N, 2, seed=3)  # called once the process group exists: rank's slice


rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
for name, kw in (("full", {}), ("stopped", {"stop_at": 24}),
                 ("resumed", {"resume": checkpoint(OUT / "stopped", 24)})):
    d = OUT / ("stopped" if name != "full" else "full")
    seen, _, params, trainer = run(d, factory, workers=2, batch_size=2, **kw)
    r = trainer.args.process_index
    (OUT / f"{name}-rank{r}.json").write_text(json.dumps(seen))
    if r == 0 and name != "stopped":
        torch.save(params, OUT / f"{name}.pt")
