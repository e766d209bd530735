"""Hugging Face ``transformers``: run :mod:`sgdlab.monitors` inside ``Trainer.train`` and log the scalars.

``transformers`` callbacks see the model and the optimizer but not the batch, so the monitors measure a
fixed probe batch ``(x, y)`` (``probe=`` of each monitor, or ``probe=`` here for all that have none),
with ``loss_fn(model(x), y)``: for a Hugging Face model ``model(input_ids)`` returns a ``ModelOutput``,
so a language-model loss is e.g. ``lambda out, y: F.cross_entropy(out.logits.flatten(0, 1),
y.flatten())``. :class:`~sgdlab.monitors.ImportanceMonitor` needs a model that returns logits.

``MonitorCallback(...).attach(trainer)`` adds the callback and lets it log through ``trainer.log``, so the
scalars reach ``state.log_history`` and every ``report_to`` integration (TensorBoard, MLflow, ...). A
callback passed as ``Trainer(callbacks=[...])`` without ``attach`` records into ``state.log_history``
only.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover
    raise ImportError("sgdlab.integrations.monitors_hf needs transformers: pip install 'sgdlab[transformers]'") from e

__all__ = ["MonitorCallback"]


class MonitorCallback(TrainerCallback):
    """Every monitor due after an optimizer step (``state.global_step``) measures the model on its probe.

    Args:
        monitors: :class:`~sgdlab.monitors.Monitor` instances.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch.
        probe: ``(x, y)`` given to every monitor that has no probe of its own.
    """

    def __init__(self, monitors, loss_fn, *, probe=None):
        from ..monitors import MonitorSet
        from ..monitors.base import _check_probe

        probe = _check_probe(probe)
        monitors = list(monitors)
        for m in monitors:
            if m.probe is None:
                if probe is None:
                    raise ValueError(f"probe: {type(m).__name__} has no probe batch and transformers callbacks "
                                     "do not see the training batch; pass probe=(x, y)")
                m.probe = probe
        self.monitors = MonitorSet(monitors, loss_fn=loss_fn)
        self.monitors.refuse_background("the transformers callback")
        self.trainer = None
        self.last: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []

    def attach(self, trainer) -> MonitorCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log``; returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.monitors.before_step(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if not self.monitors.due(step):
            return
        scalars = self.monitors.after_step(model, None, optimizer, step)
        if not scalars:
            return
        self.last = scalars
        self.history.append((step, scalars))
        if self.trainer is not None:
            self.trainer.log(dict(scalars))
        else:
            state.log_history.append({**scalars, "step": step})
