"""History-based baselines (online batch selection, prioritized sampling) and selective backprop."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from scipy import stats
from torch import nn

from sgdlab.regularize import SelectiveBackprop, create_loss_transform
from sgdlab.sampling import OnlineBatchSelection, PrioritizedSampler, SourceContext, create
from sgdlab.sampling.history import rank_probabilities


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- online batch selection ---------------------------------------------------------------------


def test_rank_probabilities_ratio_and_geometry():
    p = rank_probabilities(50, 100.0)
    assert float(p.sum()) == pytest.approx(1.0)
    assert float(p[0] / p[-1]) == pytest.approx(100.0)
    ratios = p[:-1] / p[1:]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 100.0 ** (1 / 49)))
    torch.testing.assert_close(rank_probabilities(7, 1.0), torch.full((7,), 1 / 7, dtype=torch.float64))


def test_obs_probabilities_follow_loss_ranks():
    n = 40
    obs = OnlineBatchSelection(n, 8, s_e=1e3, seed=0)
    torch.testing.assert_close(obs.probabilities(), torch.full((n,), 1 / n, dtype=torch.float64))  # all tied
    losses = torch.randperm(n, generator=torch.Generator().manual_seed(1)).float() + 0.5
    obs.observe(torch.arange(n), losses=losses)
    p = obs.probabilities()
    order = torch.argsort(losses, descending=True)
    torch.testing.assert_close(p[order], rank_probabilities(n, 1e3))
    assert float(p.max() / p.min()) == pytest.approx(1e3)
    assert int(p.argmax()) == int(losses.argmax())
    # ties share the mean probability of the ranks they occupy
    obs.observe(torch.tensor([0, 1]), losses=torch.tensor([100.0, 100.0]))
    p = obs.probabilities()
    ref = rank_probabilities(n, 1e3)
    assert float(p[0]) == pytest.approx(float(ref[:2].mean())) and float(p[1]) == pytest.approx(float(p[0]))


def test_obs_sampling_frequencies_chi_square():
    n = 6
    obs = OnlineBatchSelection(n, 50, s_e=20.0, seed=3)
    obs.observe(torch.arange(n), losses=torch.tensor([0.1, 5.0, 0.3, 2.0, 1.0, 0.7]))
    counts = torch.zeros(n)
    for _ in range(200):
        batch = obs.next_batch()
        assert batch.weights is None  # no reweighting
        counts += torch.bincount(batch.indices, minlength=n)
    expected = counts.sum() * obs.probabilities()
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    assert counts[1] > counts[0]


def test_obs_probabilities_follow_the_decay_without_feedback():
    """With no ``observe`` between batches the probabilities must still track the decaying s_e."""
    n, b = 100, 10
    obs = OnlineBatchSelection(n, b, s_e=100.0, s_e_end=1.0, decay_epochs=1.0, seed=3)
    obs.observe(torch.arange(n), losses=torch.arange(n, dtype=torch.float64))  # distinct ranks
    p = obs.probabilities()
    assert float(p.max() / p.min()) == pytest.approx(100.0)
    for _ in range(20):  # two epochs: s_e has decayed to 1
        obs.next_batch()
    p = obs.probabilities()
    assert obs.s_e == pytest.approx(1.0)
    assert float(p.max() / p.min()) == pytest.approx(1.0)
    # a reloaded copy draws exactly what the original draws next
    twin = OnlineBatchSelection(n, b, s_e=100.0, s_e_end=1.0, decay_epochs=1.0, seed=3)
    twin.load_state_dict(obs.state_dict())
    assert torch.equal(twin.next_batch().indices, obs.next_batch().indices)


def test_obs_decay_and_recompute():
    n, b = 100, 10
    obs = OnlineBatchSelection(n, b, s_e=1e4, s_e_end=1.0, decay_epochs=2.0)
    assert obs.s_e == pytest.approx(1e4)
    for _ in range(10):  # one epoch
        obs.next_batch()
    assert obs.epoch == pytest.approx(1.0) and obs.s_e == pytest.approx(100.0)
    for _ in range(30):
        obs.next_batch()
    assert obs.s_e == pytest.approx(1.0) and obs.metrics()["obs_s_e"] == pytest.approx(1.0)

    calls = []

    def loss_fn(idx):
        calls.append(idx.clone())
        return idx.float()  # example i has loss i

    obs = OnlineBatchSelection(n, b, s_e=50.0, loss_fn=loss_fn, recompute_every=2, chunk=32)
    obs.next_batch()
    assert sum(len(c) for c in calls) == n and max(len(c) for c in calls) == 32
    assert int(obs.probabilities().argmax()) == n - 1
    for _ in range(19):
        obs.next_batch()
    assert sum(len(c) for c in calls) == n  # not yet: 2 epochs = 20 steps
    obs.next_batch()
    assert sum(len(c) for c in calls) == 2 * n
    with pytest.raises(ValueError, match="loss_fn"):
        OnlineBatchSelection(n, b, recompute_every=1)
    with pytest.raises(ValueError, match="s_e"):
        OnlineBatchSelection(n, b, s_e=0.5)
    with pytest.raises(ValueError, match="together"):
        OnlineBatchSelection(n, b, s_e_end=1.0)


def _drive(source, steps, loss_of):
    out = []
    for _ in range(steps):
        batch = source.next_batch()
        source.observe(batch.indices, losses=loss_of(batch.indices))
        out.append((batch.indices.clone(), None if batch.weights is None else batch.weights.clone()))
    return out


@pytest.mark.parametrize("cls,kw", [(OnlineBatchSelection, {"s_e": 30.0, "s_e_end": 2.0, "decay_epochs": 3.0}),
                                    (PrioritizedSampler, {"alpha": 0.7, "beta": 0.3, "beta_steps": 20})])
def test_history_samplers_resume_and_determinism(cls, kw):
    def loss_of(idx):
        return ((idx * 7919) % 23).float() / 3

    full = _drive(cls(60, 5, seed=4, **kw), 25, loss_of)
    again = _drive(cls(60, 5, seed=4, **kw), 25, loss_of)
    other = _drive(cls(60, 5, seed=5, **kw), 25, loss_of)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other))
    s = cls(60, 5, seed=4, **kw)
    _drive(s, 11, loss_of)
    fresh = cls(60, 5, seed=4, **kw)
    fresh.load_state_dict(_roundtrip(s.state_dict()))
    for (i1, w1), (i2, w2) in zip(full[11:], _drive(fresh, 14, loss_of)):
        assert torch.equal(i1, i2)
        assert (w1 is None and w2 is None) or torch.equal(w1, w2)
    with pytest.raises(ValueError, match="num_samples"):
        cls(61, 5, **kw).load_state_dict(s.state_dict())


# -- prioritized --------------------------------------------------------------------------------


def test_prioritized_law_and_weights():
    n = 8
    ps = PrioritizedSampler(n, 4, alpha=0.5, beta=0.4, beta_steps=10, eps=0.01, seed=0)
    torch.testing.assert_close(ps.probabilities(), torch.full((n,), 1 / n, dtype=torch.float64))
    losses = torch.tensor([1.0, -3.0, 0.0, 2.0])
    ps.observe(torch.tensor([0, 1, 2, 3]), losses=losses)
    pr = torch.tensor([1.01, 3.01, 0.01, 2.01, 3.01, 3.01, 3.01, 3.01], dtype=torch.float64)  # unseen: max priority
    torch.testing.assert_close(ps.priorities, pr)
    p = pr.sqrt() / pr.sqrt().sum()
    torch.testing.assert_close(ps.probabilities(), p)
    batch = ps.next_batch()
    w = (n * p[batch.indices]).pow(-0.4)
    torch.testing.assert_close(batch.weights.double(), w / w.max(), rtol=1e-6, atol=0)
    assert float(batch.weights.max()) == pytest.approx(1.0)
    # beta anneals linearly to 1 over beta_steps
    assert ps.beta == pytest.approx(0.4 + 0.6 * 1 / 10)
    for _ in range(20):
        ps.next_batch()
    assert ps.beta == 1.0
    g = PrioritizedSampler(n, 4, alpha=1.0, beta=1.0, normalize="global")
    g.observe(torch.arange(n), losses=torch.arange(1.0, n + 1))
    idx = torch.tensor([0, 7])
    pg = g.probabilities()
    torch.testing.assert_close(g.weights_for(idx), (n * pg[idx]).pow(-1.0) / (n * pg.min()).pow(-1.0))
    with pytest.raises(ValueError, match="beta"):
        PrioritizedSampler(n, 4, beta=1.5)
    with pytest.raises(ValueError, match="normalize"):
        PrioritizedSampler(n, 4, normalize="max")


def test_prioritized_frequencies_chi_square():
    n = 5
    ps = PrioritizedSampler(n, 40, alpha=0.8, seed=2)
    ps.observe(torch.arange(n), losses=torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]))
    counts = torch.zeros(n)
    for _ in range(150):
        counts += torch.bincount(ps.next_batch().indices, minlength=n)
    expected = counts.sum() * ps.probabilities()
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_registry_factories():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(30, 4), torch.randint(3, (30,))
    ctx = SourceContext(num_samples=30, batch_size=5, seed=1, model=net, train_x=x, train_y=y)
    obs = create("online_batch_selection", ctx, s_e=10.0, recompute_every=1.0)
    assert isinstance(obs, OnlineBatchSelection) and obs.wants_losses
    obs.next_batch()
    with torch.no_grad():
        ref = nn.functional.cross_entropy(net(x), y, reduction="none")
    torch.testing.assert_close(obs.losses.float(), ref)
    pr = create("prioritized", ctx, alpha=0.5, beta_steps=100)
    assert isinstance(pr, PrioritizedSampler) and pr.wants_losses and len(pr) == 6


# -- selective backprop -------------------------------------------------------------------------


def test_selective_backprop_keeps_top_fraction():
    sb = SelectiveBackprop(fraction=0.3)
    losses = torch.tensor([0.5, 3.0, 1.0, 0.2, 2.0, 0.1, 0.0, 4.0, 0.3, 0.4], requires_grad=True)
    out = sb(losses)
    kept = torch.tensor([1, 4, 7])  # the 3 largest
    assert out.shape == losses.shape
    assert float(out.detach().mean()) == pytest.approx(float(losses.detach()[kept].mean()))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[kept] = True
    assert (out[~mask] == 0).all()
    out.mean().backward()
    expect = torch.zeros(10)
    expect[kept] = 1 / 3
    torch.testing.assert_close(losses.grad, expect)
    assert sb.metrics() == {"sb_kept": 3.0, "sb_threshold": 2.0}
    torch.testing.assert_close(SelectiveBackprop(1.0)(losses.detach()), losses.detach())
    assert SelectiveBackprop(0.01)(losses.detach()).count_nonzero() == 1
    with pytest.raises(ValueError, match="fraction"):
        SelectiveBackprop(0.0)
    with pytest.raises(ValueError, match="per-example"):
        sb(torch.tensor(1.0))
    t = create_loss_transform("selective_backprop", seed=0, fraction=0.5)
    assert isinstance(t, SelectiveBackprop) and t.fraction == 0.5
    t.load_state_dict(_roundtrip(SelectiveBackprop(0.25).state_dict()))
    assert t.fraction == 0.25


# -- engine integration -------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [{"name": "online_batch_selection", "s_e": 10.0},
                                     {"name": "prioritized", "beta_steps": 20}])
def test_engine_runs_history_samplers(tmp_path, sampler):
    train = pytest.importorskip("sgdlab.train")
    cfg = {"seed": 0, "device": "cpu", "duration": "20 steps",
           "data": {"name": "synthetic", "num_samples": 120, "shape": [40], "num_classes": 3, "seed": 0},
           "model": {"name": "mlp"}, "sampler": {**sampler, "batch_size": 12},
           "loss": {"name": "cross_entropy", "selective_backprop": {"fraction": 0.5}},
           "optim": {"name": "sgd", "lr": 0.1}, "eval": {"every": 0}, "checkpoint": {"every": 0},
           "log": {"every": 5, "progress": False}}
    summary = train.run(cfg, tmp_path / "run")
    assert summary["steps"] == 20
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("sb_kept" in r and r["sb_kept"] == 6.0 for r in rows)
    assert math.isfinite(rows[-1].get("loss", rows[-1].get("train_loss", 0.0)))
