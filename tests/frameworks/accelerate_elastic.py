"""Accelerate at another world size: ``save_state`` under one number of processes, ``load_state`` under another.

Usage: [torchrun --nproc_per_node=P] accelerate_elastic.py OUT_DIR NAME STEPS [STATE_DIR].  Trains STEPS
steps of global batch 8 (SRS, per-process batch 8 / P) from scratch, or from STATE_DIR (saved at step 6);
writes OUT_DIR/NAME-rank{r}.json ([step, indices] per step), OUT_DIR/NAME.pt (final weights) and, at step 6
of a run from scratch, the state OUT_DIR/NAME-state.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import TensorDataset

from sgdlab.integrations.accelerate import prepare_loader
from sgdlab.sampling import SequencedReplacementSampler, rank_batch_size

OUT, NAME, STEPS = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
RESUME = sys.argv[4] if len(sys.argv) > 4 else None
N, GLOBAL, SAVE_AT = 64, 8, 6
g = torch.Generator().manual_seed(0)
DATA = TensorDataset(torch.arange(N), torch.randn(N, 4, generator=g), torch.randint(0, 2, (N,), generator=g))

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model, opt = accelerator.prepare(model, opt)
sampler = SequencedReplacementSampler(N, rank_batch_size(GLOBAL, accelerator.num_processes), seed=5)
loader = prepare_loader(accelerator, DATA, sampler, num_workers=1)
step, seen = 0, []
if RESUME is not None:
    accelerator.load_state(RESUME)
    step = SAVE_AT
while step < STEPS:
    for idx, x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        seen.append([step, idx.tolist()])
        step += 1
        if step == SAVE_AT and RESUME is None:
            accelerator.save_state(OUT / f"{NAME}-state")
        if step == STEPS:
            break
(OUT / f"{NAME}-rank{accelerator.process_index}.json").write_text(json.dumps(seen))
if accelerator.is_main_process:
    torch.save(accelerator.unwrap_model(model).state_dict(), OUT / f"{NAME}.pt")
accelerator.wait_for_everyone()
