"""Sequenced-replacement sampling (SRS paper, section 2, Fig. 1) and accessible configurations (eqs. 1-3)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from sgdlab.sampling import ReplacementSampler, SequencedReplacementSampler, accessible_configurations


def _labels(pool) -> list[int]:
    """0-based pool contents as the paper's sorted 1-based labels."""
    return sorted(int(x) + 1 for x in pool)


def test_figure_1_walk():
    s = SequencedReplacementSampler(5, 2, order="identity")
    assert _labels(s.pool) == [1, 2, 3, 4, 5]
    assert s.sequence.tolist() == [0, 1, 2, 3, 4]
    # (b) draw examples "2" and "5": they sit in slots 1 and 4 (0-based)
    batch = s._step([1, 4])
    assert sorted(int(x) + 1 for x in batch) == [2, 5]
    # (c) refilled with "1" and "2" from the queue
    assert _labels(s.pool) == [1, 1, 2, 3, 4] and s.cursor == 2
    # (d) draw "1" and "1": the two slots holding example 0
    slots = [i for i, x in enumerate(s.pool.tolist()) if x == 0]
    batch = s._step(slots)
    assert [int(x) + 1 for x in batch] == [1, 1]
    # (e) refilled with "3" and "4"
    assert _labels(s.pool) == [2, 3, 3, 4, 4] and s.cursor == 4
    # the queue wraps: the next refill is "5", "1"
    s._step([0, 1])
    assert s.cursor == 1 and _labels(s.pool).count(5) == 1
    assert s.effective_epoch == pytest.approx(3 * 2 / 5)
    with pytest.raises(ValueError, match="slots"):
        s._step([0, 0])


def test_random_order_is_a_seeded_permutation():
    a = SequencedReplacementSampler(100, 4, seed=3)
    b = SequencedReplacementSampler(100, 4, seed=3)
    c = SequencedReplacementSampler(100, 4, seed=4)
    assert sorted(a.sequence.tolist()) == list(range(100))
    assert torch.equal(a.sequence, b.sequence) and not torch.equal(a.sequence, c.sequence)
    assert torch.equal(a.pool, a.sequence)  # every example once, initially


def test_pool_invariants_and_cursor():
    n, b = 37, 5
    s = SequencedReplacementSampler(n, b, seed=0)
    seq = s.sequence.tolist()
    for t in range(1, 40):
        before = s.pool
        batch = s.next_batch().indices
        after = s.pool
        changed = (before != after).nonzero().flatten()
        # the batch came from the pool and at most B slots changed, now holding the refill window
        assert set(batch.tolist()) <= set(before.tolist())
        window = [seq[(((t - 1) * b) + j) % n] for j in range(b)]
        assert set(after[changed].tolist()) <= set(window)
        assert s.cursor == (t * b) % n and s.steps == t


def test_len_is_steps_per_effective_epoch():
    assert len(SequencedReplacementSampler(50_000, 64)) == round(50_000 / 64)
    assert len(SequencedReplacementSampler(50_000, 32, rank=0, world_size=2)) == round(50_000 / 64)
    assert len(SequencedReplacementSampler(10, 4)) == 3  # 2.5 rounds half up
    assert len(SequencedReplacementSampler(10, 10)) == 1


# ---------------------------------------------------------------------------------------------
# Statistics: SRS against batched replacement sampling
# ---------------------------------------------------------------------------------------------


def _redraw_hits(sampler, steps):
    prev, hits, trials = set(sampler.next_batch().indices.tolist()), 0, 0
    for _ in range(steps):
        cur = sampler.next_batch().indices.tolist()
        hits += len(prev.intersection(cur))
        trials += len(prev)
        prev = set(cur)
    return hits, trials


def test_srs_redraws_less_often_than_replacement():
    """P(an example drawn at t is drawn again at t+1) is B/N for replacement and lower for SRS.

    In steady state an example drawn from the SRS pool leaves about 0.58 other copies on average
    (copies enter once per pass and leave at rate B/N), so the rate is about 0.58 B/N.
    """
    n, b, steps = 1000, 10, 10000
    p = b / n
    hits_r, trials_r = _redraw_hits(ReplacementSampler(n, b, seed=0), steps)
    hits_s, trials_s = _redraw_hits(SequencedReplacementSampler(n, b, seed=0), steps)
    rate_r, rate_s = hits_r / trials_r, hits_s / trials_s
    se_r = math.sqrt(p * (1 - p) / trials_r)
    se_s = math.sqrt(rate_s * (1 - rate_s) / trials_s)
    assert abs(rate_r - p) < 4 * se_r
    assert rate_s < p - 5 * math.hypot(se_r, se_s)
    assert rate_s == pytest.approx(0.58 * p, abs=5 * se_s + 0.05 * p)


def test_srs_draw_counts_are_even():
    """Every example is drawn once per effective epoch on average, far more evenly than with replacement.

    Under SRS an example's draw count is its entries into the pool (one per pass over the sequence)
    minus the copies still in the pool, so it stays within a few draws of the number of effective
    epochs; under replacement it is Binomial(steps, B/N) with variance about the number of epochs.
    """
    n, b, epochs = 1000, 10, 50
    steps = epochs * n // b
    counts = {}
    for cls in (SequencedReplacementSampler, ReplacementSampler):
        s = cls(n, b, seed=2)
        idx = np.concatenate([s.next_batch().indices.numpy() for _ in range(steps)])
        counts[cls] = np.bincount(idx, minlength=n)
        assert s.effective_epoch == pytest.approx(epochs)
    srs, rep = counts[SequencedReplacementSampler], counts[ReplacementSampler]
    assert srs.mean() == rep.mean() == epochs
    assert np.abs(srs - epochs).max() <= 8
    assert srs.min() > 0
    var_rep_expected = steps * (b / n) * (1 - b / n)
    assert abs(rep.var(ddof=1) / var_rep_expected - 1) < 4 * math.sqrt(2 / (n - 1))
    assert srs.var(ddof=1) < 0.1 * var_rep_expected


def test_srs_every_slot_choice_is_uniform():
    # slots are chosen uniformly: from the initial pool (identity order) each example is drawn w.p. B/N
    n, b, trials = 20, 4, 1000
    counts = np.zeros(n)
    for seed in range(trials):
        for i in SequencedReplacementSampler(n, b, seed=seed, order="identity").next_batch().indices.tolist():
            counts[i] += 1
    p = b / n
    se = math.sqrt(trials * p * (1 - p))
    assert np.abs(counts - trials * p).max() < 4.5 * se


# ---------------------------------------------------------------------------------------------
# Accessible configurations, eqs. 1-3
# ---------------------------------------------------------------------------------------------


def _exact(n, b, e, scheme) -> int:
    n_b = math.floor(Fraction(n, b) + Fraction(1, 2))
    if scheme == "with":
        return e * math.comb(n, b) ** n_b
    total = e
    for k in range(n_b):
        r = n - k * b
        total *= math.comb(r, min(b, r))
    return total


@pytest.mark.parametrize("n", [1, 2, 5, 12, 30, 64])
@pytest.mark.parametrize("scheme", ["without", "with"])
def test_accessible_configurations_exact(n, scheme):
    for b in range(1, n + 1):
        for e in (1, 3, 200):
            want = math.log10(_exact(n, b, e, scheme))
            assert accessible_configurations(n, b, e, scheme) == pytest.approx(want, rel=1e-10, abs=1e-9)


def test_accessible_configurations_cifar():
    without = accessible_configurations(50_000, 128, 200, "without")
    with_ = accessible_configurations(50_000, 128, 200, "with")
    assert math.isfinite(without) and math.isfinite(with_)
    assert with_ > without > 1e5  # section 2: N_with >> N_without
    # one epoch without replacement: the number of ordered partitions into batches, N! / (B!^n_B)
    # (50,000 = 390 x 128 + 80, n_B = 391, the last batch holding 80)
    partitions = (math.lgamma(50_001) - 390 * math.lgamma(129) - math.lgamma(81)) / math.log(10)
    assert accessible_configurations(50_000, 128, 1, "without") == pytest.approx(partitions, rel=1e-12)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 1, 1, "with"), "num_samples"),
        ((10, 0, 1, "with"), "batch_size"),
        ((10, 11, 1, "with"), "batch_size"),
        ((10, 2, 0, "with"), "epochs"),
        ((10, 2, 1, "sometimes"), "scheme"),
    ],
)
def test_accessible_configurations_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        accessible_configurations(*args)


def test_copies_and_pickles_continue_the_same_stream():
    """A deep copy or a pickle round trip is an independent sampler in the same state."""
    import copy
    import pickle

    s = SequencedReplacementSampler(1000, 16, seed=3)
    for _ in range(7):
        s.next_batch()
    clones = [copy.deepcopy(s), pickle.loads(pickle.dumps(s))]
    expected = [s.next_batch().indices.tolist() for _ in range(20)]
    state = s.state_dict()
    for c in clones:
        got = [c.next_batch().indices.tolist() for _ in range(20)]
        assert got == expected
        # the saved state follows the clone's own pool, not the original's
        assert torch.equal(c.state_dict()["pool"], state["pool"])
