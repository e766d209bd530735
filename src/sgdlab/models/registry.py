"""Model registry: ``create(name, num_classes=..., **kw)`` and ``names()``, timm style.

Each architecture family lives in its own file and registers its builders with
:func:`register`, giving the input shape (without the batch dimension) the model expects,
so tools such as ``sgdlab check`` and the tests can run a forward pass of every model.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

__all__ = ["register", "create", "names", "input_shape", "shape_kwargs", "SHAPE_PARAMETERS", "ModelEntry"]

# Builder parameters that describe the input and are filled from the data's per-example shape when the
# builder declares them and the caller did not set them (see :func:`shape_kwargs`).
SHAPE_PARAMETERS = ("input_shape", "in_features", "in_channels")


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


def shape_kwargs(name: str, input_shape) -> dict:
    """The keyword arguments of model ``name``'s builder that follow from one example's ``input_shape``.

    Any builder may declare ``input_shape`` (the tuple), ``in_features`` (the product, for flattening models)
    and ``in_channels`` (the first entry of an input with 2+ dimensions); sgdlab's own small models also take
    ``length`` (1-D inputs) and ``size`` (square images).  Only the parameters the builder names are returned.
    """
    shape = tuple(int(d) for d in input_shape)
    params = inspect.signature(_entry(name).builder).parameters
    values = {"input_shape": shape, "in_features": math.prod(shape)}
    if len(shape) >= 2:
        values["in_channels"] = shape[0]
    if _entry(name).builder.__module__.startswith("sgdlab."):
        if len(shape) == 1:
            values["length"] = shape[0]
        if len(shape) == 3 and shape[1] == shape[2]:
            values["size"] = shape[1]
    return {k: v for k, v in values.items() if k in params and params[k].kind != params[k].VAR_KEYWORD}


def create(name: str, *, num_classes: int, input_shape=None, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs; kwargs go to its builder.

    With ``input_shape`` (one example's shape, e.g. ``dataset.input_shape``) the builder's input parameters
    that ``kwargs`` leaves unset are filled from it (:func:`shape_kwargs`), so e.g. ``mlp`` gets
    ``in_features=784`` for 28x28 images.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if input_shape is not None:
        kwargs = {**shape_kwargs(name, input_shape), **kwargs}
    with warnings.catch_warnings():
        # a layer of zero size (length 0, width 0) is refused below in one line, not warned about by torch
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        model = _entry(name).builder(num_classes=num_classes, **kwargs)
    empty = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        shown = ", ".join(f"{n} {s}" for n, s in empty[:3])
        raise ValueError(f"{name} would have layers without weights ({shown}): a size option is 0 or too "
                         "small for the input")
    return model


def names() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_MODELS)


def input_shape(name: str) -> tuple[int, ...]:
    """The per-example input shape the registered model ``name`` expects."""
    return _entry(name).input_shape


def default_num_classes(name: str) -> int:
    """The class count the registered model ``name`` is usually built with."""
    return _entry(name).default_num_classes
