"""Keyed randomness: draws that are a pure function of (seed, stream, step, example index).

A data-parallel run splits every global batch over the ranks.  Random numbers drawn from a stream
(``torch.rand(n, generator=g)``) then depend on which rank holds an example and how many examples that
rank holds, so the same run at another world size draws other augmentations, Shake-Shake coefficients
and Random Gradient factors.  Here each per-example uniform is instead computed by a counter-based
hash -- SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA
2014), vectorised on int64 tensors -- of

``(run seed, stream id, step or epoch, example index, draw number)``,

so an example gets the same draw whichever rank holds it, at any world size; a per-batch draw hashes
``(run seed, stream id, step, draw number)``, which every rank computes alike.  Nothing is carried
between steps: there is no state to checkpoint, and a resumed run draws what an uninterrupted one
would.

:class:`Keys` names one batch (seed, step, the *global* dataset indices of the examples this process
holds, in batch order).  Components that draw per example accept it directly (``cifar_augment(x,
keys=keys)``) or read it from the active context (``with sgdlab.keyed.use(keys): model(x)``): the
Shake-Shake layers of a model and :class:`~sgdlab.regularize.RandomGradient` do, each call taking the
next draw numbers of its kind's stream, so that the ``k``-th shake layer of a forward pass gets the same
draws on every rank.  Outside a context they fall back to their generators, unchanged.

Two copies of one example in the same batch (sequenced-replacement sampling can draw them) get the
same draw: the key is the example, not its slot.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["Keys", "keyed", "use", "current", "stream_id", "mix", "uniform_from_keys"]

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _mix_int(z: int) -> int:
    """SplitMix64's output function on a Python int (mod 2^64)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def mix(*parts: int) -> int:
    """A 64-bit key of the integers ``parts`` (order matters): SplitMix64 steps chained over them."""
    h = 0
    for p in parts:
        h = _mix_int((h ^ (int(p) & _M64)) + _GAMMA)
    return h


def stream_id(name: str) -> int:
    """A fixed 32-bit stream id of ``name`` (CRC-32, stable across processes and Python versions)."""
    return zlib.crc32(name.encode())


BLOCK = 32            # per-example columns hashed at once by next_uniform
_STRIDE = 1 << 20     # draw numbers per example and stream: counter = index * _STRIDE + j
_SH_MASK = {s: (1 << (64 - s)) - 1 for s in (11, 27, 30, 31, 40)}


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` by ``s`` (torch's ``>>`` is arithmetic on signed integers)."""
    return (z >> s) & _SH_MASK[s]


def _mix_tensor(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function, elementwise on an int64 tensor (two's complement wrap-around)."""
    z = (z ^ _srl(z, 30)) * _signed(_C1)
    z = (z ^ _srl(z, 27)) * _signed(_C2)
    return z ^ _srl(z, 31)


def _to_uniform(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The top 24 (float32) or 53 (float64) bits of the 64-bit ``z`` as a uniform in ``[0, 1)``: the
    arithmetic shift gives them as a signed integer ``v`` in ``[-2^(k-1), 2^(k-1))``, and ``v 2^-k + 1/2``
    is exact in that float type."""
    bits = 53 if dtype == torch.float64 else 24
    return (z >> (64 - bits)).to(dtype) * (2.0 ** -bits) + 0.5


def uniform_from_keys(base: int, counters: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniforms in ``[0, 1)``, one per element of the int64 tensor ``counters``: SplitMix64 output of
    ``base + counter * gamma`` (float32: the top 24 bits; float64: the top 53)."""
    return _to_uniform(_mix_tensor(counters * _signed(_GAMMA) + _signed(base)), dtype)


class Keys:
    """The keys of one training batch: run ``seed``, ``step`` (or epoch) and the *global* dataset
    ``indices`` of the examples this process holds, in batch order (METHODS.md, keyed randomness).

    - :meth:`uniform` -- per-example uniforms, shape ``(n, draws)``: a pure function of
      ``(seed, stream, step, index, j)``;
    - :meth:`batch_uniform` -- per-batch uniforms, shape ``(draws,)``: a function of
      ``(seed, stream, step, j)``, the same on every rank;
    - :meth:`next_uniform` / :meth:`next_batch_uniform` -- the same for components that draw several
      times per batch and cannot be told their position (the shake layers of a model): the calls of one
      ``kind`` consume consecutive draw numbers ``j`` of the stream ``kind``, so the ``k``-th shake layer of
      a forward pass gets the same columns on every rank. Per-example draws are hashed
      :data:`BLOCK` columns at a time and sliced per call, so a model with many shake layers pays for one
      hash per step, not one per layer.
    """

    def __init__(self, seed: int, step: int, indices: Any):
        for name, v in (("seed", seed), ("step", step)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"Keys: {name} must be an integer, got {v!r}")
        idx = torch.as_tensor(indices)
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"Keys: indices must be a 1-D integer tensor of dataset indices, got "
                             f"{tuple(idx.shape)} {idx.dtype}")
        self.seed, self.step = seed, step
        self.indices = idx.long()
        self._on: dict[torch.device, torch.Tensor] = {}
        self._taken: dict[tuple, int] = {}
        self._blocks: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __repr__(self) -> str:
        return f"Keys(seed={self.seed}, step={self.step}, {len(self)} indices)"

    def _indices_on(self, device) -> torch.Tensor:
        device = torch.device(device)
        t = self._on.get(device)
        if t is None:
            t = self._on[device] = self.indices.to(device)
        return t

    def _advance(self, what: tuple, draws: int) -> int:
        pos = self._taken.get(what, 0)
        self._taken[what] = pos + draws
        return pos

    def next_uniform(self, kind: int, draws: int, *, device=None, dtype: torch.dtype = torch.float32,
                     seed: int | None = None) -> torch.Tensor:
        """The next ``draws`` per-example uniforms of stream ``kind`` in this batch, shape ``(n, draws)``.

        Column ``j`` of the stream is ``uniform(kind, ...)``'s column ``j``; calls consume the columns in order.
        """
        pos = self._advance(("e", kind, seed), draws)
        b, off = divmod(pos, BLOCK)
        if off + draws <= BLOCK:  # the common case: inside one block already hashed, on the wanted device
            block = self._blocks.get((kind, seed, b, dtype))
            if block is not None and (device is None or block.device == device):
                return block[:, off:off + draws]
        cols = []
        while draws:
            b, off = divmod(pos, BLOCK)
            key = (kind, seed, b, dtype)
            block = self._blocks.get(key)
            if block is None:
                dev = self.indices.device if device is None else device
                block = self._blocks[key] = self._block(kind, b, dev, dtype, seed)
            elif device is not None and block.device != device:
                block = self._blocks[key] = block.to(device)
            take = min(draws, BLOCK - off)
            cols.append(block[:, off:off + take])
            pos, draws = pos + take, draws - take
        return cols[0] if len(cols) == 1 else torch.cat(cols, 1)

    def _block(self, kind, b, device, dtype, seed) -> torch.Tensor:
        # the SplitMix64 states base + (index * _STRIDE + j) * gamma in two kernels: a row of the column terms
        # base + j * gamma (j in this block), plus index * (_STRIDE * gamma)
        base = mix(self.seed if seed is None else seed, kind, self.step)
        cols = torch.tensor([_signed(base + j * _GAMMA) for j in range(b * BLOCK, (b + 1) * BLOCK)], device=device)
        z = torch.add(cols, self._indices_on(device).unsqueeze(1), alpha=_signed(_STRIDE * _GAMMA))
        return _to_uniform(_mix_tensor(z), dtype)

    def next_batch_uniform(self, kind: int, draws: int, *, device=None, dtype: torch.dtype = torch.float32,
                           seed: int | None = None) -> torch.Tensor:
        """The next ``draws`` per-batch uniforms of stream ``kind`` in this batch, shape ``(draws,)``."""
        pos = self._advance(("b", kind, seed), draws)
        base = mix(self.seed if seed is None else seed, kind, self.step, 1)
        counters = torch.arange(pos, pos + draws, device=self.indices.device if device is None else device)
        return uniform_from_keys(base, counters, dtype)

    def uniform(self, stream: int, draws: int = 1, *, device=None, dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> torch.Tensor:
        """Per-example uniforms in ``[0, 1)``, shape ``(n, draws)``, on ``device`` (the indices' by default).

        Entry ``(i, j)`` depends only on ``(seed, stream, step, indices[i], j)``; ``seed`` defaults to the
        run seed (a component with a seed of its own, such as RandomGradient, passes it).
        """
        if draws > _STRIDE:
            raise ValueError(f"Keys.uniform: at most {_STRIDE} draws per example and stream, got {draws}")
        base = mix(self.seed if seed is None else seed, stream, self.step)
        idx = self._indices_on(self.indices.device if device is None else device)
        counters = idx.unsqueeze(1) * _STRIDE + torch.arange(draws, device=idx.device)
        return uniform_from_keys(base, counters, dtype)

    def batch_uniform(self, stream: int, draws: int = 1, *, device=None, dtype: torch.dtype = torch.float32,
                      seed: int | None = None) -> torch.Tensor:
        """Per-batch uniforms in ``[0, 1)``, shape ``(draws,)``: a function of ``(seed, stream, step, j)``."""
        base = mix(self.seed if seed is None else seed, stream, self.step, 1)
        counters = torch.arange(draws, device=self.indices.device if device is None else device)
        return uniform_from_keys(base, counters, dtype)

    def check_rows(self, n: int, what: str) -> None:
        """ValueError unless a batch of ``n`` rows matches these keys' ``len(indices)``."""
        if n != len(self):
            raise ValueError(f"{what}: the batch has {n} examples but the keyed context has {len(self)} indices "
                             f"(pass the global dataset indices of exactly this batch)")


_ACTIVE: list[Keys] = []


@contextlib.contextmanager
def use(keys: Keys) -> Iterator[Keys]:
    """Make ``keys`` the active keys while the block runs (nestable; the innermost wins)."""
    if not isinstance(keys, Keys):
        raise ValueError(f"use() needs a Keys object, got {type(keys).__name__}")
    _ACTIVE.append(keys)
    try:
        yield keys
    finally:
        _ACTIVE.pop()


def current() -> Keys | None:
    """The active :class:`Keys` (innermost :func:`use` block), or None outside any."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def keyed(seed: int, step: int, indices: Any) -> Iterator[Keys]:
    """``with keyed(seed, step, indices): model(x); loss = rg(losses)`` -- keyed draws for one batch.

    Shorthand for ``use(Keys(seed, step, indices))``: inside the block the Shake-Shake layers and
    RandomGradient draw from keys of (``seed``, ``step``, the global dataset ``indices`` of the batch's
    rows) instead of their generators, so the run's noise does not depend on how the global batch is split
    over processes. Yields the :class:`Keys` (pass it to ``cifar_augment(x, keys=...)`` as well).
    """
    with use(Keys(seed, step, indices)) as keys:
        yield keys
