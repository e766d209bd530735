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


def unwrap_model(model: Any) -> Any:
    """The eager module under ``torch.compile`` (``_orig_mod``) and data-parallel wrappers (``module``).

    A compiled module's parameters are those of the original one, so every diagnostic evaluates the
    original (eager) module: compiled graphs do not support the double backward that curvature needs,
    and the parameter names stay free of the ``_orig_mod.`` prefix.
    """
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            break
    return model


def trainable_parameters(model: nn.Module, *, name: str = "model") -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs with ``requires_grad``; ``ValueError`` if there are none."""
    params = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name} has no trainable parameters")
    return params


def select_parameters(model: nn.Module, block: Any = None) -> list[tuple[str, nn.Parameter]]:
    """The trainable ``(name, parameter)`` pairs of ``block``.

    ``block`` is ``None`` (all trainable parameters), a module prefix or parameter name (``"layer1"``
    selects ``layer1.*``), a sequence of such prefixes, or a callable ``filter(name, parameter) -> bool``.
    ``ValueError`` naming ``block`` if nothing is selected.
    """
    named = trainable_parameters(model)
    if block is None:
        return named
    if callable(block):
        chosen = [(n, p) for n, p in named if block(n, p)]
        what = getattr(block, "__name__", "the parameter filter")
    else:
        prefixes = [block] if isinstance(block, str) else list(block)
        if not prefixes or not all(isinstance(b, str) for b in prefixes):
            raise ValueError(f"block must be a module prefix, a list of prefixes or a filter, got {block!r}")
        prefixes = [b.removeprefix("_orig_mod.").rstrip(".") for b in prefixes]
        chosen = [(n, p) for n, p in named if any(b == "" or n == b or n.startswith(b + ".") for b in prefixes)]
        what = ", ".join(repr(b) for b in prefixes)
    if not chosen:
        sample = ", ".join(n for n, _ in named[:6])
        raise ValueError(f"block {what} selects no trainable parameter (names look like: {sample})")
    return chosen


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
