"""The engine under ``torchrun``: process-group set-up and the few collectives the loop needs.

Every rank draws the same global batch and keeps its slice; rank 0 evaluates and writes (docs/engine.md,
"Distributed").
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from . import guard

__all__ = ["Dist", "setup_distributed"]


@dataclass
class Dist:
    """This process's place in the job: ``rank`` of ``world_size``; ``owned`` if :func:`setup_distributed`
    created the process group (and so destroys it at the end)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank (one all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item() > 0

    def from_main(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank (one broadcast)."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.broadcast(t, 0)
        return t.item() > 0


def setup_distributed(device_name: str) -> Dist:
    """A :class:`Dist` from torchrun's environment (``WORLD_SIZE``, ``LOCAL_RANK``), initialising the
    process group (nccl on GPU, gloo on CPU) unless one exists; a single process without ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        # a worker of torchrun: die with the launcher (even when it is SIGKILLed), never linger as an orphan
        # that keeps writing checkpoints; a SIGTERM that torchrun forwards still stops the run gracefully
        guard.die_with_parent(signal.SIGKILL)
    owned = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owned = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owned)
