"""The engine under ``torchrun``: process-group set-up and the few collectives the loop needs.

Every rank draws the same global batch and keeps its slice; rank 0 evaluates and writes (docs/engine.md,
"Distributed"). ``sync_bn: true`` synchronises BatchNorm statistics over the ranks (docs/engine.md,
"Elastic runs").
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from . import guard

__all__ = ["Dist", "setup_distributed", "GlooSyncBatchNorm", "convert_sync_batchnorm"]


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


class GlooSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, for CPU process groups (gloo).

    ``torch.nn.SyncBatchNorm`` runs on GPUs only. In training mode under a process group of several ranks,
    the per-channel mean is ``sum(x) / n`` and the (biased) variance ``sum((x - mean)^2) / n`` with sums and
    counts all-reduced over the ranks (two differentiable all-reduces, so the gradients flow through the
    global statistics as in one process); running statistics use the unbiased variance ``n / (n - 1)``,
    as ``torch.nn.BatchNorm*d`` does. Otherwise (evaluation, one process) it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlooSyncBatchNorm expects (N, C, ...) inputs, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() // max(c, 1)])])
        total = all_reduce(local)
        n = total[c]
        mean = total[:c] / n
        var = all_reduce((x - mean.view(shape)).square().sum(dims)) / n
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp(min=1)), alpha=m)
        return y


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` with every BatchNorm layer synchronised over the process group (``sync_bn: true``):
    ``torch.nn.SyncBatchNorm`` on GPUs, :class:`GlooSyncBatchNorm` elsewhere. Parameters and running
    statistics are kept."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (torch.nn.SyncBatchNorm, GlooSyncBatchNorm)):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
