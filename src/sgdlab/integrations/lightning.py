"""Lightning: checkpoint an sgdlab sampler at the last trained batch, exactly, with DataLoader workers.

Recipe (see docs/frameworks.md):

- ``Trainer(use_distributed_sampler=False, callbacks=[SamplerCheckpoint()])``: sgdlab samplers shard
  themselves (every rank keeps its slice of one global batch, SRS paper section 2); Lightning's default
  would try to wrap them in a ``DistributedSampler``.
- Build the sampler in ``LightningModule.setup()`` (or ``__init__``) as ``self.sampler`` and return
  ``DataLoader(dataset, batch_sampler=self.sampler, num_workers=...)`` from ``train_dataloader()``.
  In ``setup()`` the process group exists, so the sampler takes its rank from it.

Why a callback: with workers the loader has drawn ``num_workers * prefetch_factor`` batches ahead of
training (and Lightning's fetcher one more) when a checkpoint is written, and Lightning restores
callbacks *before* it calls ``train_dataloader()``.  :class:`SamplerCheckpoint` therefore saves a
:class:`~sgdlab.sampling.LoaderPosition` (the sampler's state at the start of the pass + the number of
batches trained since) and restores it into the sampler before the loader is iterated; the resumed
loader then yields the rest of the interrupted epoch, which is what Lightning's restored batch counter
expects.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("sgdlab.integrations.lightning needs Lightning: pip install 'sgdlab[lightning]'") from e

from ..sampling.position import LoaderPosition

__all__ = ["SamplerCheckpoint"]


class SamplerCheckpoint(pl.Callback):
    """Save and restore an sgdlab blind sampler's trained-on position with Lightning checkpoints.

    Args:
        sampler: the sampler; by default ``getattr(pl_module, attribute)`` (or the datamodule's), looked up
            when it is first needed, so it may be built in ``setup()``.
        attribute: attribute name of the sampler on the LightningModule or LightningDataModule.
        key: the checkpoint entry holding the position (``{"origin": ..., "consumed": ...}``).
    """

    def __init__(self, sampler=None, *, attribute: str = "sampler", key: str = "sgdlab_sampler"):
        super().__init__()
        self.sampler, self.attribute, self.key = sampler, attribute, key
        self._position: LoaderPosition | None = None

    def _find(self, trainer, pl_module) -> LoaderPosition:
        sampler = self.sampler
        if sampler is None:
            sampler = getattr(pl_module, self.attribute, None)
        if sampler is None and getattr(trainer, "datamodule", None) is not None:
            sampler = getattr(trainer.datamodule, self.attribute, None)
        if sampler is None:
            raise RuntimeError(f"SamplerCheckpoint: no sampler; build it as self.{self.attribute} in the "
                               f"LightningModule's setup() or __init__, or pass SamplerCheckpoint(sampler)")
        if self._position is None or self._position.sampler is not sampler:
            self._position = LoaderPosition(sampler)
        return self._position

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._find(trainer, pl_module).advance()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.key] = self._find(trainer, pl_module).state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.key not in checkpoint:
            raise RuntimeError(f"SamplerCheckpoint: the checkpoint has no {self.key!r} entry (it was written "
                               "without this callback), so the sampler's position cannot be restored")
        self._find(trainer, pl_module).load_state_dict(checkpoint[self.key])
