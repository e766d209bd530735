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

:class:`MonitorCallback` runs :mod:`sgdlab.monitors` (sharpness, noise scale, norms, ...) every ``k``
optimizer steps and logs their scalars to the trainer's loggers (TensorBoard, MLflow, CSV, ...).
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

__all__ = ["SamplerCheckpoint", "MonitorCallback"]


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


class MonitorCallback(pl.Callback):
    """Run :mod:`sgdlab.monitors` inside ``Trainer.fit`` and log their scalars to every trainer logger.

    After each optimizer step (``on_train_batch_end``; ``step`` is ``trainer.global_step``) every monitor
    due at that step measures the LightningModule with ``loss_fn(pl_module(x), y)`` on its probe batch, or
    on the training batch (``batch[0], batch[1]``; ``batch_transform(batch) -> (x, y)`` for other
    layouts), and the scalars go to ``logger.log_metrics(scalars, step)`` of each of ``trainer.loggers``.
    ``before_step`` runs in ``on_train_batch_start`` (the update-to-weight ratio of
    :class:`~sgdlab.monitors.Norms`). The latest scalars are also kept in :attr:`last`; all of them in
    :attr:`history` (``[(step, scalars), ...]``). With gradient accumulation a "step" is an optimizer step.

    Args:
        monitors: :class:`~sgdlab.monitors.Monitor` instances.
        loss_fn: the mean loss of a batch, ``loss_fn(outputs, y)``.
        batch_transform: maps a training batch to ``(x, y)``.
    """

    def __init__(self, monitors, loss_fn, *, batch_transform=None):
        super().__init__()
        from ..monitors import MonitorSet

        self.monitors = MonitorSet(monitors, loss_fn=loss_fn)
        self.monitors.refuse_background("the Lightning callback")
        self.batch_transform = batch_transform
        self.last: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self._step_before: int | None = None

    def _xy(self, batch):
        if self.batch_transform is not None:
            return self.batch_transform(batch)
        return batch[0], batch[1]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step
        self.monitors.before_step(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step_before or not self.monitors.due(step):
            return  # no optimizer step was taken (accumulation), or nothing is due
        opt = trainer.optimizers[0] if trainer.optimizers else None
        scalars = self.monitors.after_step(pl_module, self._xy(batch), opt, step)
        if not scalars:
            return
        self.last = scalars
        self.history.append((step, scalars))
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def state_dict(self) -> dict:
        return {"monitors": self.monitors.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.monitors.load_state_dict(state_dict.get("monitors", {}))
