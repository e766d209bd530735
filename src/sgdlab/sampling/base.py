"""The batch-source protocol shared by every sampling method, and the sampler registry.

Every sampling method in sgdlab answers one question: which examples form the next
mini-batch, and with what weights?  They all implement :class:`BatchSource`; the training
engine only ever calls this protocol, so a new sampling method never touches the engine.

Distributed data parallel: a source built with ``rank``/``world_size`` draws the same
*global* batch of ``world_size * batch_size`` examples on every rank from identically seeded
state and keeps its own contiguous slice (see :func:`rank_slice`), so blind samplers need
no communication at all.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch

__all__ = [
    "Batch",
    "BatchSource",
    "SourceContext",
    "check_sizes",
    "check_state",
    "check_memory",
    "categorical",
    "MULTINOMIAL_LIMIT",
    "StateTensor",
    "resolve_rank",
    "group_initialized",
    "check_group",
    "rank_slice",
    "rank_batch_size",
    "register",
    "create",
    "names",
]


@dataclass(frozen=True)
class Batch:
    """One mini-batch: dataset ``indices`` (LongTensor[b]) and optional per-example ``weights``.

    ``weights`` is None for unweighted sampling; otherwise the training loss is
    ``mean(weights * per_example_loss)`` (e.g. the unbiased importance weights 1/(B g_i)).
    """

    indices: torch.Tensor
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.indices.numel())


@runtime_checkable
class BatchSource(Protocol):
    """Protocol of every sampling method (DESIGN.md, "the one idea: a batch source").

    - ``next_batch()`` returns the next :class:`Batch` (this rank's slice under DDP).
    - ``observe(indices, losses=None, scores=None)`` is feedback after a training step
      (per-example losses and upper-bound scores of the batch just trained on); blind
      samplers ignore it. A source that sets ``wants_scores = True`` receives scores.
    - ``state_dict()`` / ``load_state_dict()`` give an exact resume, mid-epoch included;
      states hold only tensors, numbers, strings and containers (``torch.load(weights_only=True)``).
    - ``len()`` is the number of steps per (effective) epoch.
    """

    batch_size: int

    def next_batch(self) -> Batch:
        """The next mini-batch of dataset indices (this rank's share), with weights if the method has any."""
        ...

    def observe(self, indices: torch.Tensor, losses: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> None:
        """Feedback from the training step on ``indices`` (per-example losses or scores); blind samplers
        ignore it."""
        ...

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly (generator state, position, pools)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next batch is the one the saved sampler would have drawn."""
        ...

    def __len__(self) -> int:
        """Steps per (effective) epoch."""
        ...


def check_sizes(num_samples: int, batch_size: int) -> None:
    """Raise a ValueError naming the argument when ``num_samples``/``batch_size`` are invalid."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@dataclass(frozen=True)
class StateTensor:
    """What :func:`check_state` expects of a tensor in a sampler state: ``shape`` (``-1`` for any length),
    ``kind`` (``"float"``, ``"int"``, ``"bool"`` or ``"generator"``, a CPU generator's byte state), and for
    floats whether they must be finite and non-negative."""

    shape: tuple[int, ...] = ()
    kind: str = "float"
    finite: bool = True
    nonnegative: bool = False


_GENERATOR_BYTES = torch.Generator().get_state().numel()


def _check_tensor(owner: str, key: str, v: Any, spec: StateTensor) -> None:
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{owner} state[{key!r}] must be a tensor, got {type(v).__name__}")
    if spec.kind == "generator":
        if v.dtype != torch.uint8 or v.shape != (_GENERATOR_BYTES,):
            raise ValueError(f"{owner} state[{key!r}] is not a generator state (a uint8 tensor of "
                             f"{_GENERATOR_BYTES} bytes), got {v.dtype} of shape {tuple(v.shape)}")
        return
    if len(v.shape) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, v.shape)):
        raise ValueError(f"{owner} state[{key!r}] has shape {tuple(v.shape)}, this sampler needs "
                         f"{tuple('any' if w == -1 else w for w in spec.shape)}")
    ok = {"float": v.is_floating_point(), "bool": v.dtype == torch.bool,
          "int": not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool}[spec.kind]
    if not ok:
        raise ValueError(f"{owner} state[{key!r}] must hold {spec.kind} values, got dtype {v.dtype}")
    if spec.kind == "float" and v.numel():
        if spec.finite and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{owner} state[{key!r}] holds NaN or infinite values")
        if spec.nonnegative and bool((v < 0).any()):
            raise ValueError(f"{owner} state[{key!r}] holds negative values")


def check_state(state: Any, owner: str, spec: dict[str, Any]) -> None:
    """Check a sampler state before :meth:`BatchSource.load_state_dict` uses any of it (one-line ValueError).

    ``spec`` maps each key the sampler reads to what it must be: a :class:`StateTensor`, a type (``int``,
    ``float``, ``bool``: the value must be one, tensors of one element accepted) or any other value, which
    the state must hold exactly (``num_samples``: the sampler's ``N``). A missing key names the keys the
    state does hold, which tells a state of another sampler apart (``epoch``, ``srs``, ...).
    """
    if not isinstance(state, dict):
        raise ValueError(f"{owner} state must be a dict, got {type(state).__name__}")
    missing = [k for k in spec if k not in state]
    if missing:
        kind = f" (a {state['kind']!r} sampler state)" if isinstance(state.get("kind"), str) else ""
        raise ValueError(f"{owner} state lacks {', '.join(map(repr, missing))}: not a state of this sampler{kind}; "
                         f"it holds {', '.join(map(repr, sorted(map(str, state))[:8]))}")
    for key, want in spec.items():
        v = state[key]
        if isinstance(want, StateTensor):
            _check_tensor(owner, key, v, want)
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if want in (int, float, bool):
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            good, what = {bool: (isinstance(v, bool), "a bool"), int: (number and isinstance(v, int), "an integer"),
                          float: (number and math.isfinite(v), "a finite number")}[want]
            if not good:
                raise ValueError(f"{owner} state[{key!r}] must be {what}, got {v!r}")
        elif v != want:
            raise ValueError(f"{owner} state[{key!r}]={v!r} does not match this sampler's {key}={want!r}")


MULTINOMIAL_LIMIT = 2**24  # torch.multinomial refuses more categories


def categorical(probs: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws with replacement from the categorical distribution ``probs`` (non-negative, any sum).

    ``torch.multinomial`` up to :data:`MULTINOMIAL_LIMIT` categories (so every existing stream is
    unchanged); beyond, exact inverse-CDF sampling: ``n`` uniforms in float64 located in the cumulative sum
    with ``searchsorted`` (categories of probability 0 are never drawn).
    """
    if probs.numel() <= MULTINOMIAL_LIMIT:
        return torch.multinomial(probs, n, replacement=True, generator=generator)
    cdf = torch.cumsum(probs.to(torch.float64), 0)
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"categorical: probabilities must be finite and not all zero, got a sum of {total}")
    u = torch.rand(n, dtype=torch.float64, generator=generator) * total
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.numel() - 1)


def check_memory(nbytes: int, what: str) -> None:
    """One-line ValueError, before anything is allocated, when ``what`` would need more memory than the
    machine has (``nbytes``); nothing is checked where the size of the memory is unknown."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if nbytes > have:
        raise ValueError(f"{what} would need {nbytes / 2**30:.1f} GiB of memory, more than this machine has "
                         f"({have / 2**30:.1f} GiB)")


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Return ``(rank, world_size)``: the given values, else the initialized process group, else (0, 1).

    Raises ValueError when ``world_size < 1`` or ``rank`` is outside ``[0, world_size)``.
    """
    if world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        else:
            world_size = 1
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        else:
            rank = 0
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


def group_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialized in this process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def check_group(name: str) -> bool:
    """Guard of a source that settled on a single process before any process group existed.

    Returns True while no group exists (keep checking), False once a group of one rank exists, and raises a
    one-line ValueError when the group has several ranks: every rank would otherwise draw the same batches.
    """
    if not group_initialized():
        return True
    world = torch.distributed.get_world_size()
    if world == 1:
        return False
    raise ValueError(
        f"{name} was set up for a single process before torch.distributed was initialized, but the process group "
        f"has {world} ranks, so every rank would train the same batches; build the sampler after "
        f"init_process_group (or Accelerator() / inside Trainer hooks), or pass rank= and world_size= "
        f"(rank=0, world_size=1 for a global-batch sampler)")


def rank_slice(global_indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch of ``world_size * b`` indices."""
    b = global_indices.numel() // world_size
    return global_indices[rank * b:(rank + 1) * b]


def rank_batch_size(global_batch: int, world_size: int) -> int:
    """The per-rank ``batch_size`` that keeps ``global_batch`` on ``world_size`` ranks (elastic resume).

    Every sampler's state is global (it holds the global batch, never a rank), so a state written at one
    world size loads at any other whose per-rank batch ``global_batch / world_size`` is whole and continues
    the same sequence of global batches. Raises a one-line ValueError when ``world_size`` does not divide
    ``global_batch``.
    """
    check_sizes(1, global_batch)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if global_batch % world_size:
        raise ValueError(f"the global batch of {global_batch} examples cannot be split over {world_size} "
                         f"processes (not divisible); use a number of processes that divides {global_batch}")
    return global_batch // world_size


# ---------------------------------------------------------------------------------------------
# Registry: the engine builds a batch source from a config name through these factories.
# ---------------------------------------------------------------------------------------------


@dataclass
class SourceContext:
    """What a sampler factory may use to build its source inside the engine.

    ``batch_size`` is per rank. ``model``, ``train_x``/``train_y``, ``device`` and ``loss`` let
    score-driven samplers (importance sampling) build a scorer; blind samplers ignore them.
    """

    num_samples: int
    batch_size: int
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    model: Any = None
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    device: Any = "cpu"
    loss: str = "cross_entropy"
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # normalisation for scoring
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, Callable[..., BatchSource]] = {}


def register(name: str):
    """Decorator registering ``factory(ctx: SourceContext, **options) -> BatchSource`` as ``name``."""

    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"sampler {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    """Names of the registered samplers (usable as ``sampler.name`` in configs)."""
    return sorted(_REGISTRY)


def create(name: str, ctx: SourceContext, **options) -> BatchSource:
    """Build the registered sampler ``name`` for the engine; unknown names raise ValueError."""
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown sampler {name!r}{hint}; known: {', '.join(names())}")
    return _REGISTRY[name](ctx, **options)
