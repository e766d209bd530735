"""Lightning at any world size: the same global batches whatever the number of processes, and a
checkpoint written by one number of processes resumed by another.

Usage: python lightning_elastic.py OUT_DIR NAME DEVICES STEPS [CKPT_PATH].  DEVICES processes (gloo, CPU) train
STEPS steps of global batch 8 (per-rank batch 8 / DEVICES); writes OUT_DIR/NAME-rank{r}.json ([step, indices]
per step), OUT_DIR/NAME.pt (final weights) and, when STEPS is the save point 6, OUT_DIR/NAME.ckpt.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from sgdlab.integrations.lightning import SamplerCheckpoint
from sgdlab.sampling import SequencedReplacementSampler, rank_batch_size

OUT, NAME, DEVICES, STEPS = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
CKPT = sys.argv[5] if len(sys.argv) > 5 else None
N, GLOBAL = 64, 8


class Indexed(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 4, generator=g)
        self.y = torch.randint(0, 2, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return i, self.x[i], self.y[i]


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.seen = []

    def setup(self, stage):
        world = self.trainer.world_size
        self.sampler = SequencedReplacementSampler(N, rank_batch_size(GLOBAL, world), seed=5)

    def train_dataloader(self):
        return DataLoader(Indexed(), batch_sampler=self.sampler, num_workers=1)

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        self.seen.append([int(self.global_step), idx.tolist()])
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


pl.seed_everything(0)
module = Module()
trainer = pl.Trainer(accelerator="cpu", devices=DEVICES, strategy="ddp" if DEVICES > 1 else "auto", max_steps=STEPS,
                     use_distributed_sampler=False, callbacks=[SamplerCheckpoint()], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     num_sanity_val_steps=0, default_root_dir=OUT)
trainer.fit(module, ckpt_path=CKPT)
(OUT / f"{NAME}-rank{trainer.global_rank}.json").write_text(json.dumps(module.seen))
if STEPS == 6:
    trainer.save_checkpoint(OUT / f"{NAME}.ckpt")
if trainer.global_rank == 0:
    torch.save(module.net.state_dict(), OUT / f"{NAME}.pt")
