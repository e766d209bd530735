"""Blind samplers: epoch-wise sampling without replacement and batched replacement sampling.

"Blind" samplers choose mini-batches from the indices alone and ignore any feedback from training
(``observe`` is a no-op).  Both are the baselines of the sequenced-replacement sampling paper
(Sequenced-Replacement Sampling for Deep Learning, ICLR 2019 submission, section 2):

- :class:`EpochSampler` -- "training over epochs": each epoch is a fresh random permutation of the
  N examples cut into consecutive mini-batches (sampling without replacement, eqs. 1-2).
- :class:`ReplacementSampler` -- *batched* replacement sampling: every step draws B distinct examples
  uniformly at random and puts them all back before the next step (eq. 3; the paper counts
  C(N, B) configurations per step rather than C(N+B-1, B) for that reason).

The sequenced-replacement sampler itself lives in :mod:`sgdlab.sampling.srs`.

All samplers here implement the :class:`~sgdlab.sampling.base.BatchSource` protocol and are also
plain iterables of ``list[int]`` batches, so they can be passed to
``torch.utils.data.DataLoader(dataset, batch_sampler=sampler)``.  Under data parallelism
``batch_size`` is *per rank*: every rank draws the same global batch of ``world_size * batch_size``
indices from identically seeded state and keeps its own contiguous slice.

Randomness comes from a private :class:`torch.Generator` seeded with ``seed``; the global RNG is never
touched.  Per-step work is done on NumPy views of the sampler's tensors (a few vectorised operations on
arrays of ``world_size * batch_size`` elements), because at these tiny sizes the fixed cost of a torch
operator dominates; random numbers are drawn with torch in blocks of many steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..seeding import check_seed, torch_seed
from .base import Batch, check_group, check_sizes, group_initialized, register, resolve_rank

__all__ = ["EpochSampler", "ReplacementSampler"]

_MASK63 = (1 << 63) - 1


def _check_seed(seed) -> int:
    return check_seed(seed)


def _check_args(num_samples, batch_size, rank, world_size) -> None:
    """Validate what can be checked before ``rank``/``world_size`` are known (a framework passing its own
    sampler in place of ``num_samples`` included)."""
    if isinstance(num_samples, Sampler):
        raise TypeError(
            f"num_samples must be the dataset size, got a {type(num_samples).__name__}: a framework is trying to "
            "re-shard this sampler, but sgdlab samplers shard themselves (every rank keeps its slice of one global "
            "batch); in Lightning pass Trainer(use_distributed_sampler=False), with Accelerate see "
            "sgdlab.integrations.accelerate")
    check_sizes(num_samples, batch_size)
    if batch_size > num_samples:
        raise ValueError(f"batch_size must be at most num_samples={num_samples}, got {batch_size}")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer or None, got {value!r}")


def _resolve(num_samples, batch_size, rank, world_size) -> tuple[int, int, int]:
    """Validate sizes and ranks; return ``(rank, world_size, global_batch)``."""
    check_sizes(num_samples, batch_size)
    rank, world_size = resolve_rank(rank, world_size)
    global_batch = world_size * batch_size
    if batch_size > num_samples:
        raise ValueError(f"batch_size must be at most num_samples={num_samples}, got {batch_size}")
    if global_batch > num_samples:
        raise ValueError(
            f"batch_size={batch_size} x world_size={world_size} = {global_batch} (the global batch) "
            f"must be at most num_samples={num_samples}"
        )
    return rank, world_size, global_batch


def _split_bounds(length: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share ``[start, stop)`` of ``rank`` in a batch of ``length``: sizes differ by at most 1.

    For ``length = world_size * b`` this is exactly :func:`~sgdlab.sampling.base.rank_slice`.
    """
    q, r = divmod(length, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def _check_state(state: dict, kind: str, expected: dict) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state is not a {kind!r} sampler state (kind={got!r})")
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(f"state[{key!r}]={state.get(key)!r} does not match this sampler's {key}={value!r}")


def _state_int(state: dict, key: str, lo: int, hi: int | None = None) -> int:
    """``state[key]`` as an int in ``[lo, hi)`` (no upper end when ``hi`` is None); ValueError naming the key
    otherwise, so that a damaged or hand-edited state cannot resume a sampler at an impossible position."""
    v = state.get(key)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v >= hi):
        where = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"state[{key!r}] must be an integer {where}, got {v!r}")
    return int(v)


class _DistinctSlots:
    """Stream of uniformly random subsets of ``size`` distinct integers in ``[0, n)``.

    Random numbers are drawn from ``generator`` in blocks of ``rows`` steps.  A block starts as
    ``torch.randint(n, (rows, size))``; a row is repeat-free with probability about
    ``exp(-size**2 / 2n)``.  When ``size**2 <= 2n`` the rows with a repeat are redrawn whole until they
    are repeat-free (rejection: an accepted row is uniform over ordered tuples of distinct values).
    Otherwise, in every row each position whose value already occurred at an earlier position is
    redrawn, repeatedly, until the row is repeat-free (vectorised over the rows); that rule only looks
    at which positions hold equal values, so it is exchangeable in the labels ``0..n-1`` and the values
    at any fixed positions form a uniformly random subset.  When
    ``size > n / 2`` the redraws would converge slowly, so each row is instead the first ``size``
    entries of a random permutation of ``n`` (O(n) = O(size) work).  The work per step is O(size) on
    average, never O(n) for ``size << n``.

    The state is the generator state at the start of the current block plus the position in it; the
    block is redrawn on load, so resuming is exact.
    """

    def __init__(self, n: int, size: int, generator: torch.Generator):
        self.n = n
        self.size = size
        self.gen = generator
        self.rows = max(1, min(4096, 16384 // size))
        self.dense = 2 * size > n
        self.reject_rows = size * size <= 2 * n  # a row is repeat-free with probability >~ exp(-1)
        self._block: np.ndarray | None = None
        self._block_state: torch.Tensor | None = None
        self._pos = 0

    def _repair(self, block: np.ndarray) -> None:
        """Redraw, in place, every entry equal to an earlier entry of its row until rows are distinct."""
        srt = np.sort(block, axis=1)
        rows = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if self.reject_rows:
            # Whole-row rejection: a repeat-free iid row is uniform over ordered distinct tuples.
            while rows.size:
                fresh = torch.randint(self.n, (rows.size, self.size), generator=self.gen).numpy()
                srt = np.sort(fresh, axis=1)
                ok = ~(srt[:, 1:] == srt[:, :-1]).any(axis=1)
                block[rows[ok]] = fresh[ok]
                rows = rows[~ok]
            return
        while rows.size:
            sub = block[rows]
            order = np.argsort(sub, axis=1, kind="stable")
            srt = np.take_along_axis(sub, order, axis=1)
            again = np.zeros(sub.shape, dtype=bool)
            again[:, 1:] = srt[:, 1:] == srt[:, :-1]
            dup = np.zeros_like(again)
            np.put_along_axis(dup, order, again, axis=1)
            keep = dup.any(axis=1)
            rows, sub, dup = rows[keep], sub[keep], dup[keep]
            if not rows.size:
                return
            sub[dup] = torch.randint(self.n, (int(dup.sum()),), generator=self.gen).numpy()
            block[rows] = sub

    def _draw_block(self) -> None:
        self._block_state = self.gen.get_state()
        n, size, rows = self.n, self.size, self.rows
        if self.dense:
            keys = torch.rand(rows, n, generator=self.gen, dtype=torch.float64)
            block = keys.argsort(dim=1)[:, :size].contiguous().numpy()
        else:
            block = torch.randint(n, (rows, size), generator=self.gen).numpy()
            if size > 1:
                self._repair(block)
        self._block = block
        self._pos = 0

    def next(self) -> np.ndarray:
        """The next subset as an int64 array of ``size`` distinct values (do not modify it)."""
        if self._block is None or self._pos == self.rows:
            self._draw_block()
        row = self._block[self._pos]
        self._pos += 1
        return row

    def state_dict(self) -> dict:
        if self._block is None:
            return {"generator": self.gen.get_state(), "block": False, "pos": 0}
        return {"generator": self._block_state.clone(), "block": True, "pos": int(self._pos)}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        if state["block"]:
            self._draw_block()
            self._pos = _state_int(state, "pos", 0)
        else:
            self._block = None
            self._block_state = None
            self._pos = 0


class _Array:
    """A tensor of a pickled sampler state, carried by value as a NumPy array."""

    def __init__(self, t: torch.Tensor):
        self.array = t.detach().cpu().numpy().copy()


def _by_value(state, to_numpy: bool = True):
    """``state`` with its tensors as :class:`_Array` (``to_numpy``) or back as tensors.

    torch.multiprocessing would move pickled tensors into shared memory; for the short-lived copies of a
    state that breaks ``mp.spawn`` (the shared file is gone before the child opens it), so a pickled
    sampler carries its tensors by value instead.
    """
    if to_numpy and isinstance(state, torch.Tensor):
        return _Array(state)
    if not to_numpy and isinstance(state, _Array):
        return torch.from_numpy(state.array)
    if isinstance(state, dict):
        return {k: _by_value(v, to_numpy) for k, v in state.items()}
    return state


class _BlindSampler(Sampler):
    """Shared behaviour of the blind samplers (no feedback, iterable of index lists).

    *Rank resolution.* Given ``rank`` and ``world_size``, a sampler uses them.  Otherwise it takes them from
    the initialized process group -- at construction if one exists, else at its first use (``len()``, a
    draw, ``state_dict()``), so a sampler built at module level or before ``Accelerator()`` /
    ``Trainer.fit`` still gets its rank's slice.  A sampler that had to settle on a single process because no
    group existed yet checks again at its first draw, at every ``iter()`` and on ``load_state_dict``, and
    raises a ValueError if a group of several ranks has appeared since: it never silently trains the same
    batches on every rank.  (``rank=0, world_size=1`` given explicitly is a global-batch sampler and is
    never checked.)

    *Pickling* keeps the exact position (the state goes through :meth:`state_dict`, generator states as
    tensors), so a sampler can be sent to spawned processes.
    """

    wants_scores = False
    wants_losses = False

    num_samples: int
    batch_size: int
    seed: int

    def _init_ranks(self, num_samples, batch_size, rank, world_size) -> None:
        """Store the size arguments; resolve the ranks now when possible, else at first use."""
        _check_args(num_samples, batch_size, rank, world_size)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self._rank_arg, self._world_arg = rank, world_size
        self._alone = False       # resolved to one process while no group existed (auto ranks only)
        self._unchecked = True    # the first next_batch resolves/checks once
        self._passes = 0          # number of iter() passes started (see sgdlab.sampling.LoaderPosition)
        self._pass_origin = None  # state_dict at the start of the current pass
        self._pending = (rank is None or world_size is None) and not group_initialized()

    def _materialize(self) -> None:
        """Resolve ``rank``/``world_size`` and build the stream (called once, at construction or first use)."""
        self._pending = False
        auto = self._rank_arg is None or self._world_arg is None
        self._rank, self._world_size, self._global_batch = _resolve(self.num_samples, self.batch_size,
                                                                    self._rank_arg, self._world_arg)
        self._alone = auto and self._world_size == 1 and not group_initialized()
        self._build()

    def _build(self) -> None:  # pragma: no cover - every sampler defines it
        raise NotImplementedError

    # Lazily resolved: the hot paths read the private names, which exist once the sampler is resolved
    # (next_batch resolves on its first call, iter() at the start of every pass).
    @property
    def rank(self) -> int:
        """This process's rank (resolved from the process group at first use when not given)."""
        if self._pending:
            self._materialize()
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks sharing each global batch."""
        if self._pending:
            self._materialize()
        return self._world_size

    @property
    def global_batch(self) -> int:
        """``world_size * batch_size``: the indices drawn per step over all ranks."""
        if self._pending:
            self._materialize()
        return self._global_batch

    def __len__(self) -> int:
        """Steps per (effective) epoch."""
        if self._pending:
            self._materialize()
        return self._len

    def _first_draw(self) -> None:
        if self._pending:
            self._materialize()
        self._check_group()

    def _check_group(self) -> None:
        """Raise if this sampler settled on one process and a multi-rank group exists now."""
        self._unchecked = False
        if self._alone:
            self._alone = check_group(type(self).__name__)

    # -- pickling -------------------------------------------------------------------------------------

    def _init_kwargs(self) -> dict:
        return {"seed": self.seed}

    def __getstate__(self) -> dict:
        d = self.__dict__
        if d.get("_pending"):
            return {"args": (self.num_samples, self.batch_size), "kwargs": self._init_kwargs(),
                    "rank": self._rank_arg, "world_size": self._world_arg, "state": None}
        return {"args": (self.num_samples, self.batch_size), "kwargs": self._init_kwargs(), "rank": self.rank,
                "world_size": self.world_size, "state": _by_value(self.state_dict()), "alone": self._alone,
                "passes": self._passes, "origin": _by_value(self._pass_origin)}

    def __setstate__(self, st: dict) -> None:
        self.__init__(*st["args"], rank=st["rank"], world_size=st["world_size"], **st["kwargs"])
        if st["state"] is not None:
            self.load_state_dict(_by_value(st["state"], to_numpy=False))
            self._alone = st["alone"]
            self._passes, self._pass_origin = st["passes"], _by_value(st["origin"], to_numpy=False)

    # -- passes -----------------------------------------------------------------------------------------

    def _start_pass(self) -> None:
        """Bookkeeping at the start of an ``iter()`` pass: group check, pass count, origin state."""
        if self._pending:
            self._materialize()
        if self._alone:
            self._check_group()
        self._unchecked = False
        self._passes += 1
        self._pass_origin = self.state_dict()

    def _rest_of_epoch(self) -> int:
        """Batches left in the current effective epoch (a whole ``len()`` at an epoch boundary)."""
        return self._len - self._steps % self._len

    def observe(self, indices, losses=None, scores=None) -> None:
        """No-op: blind samplers ignore feedback from training."""

    def set_epoch(self, epoch: int) -> None:  # overridden by EpochSampler
        """Accepted for compatibility with ``DistributedSampler``-style loops; has no effect here.

        Replacement and sequenced-replacement sampling have no epochs: the stream continues.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")

    def metrics(self) -> dict[str, float]:
        """Values the engine may log every step: the (effective) epoch."""
        return {"effective_epoch": self.effective_epoch}

    @property
    def epoch(self) -> float:
        """Same as :attr:`effective_epoch`."""
        return self.effective_epoch

    @property
    def effective_epoch(self) -> float:
        """Steps x global batch / N (eq. 8 of the SRS paper); EpochSampler counts real epochs instead."""
        return self._steps * self.global_batch / self.num_samples

    def __repr__(self) -> str:
        if self.__dict__.get("_pending"):
            extra = ", rank/world_size: from the process group at first use"
        else:
            extra = f", rank={self.rank}, world_size={self.world_size}" if self.world_size > 1 else ""
        return f"{type(self).__name__}(num_samples={self.num_samples}, batch_size={self.batch_size}, seed={self.seed}{extra})"


class EpochSampler(_BlindSampler):
    """Epoch-wise sampling without replacement ("training over epochs", SRS paper section 2, eqs. 1-2).

    Epoch ``e`` is a random permutation of ``range(num_samples)`` drawn from a private generator seeded
    from ``(seed, e)``, cut into consecutive global batches of ``world_size * batch_size`` indices; rank
    ``r`` keeps the ``r``-th contiguous share of each global batch.  Each example is therefore drawn
    exactly once per epoch (``drop_last=False``) or at most once (``drop_last=True``, which drops the
    incomplete tail of each permutation: ``len = num_samples // global_batch``).

    With ``drop_last=False`` (``len = ceil(num_samples / global_batch)``) the last global batch of an
    epoch has ``r < world_size * batch_size`` indices; it is split into contiguous shares whose sizes
    differ by at most one, the lower ranks taking the larger shares (a rank gets an empty batch when
    ``r < world_size``).  Prefer ``drop_last=True`` under data parallelism.

    ``next_batch()`` runs on into the next epoch after the last batch of one; iterating the sampler
    yields the remaining batches of the current epoch as ``list[int]`` (a full epoch from a fresh
    start), so ``for batch in sampler`` is one epoch.  ``set_epoch(e)`` moves to the start of epoch
    ``e`` (a no-op when the sampler is inside epoch ``e``, which keeps a resumed mid-epoch position;
    after epoch ``e`` has ended, ``set_epoch(e)`` replays it).
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, drop_last: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        self._init_ranks(num_samples, batch_size, rank, world_size)
        self.seed = _check_seed(seed)
        if not isinstance(drop_last, bool):
            raise ValueError(f"drop_last must be a bool, got {drop_last!r}")
        self.drop_last = drop_last
        self._epoch = 0
        self._step = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1
        if not self._pending:
            self._materialize()

    def _build(self) -> None:
        if self.drop_last:
            self._len = self.num_samples // self.global_batch
        else:
            self._len = -(-self.num_samples // self.global_batch)
        self._gen = torch.Generator()

    def _init_kwargs(self) -> dict:
        return {"seed": self.seed, "drop_last": self.drop_last}

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self._epoch:
            mixed = (torch_seed(self.seed) * 0x9E3779B97F4A7C15 + self._epoch * 0xBF58476D1CE4E5B9 + 1) & _MASK63
            self._gen.manual_seed(mixed)
            self._perm = torch.randperm(self.num_samples, generator=self._gen).numpy()
            self._perm_epoch = self._epoch
        return self._perm

    def _next_indices(self) -> np.ndarray:
        if self._step >= self._len:
            self._epoch += 1
            self._step = 0
        perm = self._permutation()
        g0 = self._step * self._global_batch
        g1 = min(g0 + self._global_batch, self.num_samples)
        self._step += 1
        if self._world_size == 1:
            return perm[g0:g1].copy()
        a, b = _split_bounds(g1 - g0, self._rank, self._world_size)
        return perm[g0 + a:g0 + b].copy()

    def next_batch(self) -> Batch:
        """This rank's share of the next global batch (continues into the next epoch when one ends)."""
        if self._unchecked:
            self._first_draw()
        return Batch(torch.from_numpy(self._next_indices()))

    def __iter__(self) -> Iterator[list[int]]:
        """The remaining batches of the current epoch as lists of indices (a full epoch from its start,
        the rest of the epoch after a mid-epoch ``load_state_dict``)."""
        if self._step >= len(self):
            self._epoch += 1
            self._step = 0
        self._start_pass()
        for _ in range(self._len - self._step):
            yield self._next_indices().tolist()

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of epoch ``epoch`` (no-op if already in it, so a mid-epoch resume is kept)."""
        super().set_epoch(epoch)
        epoch = int(epoch)
        if epoch == self._epoch and self._step < len(self):
            return
        self._epoch, self._step = epoch, 0

    @property
    def effective_epoch(self) -> float:
        """Completed epochs plus the fraction of the current one (steps taken / ``len``)."""
        return self._epoch + self._step / len(self)

    def state_dict(self) -> dict:
        """The sampler's exact position in its stream (tensors and ints), for :meth:`load_state_dict`."""
        return {"kind": "epoch", "num_samples": self.num_samples, "global_batch": self.global_batch,
                "seed": self.seed, "drop_last": self.drop_last, "epoch": int(self._epoch),
                "step": int(self._step)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the sampler that saved ``state`` stood; ValueError if ``state`` comes
        from a sampler of another kind, size, batch or seed."""
        if self._alone:
            self._check_group()
        _check_state(state, "epoch", {"num_samples": self.num_samples, "global_batch": self.global_batch,
                                      "seed": self.seed, "drop_last": self.drop_last})
        self._epoch = _state_int(state, "epoch", 0)
        self._step = _state_int(state, "step", 0)


class ReplacementSampler(_BlindSampler):
    """Batched replacement sampling (SRS paper section 2, eq. 3).

    Every step draws ``world_size * batch_size`` *distinct* indices uniformly at random (all
    C(N, B) subsets equally likely) and puts them all back before the next step, so an example can be
    drawn in consecutive steps but never twice within one step.  Rank ``r`` keeps the ``r``-th contiguous
    share of the global batch.  There are no epochs: ``len()`` is ``round(N / global_batch)`` (at least
    1), the steps per effective epoch; each ``for batch in sampler`` pass yields the rest of the current
    effective epoch (``len()`` batches from a boundary, fewer after a mid-epoch ``load_state_dict`` or
    ``next_batch`` calls), continuing the same stream; :attr:`effective_epoch` = steps x global batch / N
    (eq. 8).  Ranks: see :class:`_BlindSampler`.
    ``set_epoch`` is accepted and has no effect.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        self._init_ranks(num_samples, batch_size, rank, world_size)
        self.seed = _check_seed(seed)
        self._steps = 0
        if not self._pending:
            self._materialize()

    def _build(self) -> None:
        self._len = max(1, math.floor(self.num_samples / self.global_batch + 0.5))
        self._gen = torch.Generator()
        self._gen.manual_seed(torch_seed(self.seed))
        self._draws = _DistinctSlots(self.num_samples, self.global_batch, self._gen)
        self._lo = self.rank * self.batch_size
        self._hi = self._lo + self.batch_size

    def _next_indices(self) -> np.ndarray:
        row = self._draws.next()
        self._steps += 1
        if self._world_size == 1:
            return row.copy()
        return row[self._lo:self._hi].copy()

    def next_batch(self) -> Batch:
        """This rank's share of the next global batch of distinct, uniformly drawn indices."""
        if self._unchecked:
            self._first_draw()
        return Batch(torch.from_numpy(self._next_indices()))

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current effective epoch (``len(self)`` batches from a boundary) as lists of
        indices; the next pass continues the same stream."""
        self._start_pass()
        draws = self._draws
        lo, hi, whole = self._lo, self._hi, self._world_size == 1
        for _ in range(self._rest_of_epoch()):
            row = draws.next()
            self._steps += 1
            yield row.tolist() if whole else row[lo:hi].tolist()

    @property
    def steps(self) -> int:
        """Number of batches drawn so far."""
        return self._steps

    def state_dict(self) -> dict:
        """The sampler's exact position in its stream (tensors and ints), for :meth:`load_state_dict`."""
        return {"kind": "replacement", "num_samples": self.num_samples, "global_batch": self.global_batch,
                "seed": self.seed, "steps": int(self._steps), "draws": self._draws.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the sampler that saved ``state`` stood; ValueError if ``state`` comes
        from a sampler of another kind, size, batch or seed."""
        if self._alone:
            self._check_group()
        _check_state(state, "replacement", {"num_samples": self.num_samples,
                                            "global_batch": self.global_batch, "seed": self.seed})
        self._draws.load_state_dict(state["draws"])
        self._steps = _state_int(state, "steps", 0)


def _options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        ok = ", ".join(sorted(allowed)) or "none"
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for sampler {name!r}; allowed: {ok}")


@register("epoch")
def _make_epoch(ctx, **options) -> EpochSampler:
    _options("epoch", options, {"drop_last"})
    return EpochSampler(ctx.num_samples, ctx.batch_size, seed=ctx.seed, rank=ctx.rank,
                        world_size=ctx.world_size, **options)


@register("replacement")
def _make_replacement(ctx, **options) -> ReplacementSampler:
    _options("replacement", options, set())
    return ReplacementSampler(ctx.num_samples, ctx.batch_size, seed=ctx.seed, rank=ctx.rank,
                              world_size=ctx.world_size)
