"""Hugging Face Accelerate: a loader that keeps the sampler's own DDP slicing and resumes exactly.

``accelerator.prepare(loader)`` wraps a batch sampler in Accelerate's ``BatchSamplerShard``, which deals
*whole* batches to the ranks in turn: with an sgdlab sampler that is two separate draws per step instead of
one global batch (or, for a sampler already sliced per rank, half of every global batch thrown away), and
its loader reads one batch ahead, so the sampler's own state is one step ahead at ``save_state``.

:func:`prepare_loader` avoids both: the sampler (built after ``Accelerator()``, so it takes its rank from
the process group) gives every rank its slice of one global batch, the loader only moves batches to
``accelerator.device``, counts the batches handed to the training loop (a
:class:`~sgdlab.sampling.LoaderPosition`) and is registered for checkpointing, so
``accelerator.save_state`` / ``load_state`` resume at the next untrained batch, workers included.

Prepare only the model and the optimizer: ``model, opt = accelerator.prepare(model, opt)``.
"""

from __future__ import annotations

try:
    import accelerate
    from accelerate.utils import send_to_device
except ImportError as e:  # pragma: no cover
    raise ImportError("sgdlab.integrations.accelerate needs Accelerate: pip install 'sgdlab[accelerate]'") from e

import torch

from ..sampling.position import LoaderPosition

__all__ = ["ResumableLoader", "prepare_loader"]


class ResumableLoader:
    """Iterable over ``DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)``, batches on ``device``.

    A batch counts as trained once it has been handed to the loop, so save state after the optimizer step.
    Inside ``transformers.Trainer`` use :class:`sgdlab.integrations.transformers.Trainer`, which checkpoints this
    loader's position with its own checkpoints and does not skip batches a second time on resume.
    ``state_dict``/``load_state_dict`` make it a checkpointable object for ``register_for_checkpointing``.
    """

    def __init__(self, dataset, sampler, device, **loader_kwargs):
        if "batch_size" in loader_kwargs or "sampler" in loader_kwargs or "shuffle" in loader_kwargs:
            raise ValueError("prepare_loader: the sgdlab sampler chooses the batches; do not pass batch_size, "
                             "sampler or shuffle")
        self.sampler = sampler
        self.device = device
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
        self.position = LoaderPosition(sampler)

    @property
    def dataset(self):
        """The dataset (``transformers.Trainer`` reads ``loader.dataset``)."""
        return self.loader.dataset

    @property
    def batch_sampler(self):
        """The sgdlab sampler choosing the batches."""
        return self.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.position.advance()
            yield send_to_device(batch, self.device)

    def state_dict(self) -> dict:
        """The sampler's position at the last batch handed out (see :class:`~sgdlab.sampling.LoaderPosition`)."""
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch the saved loop received (call before iterating)."""
        self.position.load_state_dict(state)


def prepare_loader(accelerator: "accelerate.Accelerator", dataset, sampler, **loader_kwargs) -> ResumableLoader:
    """A :class:`ResumableLoader` for ``accelerator``'s device, registered for ``save_state``/``load_state``.

    ``sampler`` must be an sgdlab sampler (blind or score-driven) sliced for this process group (built after ``Accelerator()``
    with the default ``rank``/``world_size``); a ValueError names the mismatch otherwise.
    """
    world = accelerator.num_processes
    if (sampler.rank, sampler.world_size) != (accelerator.process_index, world):
        raise ValueError(f"prepare_loader: the sampler is set up as rank {sampler.rank} of {sampler.world_size}, "
                         f"but this is process {accelerator.process_index} of {world}; build it after "
                         "Accelerator() without rank/world_size")
    loader = ResumableLoader(dataset, sampler, accelerator.device, **loader_kwargs)
    accelerator.register_for_checkpointing(loader)
    return loader
