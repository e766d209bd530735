"""Shared evaluation discipline for :mod:`sgdlab.analysis`.

Every diagnostic takes ``data`` as an ``(x, y)`` pair of tensors or an iterable of such batches, and
``loss_fn(logits, y)`` returning the *mean* loss of a batch (like ``torch.nn.functional.cross_entropy``).
Quantities are averages over examples: a batch of ``n_b`` examples out of ``N`` is weighted by
``n_b / N``, so the result does not depend on how the data are batched. The model is evaluated in eval
mode (BatchNorm uses its running statistics, dropout is off) and its previous mode is restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def as_batches(data: Any, *, device: torch.device | None = None, name: str = "data") -> Batches:
    """Normalise ``data`` to a non-empty list of ``(x, y)`` batches (moved to ``device`` if given).

    Raises ``ValueError`` naming ``name`` if the data are empty or not pairs of tensors.
    """
    if data is None:
        raise ValueError(f"{name}: expected an (x, y) pair of tensors or an iterable of batches, got None")
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        pairs: Iterable = [tuple(data)]
    else:
        pairs = data
    out: Batches = []
    try:
        iterator = iter(pairs)
    except TypeError as exc:
        raise ValueError(f"{name}: expected an (x, y) pair of tensors or an iterable of batches") from exc
    for item in iterator:
        if not (isinstance(item, tuple | list) and len(item) >= 2):
            raise ValueError(
                f"{name}: every batch must be an (x, y) pair of tensors, got {type(item).__name__}"
            )
        x, y = item[0], item[1]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError(f"{name}: every batch must be an (x, y) pair of tensors")
        if x.ndim == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{name}: x and y must have the same number of examples (got {tuple(x.shape)} "
                f"and {tuple(y.shape)})"
            )
        if x.shape[0] == 0:
            continue
        if device is not None:
            x, y = x.to(device), y.to(device)
        out.append((x, y))
    if not out:
        raise ValueError(f"{name} is empty: no examples to evaluate on")
    return out


def num_examples(batches: Batches) -> int:
    """Total number of examples in ``batches``."""
    return sum(int(x.shape[0]) for x, _ in batches)


def trainable_parameters(model: nn.Module, *, name: str = "model") -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs with ``requires_grad``; ``ValueError`` if there are none."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name} has no trainable parameters")
    return params


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter or buffer (CPU for an empty module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the duration of the block and restore every submodule's mode."""
    saved = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for modes in saved:
            for m, training in modes:
                m.training = training


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (views of ``vector``)."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[i : i + n].view_as(t))
        i += n
    if i != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the parameters have {i}")
    return out


def check_loss(loss: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` must return a scalar (the mean loss of the batch)."""
    if loss.ndim != 0:
        raise ValueError(
            f"loss_fn must return the mean loss of a batch (a scalar), got shape {tuple(loss.shape)}"
        )
    return loss
