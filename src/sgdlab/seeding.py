"""Seeds: every bit of a 64-bit seed counts.

torch's CPU generator (a Mersenne Twister) keeps only the low 32 bits of the seed it is given, so seeds
that differ only above bit 32 (``0`` and ``2**32``) would give identical streams, and seeds of 2^64 or
more overflow with a bare ``RuntimeError``. :func:`torch_seed` is the one mapping of a user seed to
a generator seed: seeds below 2^32 are passed through unchanged (every existing result stays the same),
larger ones are hashed to 32 bits with :class:`numpy.random.SeedSequence`, so that distinct seeds
collide only by chance (probability 2^-32 per pair) and never systematically. :func:`check_seed`
is the one range check (an integer in [0, 2^64)).
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_SEED", "check_seed", "torch_seed"]

MAX_SEED = 2**64 - 1


def check_seed(seed, what: str = "seed") -> int:
    """``seed`` as an int if it is an integer in [0, 2^64); else a one-line ValueError naming ``what``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{what} must be in [0, 2^64), got {seed}")
    return seed


def torch_seed(seed) -> int:
    """The value to pass to ``torch.Generator.manual_seed`` for ``seed`` (see module doc): ``seed`` itself
    below 2^32, else a 32-bit hash of all its bits."""
    seed = check_seed(seed)
    if seed < 2**32:
        return seed
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
