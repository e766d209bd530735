"""Hugging Face transformers: a ``Trainer`` that trains with any sgdlab sampler and resumes exactly.

``sgdlab.integrations.transformers.Trainer(*args, sampler=S, **kwargs)`` is ``transformers.Trainer`` with the
training batches chosen by ``S``: a blind sampler (epoch-wise, replacement, sequenced-replacement; SRS paper
section 2) or a score-driven one (importance sampling, Katharopoulos & Fleuret 2018; online batch selection;
prioritized sampling), or a factory ``S(trainer) -> sampler`` called once, when the training loader is built
(the process group exists then, so the sampler takes its rank from it).

- **Loader.** The sampler is the ``batch_sampler`` of a plain ``DataLoader`` (workers, pin memory, prefetch
  and the collator as in ``TrainingArguments``), not given to ``accelerator.prepare``: Accelerate's
  ``BatchSamplerShard`` would deal whole batches to the ranks instead of letting every rank keep its slice of
  one global batch.  Each example carries its dataset index and sampling weight (``sgdlab_index``,
  ``sgdlab_weight``) past the collator; ``compute_loss`` takes them out before the model sees the batch.
- **Exact resume.** Every checkpoint ``checkpoint-N/`` also holds ``sgdlab_sampler.pt``, the sampler's
  trained-on position (:class:`~sgdlab.sampling.LoaderPosition`: read-ahead of workers accounted for, and for
  score-driven samplers the batches drawn but not yet trained).  ``train(resume_from_checkpoint=...)``
  restores it before the loader is iterated, and Trainer's own fast-forward over the first batches of the
  resumed epoch is switched off (``get_resumed_dataloader`` returns the loader unchanged): the restored
  sampler already yields the rest of the interrupted (effective) epoch, so nothing is skipped twice.  The
  sampler's ``len()`` is the Trainer's epoch, so epoch boundaries agree.  ``ignore_data_skip`` does not
  change where the sampler resumes.
- **Score-driven samplers.** ``compute_loss`` computes per-example losses from the logits,
  ``mean(weight_i * loss_i)`` (the unbiased importance weights of eq. 5, or prioritized-replay weights), and
  feeds the sampler from the same forward pass: ``observe(indices, losses=..., scores=...)`` with the
  upper-bound scores of eq. 19 (for sequences, the norm over all token logits, METHODS.md "importance
  sampling for sequences").  Per-example losses by model kind (``example_loss="auto"``): causal language
  models (``...ForCausalLM``, ``GPT2LMHeadModel``): ``"causal_lm"``, the mean over the sequence's counted
  tokens after the shift (labels ``-100`` not counted); integer labels of shape ``(N, T)``:
  ``"token_cross_entropy"``; integer labels ``(N,)``: ``"cross_entropy"``; float labels: ``"mse"`` (one
  output) or ``"bce"``.  Blind samplers keep the model's own loss unchanged.
  :meth:`Trainer.score_examples` is a ready ``score_fn`` for :class:`~sgdlab.sampling.ImportanceSampler`.
- **Accelerate loaders.** A ``get_train_dataloader`` override may return
  :func:`sgdlab.integrations.accelerate.prepare_loader`'s loader; it is checkpointed and resumed the same way.

``pip install 'sgdlab[transformers]'`` installs transformers.  Recipes: docs/frameworks.md, "Transformers".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

try:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.trainer_utils import get_last_checkpoint, seed_worker
except ImportError as e:  # pragma: no cover
    raise ImportError("sgdlab.integrations.transformers needs transformers: pip install 'sgdlab[transformers]'") from e

if not hasattr(transformers.Trainer, "get_resumed_dataloader"):  # pragma: no cover - transformers < 5
    raise ImportError("sgdlab.integrations.transformers needs transformers>=5 (Trainer.get_resumed_dataloader): "
                      "pip install 'sgdlab[transformers]'")

import torch

from ..sampling.importance import LOSSES, model_logits, model_scorer, per_example_loss, upper_bound_scores
from ..sampling.loading import WithWeights
from .accelerate import ResumableLoader

__all__ = ["INDEX_KEY", "POSITION_FILE", "WEIGHT_KEY", "Trainer"]

POSITION_FILE = "sgdlab_sampler.pt"  # the sampler's trained-on position inside checkpoint-N/
WEIGHT_KEY = "sgdlab_weight"         # batch entry: the examples' sampling weights (float32, 1 when unweighted)
INDEX_KEY = "sgdlab_index"           # batch entry: the examples' dataset indices


class _Collate:
    """The user's collator on the model inputs; the index and weight entries are stacked beside them."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, examples: list) -> Any:
        if not all(isinstance(e, Mapping) for e in examples):
            raise TypeError("sgdlab's Trainer needs dataset examples that are dicts of model inputs, got "
                            f"{type(examples[0]).__name__}")
        weights = torch.stack([e[WEIGHT_KEY] for e in examples]).float()
        indices = torch.tensor([e[INDEX_KEY] for e in examples], dtype=torch.long)
        batch = self.inner([{k: v for k, v in e.items() if k not in (WEIGHT_KEY, INDEX_KEY)} for e in examples])
        batch[WEIGHT_KEY] = weights
        batch[INDEX_KEY] = indices
        return batch


def _is_sampler(obj: Any) -> bool:
    return hasattr(obj, "next_batch") and hasattr(obj, "state_dict")


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` training with an sgdlab sampler, checkpointed and resumed exactly.

    Args:
        *args, **kwargs: as for ``transformers.Trainer``.
        sampler: an sgdlab sampler whose ``batch_size`` is ``per_device_train_batch_size``, or a factory
            ``sampler(trainer) -> sampler`` called once when the training loader is first built (after the
            process group exists; ``trainer.model`` and ``trainer.train_dataset`` are set).  ``None`` keeps
            Trainer's own sampling (and still checkpoints a ``prepare_loader`` loader returned by an override of
            ``get_train_dataloader``).
        example_loss: per-example loss of score-driven samplers: ``"auto"`` (from the model and the labels,
            see the module docstring), a name of :data:`sgdlab.sampling.importance.LOSSES`, or a callable
            ``(logits, labels) -> per-example losses``.

    The sampler in use is ``trainer.sampler`` (after training started).  See the module docstring for the
    resume guarantee and how weights and feedback reach the loss and the sampler.
    """

    def __init__(self, *args, sampler: Any = None, example_loss: str | Callable = "auto", **kwargs):
        if sampler is not None and not _is_sampler(sampler) and not callable(sampler):
            raise ValueError(f"sampler must be an sgdlab sampler or a factory trainer -> sampler, got "
                             f"{type(sampler).__name__}")
        if not callable(example_loss) and example_loss != "auto" and example_loss not in LOSSES:
            raise ValueError(f"example_loss must be 'auto', one of {LOSSES} or a callable (logits, labels) -> "
                             f"per-example losses, got {example_loss!r}")
        super().__init__(*args, **kwargs)
        self._sampler_arg = sampler
        self.sampler = sampler if _is_sampler(sampler) else None
        self.example_loss = example_loss
        self._position = None
        self._resume_dir: str | None = None
        self._scorer: Callable | None = None
        self.add_callback(_Attach(self))

    # -- sampler and loader ------------------------------------------------------------------------------

    def _build_sampler(self):
        if self.sampler is None:
            made = self._sampler_arg(self)
            if not _is_sampler(made):
                raise ValueError(f"the sampler factory must return an sgdlab sampler, got {type(made).__name__}")
            self.sampler = made
        if self.sampler.batch_size != self._train_batch_size:
            raise ValueError(f"sampler.batch_size ({self.sampler.batch_size}) must equal the per-device train batch "
                             f"size of TrainingArguments ({self._train_batch_size})")
        return self.sampler

    def _train_data(self):
        dataset = self.train_dataset
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is optional
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        return dataset, self._get_collator_with_removed_columns(self.data_collator, description="training")

    def get_train_dataloader(self):
        """The training loader over ``self.sampler`` (Trainer's own loader when ``sampler=None``); on resume the
        sampler's position is restored from the checkpoint before anything is drawn."""
        if self._sampler_arg is None:
            loader = super().get_train_dataloader()
        else:
            if self.train_dataset is None:
                raise ValueError("Trainer: training requires a train_dataset.")
            sampler = self._build_sampler()
            dataset, collate = self._train_data()
            a = self.args
            kwargs = {"collate_fn": _Collate(collate), "num_workers": a.dataloader_num_workers,
                      "pin_memory": a.dataloader_pin_memory, "persistent_workers": a.dataloader_persistent_workers,
                      "prefetch_factor": a.dataloader_prefetch_factor,
                      "multiprocessing_context": a.dataloader_multiprocessing_context,
                      "in_order": a.dataloader_in_order}
            if a.dataloader_num_workers:
                kwargs["worker_init_fn"] = _WorkerInit(a.dataloader_num_workers, a.process_index)
            loader = ResumableLoader(WithWeights(dataset, weight_key=WEIGHT_KEY, index_key=INDEX_KEY), sampler,
                                     a.device, **kwargs)
        return loader

    def _attach(self, loader) -> None:
        """Track the training loader's position; on resume restore it (before the loader is first iterated)."""
        self._position = getattr(loader, "position", None)
        if self._resume_dir is not None and self._position is not None:
            path = os.path.join(self._resume_dir, POSITION_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"resume_from_checkpoint: {self._resume_dir} has no {POSITION_FILE} (it was not "
                                 "written by sgdlab's Trainer with a sampler), so the sampler's position is unknown")
            self._position.load_state_dict(torch.load(path, weights_only=True))

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """The loader unchanged when its sampler was restored from the checkpoint (it already yields the rest of
        the interrupted epoch); Trainer's skipping otherwise."""
        if self._position is not None and getattr(dataloader, "position", None) is self._position:
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """``transformers.Trainer.train``; a resumed run also restores the sampler's position."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: Trainer's error
        self._resume_dir = resume_from_checkpoint if isinstance(resume_from_checkpoint, str | os.PathLike) else None
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self._resume_dir = None

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._position is not None and self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self._position.state_dict(), os.path.join(output_dir, POSITION_FILE))

    # -- loss and feedback -------------------------------------------------------------------------------

    def _loss_kind(self, labels: torch.Tensor) -> str | Callable:
        if self.example_loss != "auto":
            return self.example_loss
        model = self.accelerator.unwrap_model(self.model)
        if type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return "causal_lm"
        if labels.is_floating_point():
            return "mse" if getattr(getattr(model, "config", None), "num_labels", 0) == 1 else "bce"
        return "token_cross_entropy" if labels.ndim >= 2 else "cross_entropy"

    def _scored(self) -> bool:
        s = self.sampler
        return s is not None and (getattr(s, "wants_scores", False) or getattr(s, "wants_losses", False)
                                  or not hasattr(s, "_start_pass"))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Trainer's loss for blind samplers; ``mean(weight_i * loss_i)`` with the sampler fed from the same
        forward for score-driven ones (see the module docstring)."""
        if INDEX_KEY not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        weights, indices = inputs.pop(WEIGHT_KEY), inputs.pop(INDEX_KEY)
        if not self._scored():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = model_logits(outputs).float()
        kind = self._loss_kind(labels)
        if kind == "mse" and labels.shape != logits.shape:
            labels = labels.reshape(logits.shape)
        losses = per_example_loss(logits, labels, kind)
        loss = (weights.to(losses) * losses).mean()
        sampler = self.sampler
        if getattr(sampler, "wants_scores", False):
            sampler.observe(indices, losses=losses.detach(), scores=upper_bound_scores(logits.detach(), labels, kind))
        elif getattr(sampler, "wants_losses", False):
            sampler.observe(indices, losses=losses.detach())
        if self._trainer_skips_ga_division(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def _trainer_skips_ga_division(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` takes the loss as already scaled for gradient accumulation (its rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # -- scoring -----------------------------------------------------------------------------------------

    def score_examples(self, indices: torch.Tensor) -> torch.Tensor:
        """Upper-bound importance scores of training examples ``indices`` (eq. 19; for sequences the norm over
        all token logits), from one no-grad forward of the model in eval mode: a ``score_fn`` for
        :class:`~sgdlab.sampling.ImportanceSampler`, e.g. ``sampler=lambda t: ImportanceSampler(len(data), 8,
        presample=32, score_fn=t.score_examples)``."""
        if self._scorer is None:
            dataset, collate = self._train_data()

            def examples(ids: list[int]) -> list:
                get = getattr(dataset, "__getitems__", None)
                return get(ids) if get is not None else [dataset[i] for i in ids]

            probe = collate(examples([0]))
            if "labels" not in probe:
                raise ValueError("score_examples needs training examples with 'labels'")
            kind = self._loss_kind(probe["labels"])

            def fetch(idx: torch.Tensor):
                batch = self._prepare_inputs(collate(examples(idx.tolist())))
                if kind == "mse" and batch["labels"].ndim == 1:
                    batch["labels"] = batch["labels"][:, None]
                return batch

            self._scorer = model_scorer(self.model, fetch, loss=kind)
        return self._scorer(indices)


class _Attach(transformers.TrainerCallback):
    """Hands the training loader to :meth:`Trainer._attach` at ``on_train_begin``: after the loader is built
    (by Trainer or by an override of ``get_train_dataloader``) and the checkpoint is loaded, before the first
    batch is drawn."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.trainer._attach(train_dataloader)


class _WorkerInit:
    """Trainer's worker seeding (``seed_worker``) as a picklable callable."""

    def __init__(self, num_workers: int, rank: int):
        self.num_workers, self.rank = num_workers, rank

    def __call__(self, worker_id: int) -> None:
        seed_worker(worker_id, self.num_workers, self.rank)
