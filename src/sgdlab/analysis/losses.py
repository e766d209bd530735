"""Losses for Hugging Face models and dict batches in :mod:`sgdlab.analysis`.

The diagnostics average over *examples* (a batch of ``n_b`` out of ``N`` is weighted by ``n_b / N``), so a
``loss_fn`` must return the mean over the examples of its batch. For sequence classification that is
``torch.nn.functional.cross_entropy`` on the logits. For causal language modelling an example is a
sequence, and its loss is the mean over its *counted* tokens of the next-token cross-entropy (labels
shifted by one position, positions labelled ``ignore_index`` not counted), as in shared/METHODS.md
("importance sampling for sequences"):

    L_i = (1 / n_i) sum_{t counted} CE(z_{i,t}, y_{i,t+1}),        loss of a batch = mean_i L_i

This is not the loss a Hugging Face model returns for ``labels=...``: that one is the mean over all
counted tokens of the batch, which weights a sequence by its length and so depends on how sequences are
grouped into batches. The two agree when every sequence of the data has the same number of counted
tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "hf_loss"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Mean over sequences of each sequence's mean next-token cross-entropy over its counted tokens.

    ``logits`` ``(B, T, V)`` and ``labels`` ``(B, T)`` are aligned as a Hugging Face causal LM takes them:
    position ``t`` predicts ``labels[:, t + 1]`` (the shift is done here); labels equal to
    ``ignore_index`` are not counted. A sequence with no counted token has loss 0 and still counts as an
    example. Returns a scalar (module docstring for the formula).
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"causal_lm_loss: expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    z = logits[:, :-1, :]
    target = labels[:, 1:]
    per_token = F.cross_entropy(z.reshape(-1, z.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                                reduction="none").view(target.shape)
    counted = (target != ignore_index).sum(1)
    per_sequence = per_token.sum(1) / counted.clamp(min=1).to(per_token.dtype)
    return per_sequence.mean()


def _single_label_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def _regression_mse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))


def hf_loss(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-example-mean ``loss_fn`` matching a Hugging Face model's task.

    Causal language models (``*ForCausalLM``, ``*LMHeadModel``): :func:`causal_lm_loss`. Sequence
    classification (``*ForSequenceClassification``): cross-entropy, or the mean squared error when
    ``config.problem_type == "regression"`` or ``num_labels == 1`` (as Hugging Face decides). Other
    models: ``ValueError`` (pass a ``loss_fn`` yourself).
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return causal_lm_loss
    if name.endswith("ForSequenceClassification") and config is not None:
        problem = getattr(config, "problem_type", None)
        if problem == "multi_label_classification":
            raise ValueError(f"hf_loss: {name} is set up for multi-label classification; "
                             "pass a loss_fn yourself")
        if problem == "regression" or getattr(config, "num_labels", None) == 1:
            return _regression_mse
        return _single_label_ce
    raise ValueError(
        f"hf_loss: no loss for {name} (causal LM and sequence classification models only); pass a loss_fn"
    )
