"""The loss-transform protocol and its registry.

A loss transform maps the per-example losses of a mini-batch (already multiplied by any
sampling weights) to new per-example losses; the engine then averages them. Random Gradient
(a random factor on the data loss) and selective backprop (keep the highest losses) are
loss transforms. They act on the data loss only: weight decay stays in the optimizer.
"""

from __future__ import annotations

import difflib
from typing import Callable, Protocol, runtime_checkable

import torch

__all__ = ["LossTransform", "register_loss_transform", "create_loss_transform", "loss_transform_names"]


@runtime_checkable
class LossTransform(Protocol):
    """``transform(losses, step=..., epoch=...) -> losses`` plus exact-resume state and metrics.

    ``losses`` is the per-example loss vector of the batch (or a scalar); the result has the
    same shape. ``metrics()`` returns the numbers to log for the last call (e.g. the factor).
    """

    def __call__(self, losses: torch.Tensor, *, step: int | None = None,
                 epoch: float | None = None) -> torch.Tensor:
        """The transformed per-example losses of this step (same shape as ``losses``)."""
        ...

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (e.g. the generator state)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""
        ...

    def metrics(self) -> dict[str, float]:
        """Scalars to log for the last step (may be empty)."""
        ...


_TRANSFORMS: dict[str, Callable[..., LossTransform]] = {}


def register_loss_transform(name: str):
    """Decorator registering ``factory(*, seed: int, **options) -> LossTransform`` as config key ``name``."""

    def deco(factory):
        if name in _TRANSFORMS:
            raise ValueError(f"loss transform {name!r} is already registered")
        _TRANSFORMS[name] = factory
        return factory

    return deco


def loss_transform_names() -> list[str]:
    """Config keys under ``loss:`` that name a registered loss transform."""
    return sorted(_TRANSFORMS)


def create_loss_transform(name: str, *, seed: int, **options) -> LossTransform:
    """Build the registered loss transform ``name``; unknown names raise ValueError."""
    if name not in _TRANSFORMS:
        close = difflib.get_close_matches(name, list(_TRANSFORMS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown loss transform {name!r}{hint}; known: {', '.join(loss_transform_names())}")
    return _TRANSFORMS[name](seed=seed, **options)
