"""Sequenced-replacement sampling (SRS).

Implements section 2 and Fig. 1 of "Sequenced-Replacement Sampling for Deep Learning" (ICLR 2019
submission).  The sampler keeps a *pool* of N slots that initially holds every example once, and a
cyclic *sequence* over the N examples with a cursor, fixed for the whole run.  Each step:

1. choose B distinct slots uniformly at random -- the mini-batch is their contents;
2. refill those B slots with the next B examples of the sequence (the cursor advances by B and wraps).

Unlike batched replacement sampling, the drawn examples are not put back: fresh examples from the
sequence take their place, so recently drawn examples are less likely to be drawn again soon and every
example enters the pool once per pass over the sequence.  The pool may hold an example several times,
or not at all, at any moment.  Fig. 1 (N=5, B=2, identity sequence, 1-based labels): pool {1,2,3,4,5};
draw {2,5}; refill with 1,2 -> {1,1,2,3,4}; draw {1,1}; refill with 3,4 -> {2,3,3,4,4}.

There are no epochs.  The paper's *effective epoch* (eq. 8) is steps x B / N.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..seeding import torch_seed
from .base import Batch, register
from .blind import _BlindSampler, _check_seed, _check_state, _DistinctSlots, _options, _state_int

__all__ = ["SequencedReplacementSampler"]

_ORDERS = ("random", "identity")


class SequencedReplacementSampler(_BlindSampler):
    """Sequenced-replacement sampling (SRS paper, section 2 and Fig. 1; effective epoch eq. 8).

    Parameters
    ----------
    num_samples:
        N, the dataset size (and the number of pool slots).
    batch_size:
        B per rank; the global batch is ``world_size * batch_size`` slots per step.
    seed:
        Seeds the private generator that draws the sequence (``order="random"``) and the slots.
    order:
        ``"random"`` -- the sequence is a seeded random permutation drawn once; ``"identity"`` --
        examples 0, 1, ..., N-1 in order, as in the paper's Fig. 1.
    rank, world_size:
        Data parallelism: every rank runs the same pool with the same draws and keeps the ``rank``-th
        contiguous share of the global batch (no communication).  Default: the initialized process
        group -- at construction, or at first use if none exists yet; a sampler that had to settle on one
        process raises instead of duplicating batches once a multi-rank group appears.

    Each step costs O(B) work independent of N (a block of slot draws is generated every few hundred
    steps, see :class:`~sgdlab.sampling.blind._DistinctSlots`); the pool and the sequence take O(N)
    memory once.  ``len()`` is ``round(N / global_batch)`` (at least 1), the number of steps in an
    effective epoch, matching the paper's n_B = round(N / B); each ``for batch in sampler`` pass yields
    the rest of the current effective epoch as ``list[int]`` batches (all ``len()`` of them from a
    boundary, the remainder after a mid-epoch resume) and the next pass continues the same stream.  :attr:`effective_epoch`
    is the exact ratio steps x global batch / N.  ``set_epoch`` is accepted for compatibility with
    ``DistributedSampler``-style loops and has no effect: SRS has no epochs.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, order: str = "random",
                 rank: int | None = None, world_size: int | None = None):
        self._init_ranks(num_samples, batch_size, rank, world_size)
        self.seed = _check_seed(seed)
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(repr, _ORDERS))}, got {order!r}")
        self.order = order
        self._cursor = 0
        self._steps = 0
        if not self._pending:
            self._materialize()

    def _build(self) -> None:
        n = self.num_samples
        self._len = max(1, math.floor(n / self.global_batch + 0.5))
        self._gen = torch.Generator()
        self._gen.manual_seed(torch_seed(self.seed))
        if self.order == "random":
            sequence = torch.randperm(n, generator=self._gen)
        else:
            sequence = torch.arange(n)
        # The sequence followed by its first G entries: every refill window is one contiguous slice.
        self._seq_ext = torch.cat([sequence, sequence[: self.global_batch]]).numpy()
        self._pool = sequence.numpy().copy()  # the pool initially holds every example once
        self._draws = _DistinctSlots(n, self.global_batch, self._gen)
        self._lo = self.rank * self.batch_size
        self._hi = self._lo + self.batch_size

    def _init_kwargs(self) -> dict:
        return {"seed": self.seed, "order": self.order}

    # -- the algorithm ------------------------------------------------------------------------------

    def _step(self, slots) -> np.ndarray:
        """One SRS step on the given distinct global slot positions; returns the global batch.

        The batch is the pool's contents at ``slots``; those slots are then refilled, in the order
        given, with the next ``len(slots)`` examples of the sequence.  ``next_batch`` calls this with
        uniformly drawn slots; tests call it with chosen slots to walk the paper's Fig. 1.
        """
        if not isinstance(slots, np.ndarray):
            if self._pending:
                self._materialize()
            g = self._global_batch
            slots = np.asarray(slots, dtype=np.int64)
            if slots.shape != (g,) or len(np.unique(slots)) != g or slots.min() < 0 \
                    or slots.max() >= self.num_samples:
                raise ValueError(f"slots must be {g} distinct positions in [0, {self.num_samples})")
        g = self._global_batch
        pool = self._pool
        batch = pool[slots]
        c = self._cursor
        pool[slots] = self._seq_ext[c:c + g]
        c += g
        self._cursor = c - self.num_samples if c >= self.num_samples else c
        self._steps += 1
        return batch

    def _next_indices(self) -> np.ndarray:
        batch = self._step(self._draws.next())
        return batch[self._lo:self._hi] if self._world_size > 1 else batch

    def next_batch(self) -> Batch:
        """This rank's share of the next SRS global batch (the global batch may repeat an example)."""
        if self._unchecked:
            self._first_draw()
        batch = self._step(self._draws.next())
        if self._world_size > 1:
            batch = batch[self._lo:self._hi]
        return Batch(torch.from_numpy(batch))

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current effective epoch (``len(self)`` batches from a boundary) as lists of
        indices; the next pass continues the stream."""
        self._start_pass()
        draws, step = self._draws, self._step
        lo, hi, whole = self._lo, self._hi, self._world_size == 1
        for _ in range(self._rest_of_epoch()):
            batch = step(draws.next())
            yield batch.tolist() if whole else batch[lo:hi].tolist()

    # -- inspection ---------------------------------------------------------------------------------

    @property
    def pool(self) -> torch.Tensor:
        """A copy of the pool: ``pool[s]`` is the example currently in slot ``s``."""
        if self._pending:
            self._materialize()
        return torch.from_numpy(self._pool.copy())

    @property
    def sequence(self) -> torch.Tensor:
        """A copy of the cyclic sequence of examples used to refill the pool."""
        if self._pending:
            self._materialize()
        return torch.from_numpy(self._seq_ext[: self.num_samples].copy())

    @property
    def cursor(self) -> int:
        """Position in the sequence of the next example to enter the pool."""
        return self._cursor

    @property
    def steps(self) -> int:
        """Number of batches drawn so far."""
        return self._steps

    # -- resume -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The sampler's exact position in its stream (tensors and ints), for :meth:`load_state_dict`."""
        return {"kind": "srs", "num_samples": self.num_samples, "global_batch": self.global_batch,
                "seed": self.seed, "order": self.order, "steps": int(self._steps),
                "cursor": int(self._cursor), "pool": self.pool,
                "draws": self._draws.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the sampler that saved ``state`` stood; ValueError if ``state`` comes
        from a sampler of another kind, size, batch or seed."""
        if self._alone:
            self._check_group()
        _check_state(state, "srs", {"num_samples": self.num_samples, "global_batch": self.global_batch,
                                    "seed": self.seed, "order": self.order})
        pool = state["pool"]
        n = self.num_samples
        if not isinstance(pool, torch.Tensor) or pool.shape != (n,):
            raise ValueError(f"state['pool'] must be a tensor of shape ({n},)")
        if pool.is_floating_point() or pool.is_complex() or pool.dtype == torch.bool:
            raise ValueError(f"state['pool'] must hold integer example indices, got dtype {pool.dtype}")
        if n and (int(pool.min()) < 0 or int(pool.max()) >= n):
            raise ValueError(f"state['pool'] holds indices outside [0, {n}): min {int(pool.min())}, "
                             f"max {int(pool.max())}")
        steps, cursor = _state_int(state, "steps", 0), _state_int(state, "cursor", 0, max(n, 1))
        self._pool[:] = pool.to(torch.int64).numpy()
        self._draws.load_state_dict(state["draws"])
        self._steps, self._cursor = steps, cursor


@register("srs")
def _make_srs(ctx, **options) -> SequencedReplacementSampler:
    _options("srs", options, {"order"})
    return SequencedReplacementSampler(ctx.num_samples, ctx.batch_size, seed=ctx.seed, rank=ctx.rank,
                                       world_size=ctx.world_size, **options)
