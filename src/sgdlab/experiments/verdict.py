"""Verdicts on the papers' claims, computed from bootstrap intervals (never typed in).

A claim says the treatment moves a metric in one ``direction`` relative to a baseline (``-1``: lower,
e.g. test error; ``+1``: higher, e.g. accuracy). With the 95% bootstrap interval ``[lo, hi]`` of the
difference ``treatment - baseline`` (:func:`sgdlab.experiments.aggregate.bootstrap_difference`):

- ``supported``: the interval excludes 0 on the claimed side (``direction * lo > 0`` for +1, ``hi < 0`` for -1);
- ``contradicted``: it excludes 0 on the opposite side;
- ``inconclusive``: it contains 0, or either group has fewer than ``min_n`` values.

An equivalence claim (e.g. "the linear scaling rule preserves accuracy") uses a margin ``m``:
``supported`` if the whole interval lies inside ``[-m, m]``, ``contradicted`` if it lies entirely
outside on the claimed-harmful side (below ``-m`` for accuracy), else ``inconclusive``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["CONTRADICTED", "INCONCLUSIVE", "SUPPORTED", "Verdict", "decide", "decide_equivalence"]

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """One claim's outcome: the verdict, the estimate and interval it came from, and the rule's wording."""

    study: str
    claim: str
    metric: str
    estimate: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(ci_low: float, ci_high: float, direction: int, *, n: int | None = None, min_n: int = 3) -> str:
    """Verdict of a directional claim from the interval of ``treatment - baseline`` (see module doc)."""
    if direction not in (-1, 1):
        raise ValueError(f"direction must be -1 (claimed lower) or +1 (claimed higher), got {direction!r}")
    if ci_low > ci_high:
        raise ValueError(f"ci_low ({ci_low}) must not exceed ci_high ({ci_high})")
    if n is not None and n < min_n:
        return INCONCLUSIVE
    if ci_low > 0:
        return SUPPORTED if direction > 0 else CONTRADICTED
    if ci_high < 0:
        return SUPPORTED if direction < 0 else CONTRADICTED
    return INCONCLUSIVE


def decide_equivalence(ci_low: float, ci_high: float, margin: float, *, harmful: int = -1,
                       n: int | None = None, min_n: int = 3) -> str:
    """Verdict of "no practical difference" within ``margin``; ``harmful`` is the side that refutes it."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    if harmful not in (-1, 1):
        raise ValueError(f"harmful must be -1 or +1, got {harmful!r}")
    if ci_low > ci_high:
        raise ValueError(f"ci_low ({ci_low}) must not exceed ci_high ({ci_high})")
    if n is not None and n < min_n:
        return INCONCLUSIVE
    if -margin <= ci_low and ci_high <= margin:
        return SUPPORTED
    if (harmful < 0 and ci_high < -margin) or (harmful > 0 and ci_low > margin):
        return CONTRADICTED
    return INCONCLUSIVE
