"""Model registry: ``create(name, num_classes=..., **kw)`` and ``names()``, timm style.

Each architecture family lives in its own file and registers its builders with
:func:`register`, giving the input shape (without the batch dimension) the model expects,
so tools such as ``sgdlab check`` and the tests can run a forward pass of every model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

__all__ = ["register", "create", "names", "input_shape", "ModelEntry"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    default_num_classes: int


_MODELS: dict[str, ModelEntry] = {}


def register(name: str, *, input_shape: tuple[int, ...], num_classes: int = 10):
    """Decorator: register ``builder(num_classes, **kw) -> nn.Module`` under ``name``.

    ``input_shape`` is one example's shape (e.g. ``(3, 32, 32)`` for CIFAR, ``(40,)`` for MNIST-1D);
    ``num_classes`` is the usual class count, used by smoke tests.
    """

    def deco(builder):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelEntry(name, builder, tuple(input_shape), num_classes)
        return builder

    return deco


def _entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(names())}")
    return _MODELS[name]


def create(name: str, *, num_classes: int, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs; kwargs go to its builder."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _entry(name).builder(num_classes=num_classes, **kwargs)


def names() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_MODELS)


def input_shape(name: str) -> tuple[int, ...]:
    """The per-example input shape the registered model ``name`` expects."""
    return _entry(name).input_shape


def default_num_classes(name: str) -> int:
    """The class count the registered model ``name`` is usually built with."""
    return _entry(name).default_num_classes
