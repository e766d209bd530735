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
next stream id of its kind, so that the ``k``-th shake layer of a forward pass draws from stream
``(shake, k)`` on every rank.  Outside a context they fall back to their generators, unchanged.

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


_SH_MASK = {s: (1 << (64 - s)) - 1 for s in (11, 27, 30, 31, 40)}


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` by ``s`` (torch's ``>>`` is arithmetic on signed integers)."""
    return (z >> s) & _SH_MASK[s]


def _mix_tensor(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function, elementwise on an int64 tensor (two's complement wrap-around)."""
    z = (z ^ _srl(z, 30)) * _signed(_C1)
    z = (z ^ _srl(z, 27)) * _signed(_C2)
    return z ^ _srl(z, 31)


def uniform_from_keys(base: int, counters: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniforms in ``[0, 1)``, one per element of the int64 tensor ``counters``: SplitMix64 output of
    ``base + counter * gamma`` (float32: the top 24 bits; float64: the top 53)."""
    z = _mix_tensor(counters * _signed(_GAMMA) + _signed(base))
    if dtype == torch.float64:
        return _srl(z, 11).to(torch.float64) * (2.0 ** -53)
    return _srl(z, 40).to(torch.float32) * (2.0 ** -24)


class Keys:
    """The keys of one training batch: run ``seed``, ``step`` (or epoch) and the *global* dataset
    ``indices`` of the examples this process holds, in batch order (METHODS.md, keyed randomness).

    - :meth:`uniform` -- per-example uniforms, shape ``(n, draws)``: a pure function of
      ``(seed, stream, step, index, j)``;
    - :meth:`batch_uniform` -- per-batch uniforms, shape ``(draws,)``: a function of
      ``(seed, stream, step, j)``, the same on every rank;
    - :meth:`take` -- the next stream id of a kind within this batch (the ``k``-th shake layer of a
      forward pass gets ``k``), for components inside a model that cannot be told their position.
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
        self._taken: dict[int, int] = {}

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

    def take(self, kind: int) -> int:
        """The next stream id of ``kind`` in this batch: ``mix(kind, k)`` for the ``k``-th call (from 0)."""
        k = self._taken.get(kind, 0)
        self._taken[kind] = k + 1
        return mix(kind, k)

    def uniform(self, stream: int, draws: int = 1, *, device=None, dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> torch.Tensor:
        """Per-example uniforms in ``[0, 1)``, shape ``(n, draws)``, on ``device`` (the indices' by default).

        Entry ``(i, j)`` depends only on ``(seed, stream, step, indices[i], j)``; ``seed`` defaults to the
        run seed (a component with a seed of its own, such as RandomGradient, passes it).
        """
        base = mix(self.seed if seed is None else seed, stream, self.step)
        idx = self._indices_on(self.indices.device if device is None else device)
        counters = idx.unsqueeze(1) * draws + torch.arange(draws, device=idx.device)
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
