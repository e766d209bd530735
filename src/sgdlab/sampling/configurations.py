"""Counting the accessible configurations of mini-batches (SRS paper, section 2, eqs. 1-3)."""

from __future__ import annotations

import math

__all__ = ["accessible_configurations"]

_LN10 = math.log(10.0)


def _log10_comb(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / _LN10


def accessible_configurations(num_samples: int, batch_size: int, epochs: float, scheme: str) -> float:
    """log10 of the number of accessible mini-batch configurations over ``epochs`` x n_B steps.

    From "Sequenced-Replacement Sampling for Deep Learning", section 2, with N = ``num_samples``,
    B = ``batch_size``, n_E = ``epochs`` and n_B = round(N / B) (nearest integer, halves rounded up):

    - ``scheme="without"`` (epoch-wise sampling without replacement, eqs. 1-2):
      N_without = n_E * prod_{k=0}^{n_B-1} C(N - kB, B).  When rounding makes n_B B exceed N, the last
      factor counts the incomplete final batch of the remaining r = N - (n_B-1)B < B examples, C(r, r) = 1
      (the literal C(r, B) would be 0).
    - ``scheme="with"`` (batched replacement sampling, eq. 3):
      N_with = n_E * prod_{k=0}^{n_B-1} C(N, B) = n_E * C(N, B)^{n_B}.  Each step draws B distinct
      examples and puts them back only after the batch is complete, hence C(N, B) per step rather than
      C(N+B-1, B).  (The paper compares the two products factor by factor, eqs. 4-6, and concludes
      N_with >> N_without.)  SRS has the same count as batched replacement (section 2).
      The extracted text of eq. 3 also reads as n_E * n_B * C(N, B); that reading is not used: it
      would make N_with far smaller than N_without (10^388 against 10^129,039 for one epoch at
      N = 50,000, B = 128), the opposite of the paper's conclusion drawn from eqs. 4-6.

    Computed with log-gamma, so N = 50,000 (CIFAR) works; returns a float (log10 of the count).
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_size > num_samples:
        raise ValueError(f"batch_size must be at most num_samples={num_samples}, got {batch_size}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not math.isfinite(epochs) \
            or epochs <= 0:
        raise ValueError(f"epochs must be a positive finite number, got {epochs!r}")
    if scheme not in ("without", "with"):
        raise ValueError(f"scheme must be 'without' or 'with', got {scheme!r}")
    n_b = max(1, math.floor(num_samples / batch_size + 0.5))
    total = math.log10(epochs)
    if scheme == "with":
        return total + n_b * _log10_comb(num_samples, batch_size)
    for k in range(n_b):
        remaining = num_samples - k * batch_size
        total += _log10_comb(remaining, min(batch_size, remaining))
    return total
