"""Accelerate under torchrun (2 CPU processes, gloo) with SRS and 2 workers: a full run, then a resume.

Usage: python -m torch.distributed.run --nproc_per_node=2 accelerate_ddp.py OUT_DIR.  Writes
OUT_DIR/{full,resumed}-rank{r}.json (indices per step) and OUT_DIR/{full,resumed}.pt (final weights).
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import TensorDataset

from sgdlab.integrations.accelerate import prepare_loader
from sgdlab.sampling import SequencedReplacementSampler

OUT = Path(sys.argv[1])
N, B, STEPS, SAVE_AT = 64, 4, 20, 12
g = torch.Generator().manual_seed(0)
DATA = TensorDataset(torch.arange(N), torch.randn(N, 4, generator=g), torch.randint(0, 2, (N,), generator=g))


def run(name, resume_from=None, stop=STEPS):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    sampler = SequencedReplacementSampler(N, B, seed=5)  # after Accelerator(): takes its rank from the group
    loader = prepare_loader(accelerator, DATA, sampler, num_workers=2)
    step, seen = 0, []
    if resume_from is not None:
        accelerator.load_state(resume_from)
        step = SAVE_AT
    while step < stop:
        for idx, x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            seen.append([step, idx.tolist()])
            step += 1
            if step == SAVE_AT and resume_from is None:
                accelerator.save_state(OUT / "state")
            if step == stop:
                break
    (OUT / f"{name}-rank{accelerator.process_index}.json").write_text(json.dumps(seen))
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).state_dict(), OUT / f"{name}.pt")
    accelerator.wait_for_everyone()


run("full")
run("resumed", resume_from=OUT / "state")
