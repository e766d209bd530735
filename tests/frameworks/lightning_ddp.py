"""Lightning DDP (2 CPU processes, gloo) with SRS and 2 workers: a full run, then a resume mid-epoch.

Usage: python lightning_ddp.py OUT_DIR.  Writes OUT_DIR/{full,resumed}-rank{r}.json (indices per step) and
OUT_DIR/{full,resumed}.pt (final weights, rank 0).
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from sgdlab.integrations.lightning import SamplerCheckpoint
from sgdlab.sampling import SequencedReplacementSampler

OUT = Path(sys.argv[1])
N, B = 64, 4  # per rank: global batch 8, 8 steps per effective epoch


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
        self.sampler = SequencedReplacementSampler(N, B, seed=5)  # the process group exists here

    def train_dataloader(self):
        return DataLoader(Indexed(), batch_sampler=self.sampler, num_workers=2, persistent_workers=False)

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        self.seen.append([int(self.global_step), idx.tolist()])
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(name, ckpt_path=None):
    pl.seed_everything(0)
    module = Module()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=20, use_distributed_sampler=False,
                         callbacks=[SamplerCheckpoint(),
                                    pl.callbacks.ModelCheckpoint(OUT / "ckpt", every_n_train_steps=6, save_top_k=-1,
                                                                 filename="{step}")],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=OUT)
    trainer.fit(module, ckpt_path=ckpt_path)
    rank = trainer.global_rank
    (OUT / f"{name}-rank{rank}.json").write_text(json.dumps(module.seen))
    if rank == 0:
        torch.save(module.net.state_dict(), OUT / f"{name}.pt")


fit("full")
fit("resumed", ckpt_path=str(OUT / "ckpt" / "step=12.ckpt"))
