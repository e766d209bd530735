"""Blind samplers: properties shared by all three, epoch-wise and batched replacement specifics."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from sgdlab.sampling import (
    Batch,
    BatchSource,
    EpochSampler,
    ReplacementSampler,
    SequencedReplacementSampler,
    SourceContext,
    create,
)
from sgdlab.sampling.blind import _DistinctSlots

SAMPLERS = [EpochSampler, ReplacementSampler, SequencedReplacementSampler]


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _draw(sampler, k: int) -> list[list[int]]:
    return [sampler.next_batch().indices.tolist() for _ in range(k)]


# ---------------------------------------------------------------------------------------------
# Properties shared by all blind samplers
# ---------------------------------------------------------------------------------------------

sizes = st.integers(1, 60).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(1, 4)).flatmap(
        lambda nw: st.tuples(st.just(nw[0]), st.integers(1, max(1, nw[0] // nw[1])), st.just(nw[1]))))


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nbw=sizes, seed=st.integers(0, 2**31), k=st.integers(0, 30), m=st.integers(1, 20))
def test_properties(cls, nbw, seed, k, m):
    n, b, world = nbw
    if world * b > n:
        return
    ranks = [cls(n, b, seed=seed, rank=r, world_size=world) for r in range(world)]
    single = cls(n, world * b, seed=seed)  # the single-process run with the same global batch
    twin = cls(n, b, seed=seed, rank=world - 1, world_size=world)
    assert isinstance(single, BatchSource)
    for step in range(k + m):
        if step == k:  # resume every rank from a saved state, mid-epoch included
            for r in range(world):
                fresh = cls(n, b, seed=seed, rank=r, world_size=world)
                fresh.load_state_dict(_roundtrip(ranks[r].state_dict()))
                ranks[r] = fresh
        parts = [s.next_batch() for s in ranks]
        glob = single.next_batch()
        for p in parts:
            assert isinstance(p, Batch) and p.weights is None
            assert p.indices.dtype == torch.int64 and p.indices.shape == (b,)
            assert int(p.indices.min()) >= 0 and int(p.indices.max()) < n
        # ranks' slices concatenate to the single-process global batch
        assert torch.equal(torch.cat([p.indices for p in parts]), glob.indices)
        # determinism per seed (the twin never saved/loaded)
        assert torch.equal(twin.next_batch().indices, parts[-1].indices)
        if cls is not SequencedReplacementSampler:  # no repeats within a step (SRS may repeat)
            assert len(set(glob.indices.tolist())) == world * b
    assert ranks[0].effective_epoch == pytest.approx(single.effective_epoch)


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_slices_concatenate(cls, world):
    n, b, seed = 97, 5, 11
    ranks = [cls(n, b, seed=seed, rank=r, world_size=world) for r in range(world)]
    single = cls(n, world * b, seed=seed)
    for _ in range(3 * len(single) + 1):
        assert torch.equal(torch.cat([s.next_batch().indices for s in ranks]), single.next_batch().indices)
    # the list-iteration path agrees too
    for r, it in enumerate(zip(*[iter(s) for s in ranks])):
        assert sum(it, []) == single.next_batch().indices.tolist()


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_seeds_differ_and_global_rng_untouched(cls):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = cls(1000, 10, seed=0), cls(1000, 10, seed=1)
    assert _draw(a, 5) != _draw(b, 5)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_iteration_matches_next_batch_and_continues(cls):
    n, b = 50, 7
    it_sampler, nb_sampler = cls(n, b, seed=5), cls(n, b, seed=5)
    first = list(it_sampler)
    assert len(first) == len(it_sampler) and all(isinstance(x, list) and isinstance(x[0], int) for x in first)
    second = list(it_sampler)  # next epoch (EpochSampler) / the same stream continued (others)
    assert first + second == _draw(nb_sampler, 2 * len(nb_sampler))
    assert first != second
    it_sampler.set_epoch(7)  # accepted; a no-op except for EpochSampler


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_state_is_weights_only_loadable_and_checked(cls):
    s = cls(40, 4, seed=3)
    _draw(s, 3)
    state = _roundtrip(s.state_dict())
    other = cls(41, 4, seed=3)
    with pytest.raises(ValueError, match="num_samples"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        other.load_state_dict({"kind": "nope"})


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_dataloader_with_workers(cls):
    n, b = 64, 8
    data = torch.utils.data.TensorDataset(torch.arange(n) * 10)
    loader = torch.utils.data.DataLoader(data, batch_sampler=cls(n, b, seed=2), num_workers=2)
    expected = cls(n, b, seed=2)
    for _ in range(2):  # two passes: the second continues the stream / is the next epoch
        got = [batch[0].tolist() for batch in loader]
        want = [[10 * i for i in idx] for idx in expected]
        assert got == want and len(got) == len(expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0, batch_size=1), "num_samples"),
        (dict(num_samples=-5, batch_size=1), "num_samples"),
        (dict(num_samples=10, batch_size=0), "batch_size"),
        (dict(num_samples=10, batch_size=11), "batch_size"),
        (dict(num_samples=10, batch_size=4, rank=0, world_size=3), "global batch"),
        (dict(num_samples=10, batch_size=2, rank=2, world_size=2), "rank"),
        (dict(num_samples=10, batch_size=2, rank=-1, world_size=2), "rank"),
        (dict(num_samples=10, batch_size=2, rank=0, world_size=0), "world_size"),
        (dict(num_samples=10, batch_size=2, seed=1.5), "seed"),
    ],
)
@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_bad_input(cls, kwargs, match):
    kwargs = dict(kwargs)
    n, b = kwargs.pop("num_samples"), kwargs.pop("batch_size")
    with pytest.raises(ValueError, match=match):
        cls(n, b, **kwargs)


def test_bad_options():
    with pytest.raises(ValueError, match="order"):
        SequencedReplacementSampler(10, 2, order="sorted")
    with pytest.raises(ValueError, match="drop_last"):
        EpochSampler(10, 2, drop_last="yes")
    with pytest.raises(ValueError, match="epoch"):
        EpochSampler(10, 2).set_epoch(-1)


def test_registry_builds_the_samplers():
    ctx = SourceContext(num_samples=100, batch_size=5, seed=4, rank=1, world_size=2)
    built = {
        "epoch": (create("epoch", ctx, drop_last=False), EpochSampler(100, 5, seed=4, drop_last=False, rank=1,
                                                                         world_size=2)),
        "replacement": (create("replacement", ctx), ReplacementSampler(100, 5, seed=4, rank=1, world_size=2)),
        "srs": (create("srs", ctx, order="identity"),
                SequencedReplacementSampler(100, 5, seed=4, order="identity", rank=1, world_size=2)),
    }
    for name, (a, b) in built.items():
        assert type(a) is type(b) and len(a) == len(b)
        assert _draw(a, 25) == _draw(b, 25), name
    with pytest.raises(ValueError, match="order"):
        create("replacement", ctx, order="identity")


# ---------------------------------------------------------------------------------------------
# Epoch-wise sampling
# ---------------------------------------------------------------------------------------------


def test_epoch_sampler_draws_each_example_once_per_epoch():
    n, b = 103, 10
    s = EpochSampler(n, b, seed=0, drop_last=False)
    assert len(s) == 11
    perms = []
    for epoch in range(3):
        batches = list(s)
        assert [len(x) for x in batches] == [10] * 10 + [3]
        flat = sum(batches, [])
        assert sorted(flat) == list(range(n))
        perms.append(flat)
        assert s.effective_epoch == epoch + 1
    assert perms[0] != perms[1] != perms[2]
    dropped = EpochSampler(n, b, seed=0, drop_last=True)
    assert len(dropped) == 10
    first = sum(list(dropped), [])
    assert first == perms[0][:100]  # drop_last drops the tail of the same permutation
    # set_epoch moves to the start of an epoch; inside that epoch it is a no-op
    dropped.set_epoch(2)
    assert dropped.next_batch().indices.tolist() == perms[2][:10]
    dropped.set_epoch(2)
    assert dropped.next_batch().indices.tolist() == perms[2][10:20]
    assert dropped.effective_epoch == pytest.approx(2 + 2 / 10)


def test_epoch_sampler_last_batch_split_across_ranks():
    n, b, world = 23, 3, 3  # global batch 9: two full batches, then 5 split as 2, 2, 1
    ranks = [EpochSampler(n, b, seed=1, drop_last=False, rank=r, world_size=world) for r in range(world)]
    single = EpochSampler(n, world * b, seed=1, drop_last=False)
    assert len(single) == 3 and all(len(s) == 3 for s in ranks)
    lists = [list(s) for s in ranks]
    assert [len(x[-1]) for x in lists] == [2, 2, 1]
    for step, glob in enumerate(single):
        assert sum((lists[r][step] for r in range(world)), []) == glob


def test_epoch_sampler_uniform_first_position():
    # Each permutation is uniform: the first index of an epoch is uniform over the N examples.
    n, epochs = 8, 4000
    s = EpochSampler(n, 1, seed=0)
    firsts = []
    for _ in range(epochs):
        s.set_epoch(s._epoch + 1)
        firsts.append(int(s.next_batch().indices))
    counts = np.bincount(firsts, minlength=n)
    assert stats.chisquare(counts).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# Batched replacement sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, size", [(7, 3), (10, 5), (5, 3)], ids=["reject-rows", "repair", "dense"])
def test_distinct_draws_are_uniform_subsets(n, size):
    """Every C(n, size) subset equally likely, and each position's value uniform (rank slices)."""
    draws = _DistinctSlots(n, size, torch.Generator().manual_seed(0))
    k = 80 * math.comb(n, size)
    rows = np.stack([draws.next().copy() for _ in range(k)])
    assert all(len(set(r)) == size for r in rows.tolist())
    keys = np.sort(rows, axis=1) @ (n ** np.arange(size))
    _, counts = np.unique(keys, return_counts=True)
    assert len(counts) == math.comb(n, size)
    assert stats.chisquare(counts).pvalue > 1e-3
    for pos in (0, size - 1):
        assert stats.chisquare(np.bincount(rows[:, pos], minlength=n)).pvalue > 1e-3


def test_replacement_redraw_probability_is_b_over_n():
    n, b, steps = 1000, 10, 10000
    s = ReplacementSampler(n, b, seed=0)
    prev, hits = set(s.next_batch().indices.tolist()), 0
    for _ in range(steps):
        cur = s.next_batch().indices.tolist()
        hits += len(prev.intersection(cur))
        prev = set(cur)
    p, trials = b / n, steps * b
    se = math.sqrt(trials * p * (1 - p))
    assert abs(hits - trials * p) < 4 * se
    assert s.effective_epoch == pytest.approx((steps + 1) * b / n)


def test_replacement_draw_counts_are_binomial():
    n, b, steps = 500, 10, 2500  # 50 effective epochs
    s = ReplacementSampler(n, b, seed=1)
    counts = np.bincount(np.concatenate([s.next_batch().indices.numpy() for _ in range(steps)]), minlength=n)
    p = b / n
    var = steps * p * (1 - p)
    assert counts.mean() == pytest.approx(steps * p)
    assert abs(counts.var(ddof=1) / var - 1) < 4 * math.sqrt(2 / (n - 1))


# ---------------------------------------------------------------------------------------------
# Inside other training stacks: resume alignment, pickling, framework re-sharding, lazy ranks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("k", [0, 3, 7, 11])
def test_iteration_after_load_yields_the_rest_of_the_epoch(cls, k):
    n, b = 50, 7  # len 7 (drop_last) / round(50 / 7) = 7
    ref = cls(n, b, seed=4)
    passes = [list(ref) for _ in range(3)]
    flat = sum(passes, [])
    s = cls(n, b, seed=4)
    _draw(s, k)
    resumed = cls(n, b, seed=4)
    resumed.load_state_dict(_roundtrip(s.state_dict()))
    rest = list(resumed)
    assert len(rest) == len(ref) - k % len(ref)  # the epoch boundary stays where an unbroken loop has it
    assert rest == flat[k:k + len(rest)]
    assert list(resumed) == flat[k + len(rest):k + len(rest) + len(ref)]  # then whole epochs again


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_pickle_keeps_the_exact_position(cls):
    import pickle

    s = cls(40, 4, seed=9, rank=1, world_size=2)
    _draw(s, 6)
    it = iter(s)
    next(it)
    twin = pickle.loads(pickle.dumps(s))
    assert (twin.rank, twin.world_size) == (1, 2)
    assert _draw(twin, 12) == _draw(s, 12)
    lazy = pickle.loads(pickle.dumps(cls(40, 4, seed=9)))  # not resolved yet: stays lazy
    assert lazy.__dict__["_pending"] and _draw(lazy, 3) == _draw(cls(40, 4, seed=9), 3)
    assert isinstance(s, torch.utils.data.Sampler)


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_a_framework_injecting_its_sampler_gets_a_clear_error(cls):
    inner = torch.utils.data.DistributedSampler(range(10), num_replicas=2, rank=0)
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        cls(inner, 2)


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_ranks_resolve_at_first_use_without_a_process_group(cls):
    s = cls(40, 4, seed=1)
    assert s.__dict__["_pending"] and "first use" in repr(s)
    assert len(s) == len(cls(40, 4, seed=1, rank=0, world_size=1))
    assert (s.rank, s.world_size) == (0, 1) and not s.__dict__["_pending"]
    assert _draw(s, 3) == _draw(cls(40, 4, seed=1, rank=0, world_size=1), 3)


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("stop", [5, 9])
def test_loader_position_resumes_a_reading_ahead_loader_exactly(cls, stop):
    from sgdlab.sampling import LoaderPosition

    n, b = 48, 8  # len 6: stop 5 is mid-epoch, 9 mid-way through the second
    data = torch.utils.data.TensorDataset(torch.arange(n))

    def loader(sampler):  # two workers read 4 batches ahead
        return torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=2, prefetch_factor=2)

    unbroken = cls(n, b, seed=1)
    ref = [batch[0].tolist() for _ in range(3) for batch in loader(unbroken)]
    sampler = cls(n, b, seed=1)
    pos, got, dl = LoaderPosition(sampler), [], loader(sampler)
    while len(got) < stop:
        for batch in dl:
            got.append(batch[0].tolist())
            pos.advance()
            if len(got) == stop:
                break
    saved = _roundtrip(pos.state_dict())
    again = cls(n, b, seed=1)
    LoaderPosition(again).load_state_dict(saved)
    dl = loader(again)
    while len(got) < len(ref):
        got += [batch[0].tolist() for batch in dl]
    assert got == ref
