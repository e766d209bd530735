"""Importance sampling with the upper bound (Katharopoulos & Fleuret 2018): closed forms, laws, switch, DDP."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from sgdlab.sampling import ImportanceSampler, SourceContext, create
from sgdlab.sampling.importance import (
    default_tau_th,
    model_scorer,
    normalize_scores,
    per_example_loss,
    smooth_scores,
    tau,
    unbiased_weights,
    upper_bound_scores,
)


def _autograd_norms(logits, targets, loss):
    z = logits.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(per_example_loss(z, targets, loss).sum(), z)
    return g.flatten(1).norm(dim=1)


# -- eq. 19 closed forms ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_closed_form_hard_and_soft(seed):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(17, 6, generator=g, dtype=torch.float64)
    y = torch.randint(6, (17,), generator=g)
    expect = (torch.softmax(z, 1) - F.one_hot(y, 6)).norm(dim=1)
    torch.testing.assert_close(upper_bound_scores(z, y), expect)
    torch.testing.assert_close(upper_bound_scores(z, y), _autograd_norms(z, y, "cross_entropy"))
    # the per-example loss is the usual cross-entropy
    torch.testing.assert_close(per_example_loss(z, y), F.cross_entropy(z, y, reduction="none"))
    soft = torch.softmax(torch.randn(17, 6, generator=g, dtype=torch.float64), 1)
    torch.testing.assert_close(upper_bound_scores(z, soft), (torch.softmax(z, 1) - soft).norm(dim=1))
    torch.testing.assert_close(upper_bound_scores(z, soft), _autograd_norms(z, soft, "cross_entropy"))
    onehot = F.one_hot(y, 6).double()
    torch.testing.assert_close(upper_bound_scores(z, onehot), upper_bound_scores(z, y))


def test_bce_and_mse_closed_forms():
    g = torch.Generator().manual_seed(3)
    z = 2 * torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.rand(11, 5, generator=g, dtype=torch.float64)
    bce = upper_bound_scores(z, y, "bce")
    torch.testing.assert_close(bce, (torch.sigmoid(z) - y).norm(dim=1) / 5)
    torch.testing.assert_close(bce, _autograd_norms(z, y, "bce"))
    mse = upper_bound_scores(z, y, "mse")
    torch.testing.assert_close(mse, (z - y).norm(dim=1))
    torch.testing.assert_close(mse, _autograd_norms(z, y, "mse"))
    # class-index targets are taken one-hot
    idx = torch.randint(5, (11,), generator=g)
    torch.testing.assert_close(upper_bound_scores(z, idx, "mse"), (z - F.one_hot(idx, 5)).norm(dim=1))
    torch.testing.assert_close(upper_bound_scores(z, idx, "bce"), _autograd_norms(z, idx, "bce"))
    # torch's mean-reduced MSE differs by the stated constant 2/K
    z2 = z.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(F.mse_loss(z2, y, reduction="none").mean(1).sum(), z2)
    torch.testing.assert_close(gr.norm(dim=1), 2 / 5 * mse)


def test_callable_loss_uses_autograd_on_logits_only():
    def smooth_l1(z, y):
        return F.smooth_l1_loss(z, y, reduction="none").sum(1)

    g = torch.Generator().manual_seed(4)
    z = 2 * torch.randn(9, 3, generator=g)
    y = torch.randn(9, 3, generator=g)
    d = z - y
    expect = torch.where(d.abs() < 1, d, d.sign()).norm(dim=1)
    out = upper_bound_scores(z, y, smooth_l1)
    torch.testing.assert_close(out, expect)
    assert not out.requires_grad
    # logits attached to a graph are not backpropagated through
    w = torch.randn(3, 3, requires_grad=True)
    out = upper_bound_scores(z @ w, y, smooth_l1)
    assert w.grad is None and not out.requires_grad


def test_upper_bound_bad_input():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="loss"):
        upper_bound_scores(z, torch.zeros(4, dtype=torch.long), "hinge")
    with pytest.raises(ValueError, match="targets"):
        upper_bound_scores(z, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="targets"):
        upper_bound_scores(z, torch.zeros(4, 2))


# -- tau and weights ----------------------------------------------------------------------------


def test_tau_identities():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = s / s.sum()
    b = 4
    assert tau(s, "variance") == pytest.approx(b * 0.30)  # g = .1,.2,.3,.4; sum g^2 = .3
    assert tau(s, "std") == pytest.approx(math.sqrt(1.2))
    u = torch.full((b,), 1 / b)
    lhs = 1 - (g - u).pow(2).sum() / g.pow(2).sum()
    assert float(lhs) == pytest.approx(1 / (b * float(g.pow(2).sum())))
    assert tau(s, "variance") == pytest.approx(1 / float(lhs))
    assert tau(torch.ones(7)) == pytest.approx(1.0)
    assert tau(torch.tensor([0.0, 0.0, 5.0]), "variance") == pytest.approx(3.0)  # one example: tau = B
    assert tau(3 * s) == pytest.approx(tau(s))  # scale-free
    with pytest.raises(ValueError, match="kind"):
        tau(s, "bogus")
    with pytest.raises(ValueError, match="non-negative"):
        tau(torch.tensor([1.0, -1.0]))


def test_unbiased_weights_identity():
    s = torch.tensor([0.5, 2.0, 1.0, 4.5, 2.0])
    g = normalize_scores(s)
    w = unbiased_weights(s, torch.arange(5))
    torch.testing.assert_close(w.double(), 1 / (5 * g), rtol=1e-6, atol=0)
    # weighted presample sum of the scores (expectation under g, times B) equals the plain sum
    assert float((g * w.double() * s.double()).sum() * 5) == pytest.approx(float(s.sum()))
    x = torch.randn(5, dtype=torch.float64)
    assert float((g * w.double() * x).sum()) == pytest.approx(float(x.mean()))
    with pytest.raises(ValueError, match="zero probability"):
        unbiased_weights(torch.tensor([0.0, 1.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="chosen"):
        unbiased_weights(s, torch.tensor([5]))


def test_default_tau_th():
    assert default_tau_th(640, 128) == pytest.approx((640 + 3 * 128) / (3 * 128))
    sampler = ImportanceSampler(1000, 16, presample=100, score_fn=lambda i: torch.ones(len(i)))
    assert sampler.tau_th == pytest.approx((100 + 48) / 48)
    assert default_tau_th(100, 16, cost_ratio=1.0) == pytest.approx((100 + 32) / 32)


def test_smoothing():
    s = torch.tensor([0.0, 1.0, 3.0])
    torch.testing.assert_close(smooth_scores(s, 0.5), s.double() + 0.5)
    torch.testing.assert_close(smooth_scores(s, {"kind": "adaptive", "fraction": 1.0}), s.double() + 4 / 3)
    torch.testing.assert_close(smooth_scores(s, {"kind": "power", "exponent": 0.5}), s.double().sqrt())
    assert tau(smooth_scores(s, 10.0)) < tau(s)
    with pytest.raises(ValueError, match="smoothing"):
        smooth_scores(s, {"kind": "power"})
    with pytest.raises(ValueError, match="smoothing"):
        ImportanceSampler(10, 2, presample=5, score_fn=len, smoothing="lots")


# -- the sampler --------------------------------------------------------------------------------


def _linear_problem(n=24, d=3, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(k, (n,), generator=g)
    model = nn.Linear(d, k).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=g))
    per_ex = []
    for i in range(n):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_ex.append(torch.cat([model.weight.grad.reshape(-1), model.bias.grad]))
    return x, y, model, torch.stack(per_ex)


def _active_sampler(n, b, presample, score_fn, **kw):
    s = ImportanceSampler(n, b, presample=presample, score_fn=score_fn, tau_th=0.0, **kw)
    s.next_batch()  # uniform first step (tau starts at 0)
    s.observe(torch.arange(b), scores=torch.rand(b) + 0.1)
    assert s.tau > 0
    return s


def test_weighted_gradient_is_unbiased_monte_carlo():
    x, y, model, grads = _linear_problem()
    scores = upper_bound_scores(model(x).detach(), y)
    # fixed presample: the weighted mini-batch gradient averages to the presample's mean gradient
    gen = torch.Generator().manual_seed(1)
    pre = torch.randint(len(y), (16,), generator=gen)
    g = normalize_scores(scores[pre])
    draws = 4000
    slots = torch.multinomial(g.repeat(draws, 1), 4, replacement=True, generator=gen)
    w = unbiased_weights(scores[pre], slots.reshape(-1)).double().reshape(draws, 4)
    est = (w.unsqueeze(-1) * grads[pre][slots]).mean(1)
    target = grads[pre].mean(0)
    se = est.std(0) / math.sqrt(draws)
    assert ((est.mean(0) - target).abs() <= 4.5 * se + 1e-12).all()
    # and the biased alternative (no weights) is detectably off
    plain = grads[pre][slots].mean(1)
    assert ((plain.mean(0) - target).abs() > 6 * plain.std(0) / math.sqrt(draws)).any()

    # the sampler end to end: presample and resample together are unbiased for the full-data gradient
    sampler = _active_sampler(len(y), 4, 16, lambda idx: scores[idx])
    ests = []
    for _ in range(3000):
        batch = sampler.next_batch()
        assert sampler.active
        ests.append((batch.weights.double().unsqueeze(-1) * grads[batch.indices]).mean(0))
    ests = torch.stack(ests)
    se = ests.std(0) / math.sqrt(len(ests))
    assert ((ests.mean(0) - grads.mean(0)).abs() <= 4.5 * se).all()


def test_resampling_frequencies_follow_scores():
    # a huge N makes presampled indices distinct, so each draw maps back to its presample slot
    seen = []

    def score_fn(idx):
        seen.append(idx.clone())
        return torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])

    sampler = _active_sampler(10**9, 5, 5, score_fn)  # the batch may not exceed the presample
    counts = torch.zeros(5)
    for _ in range(1000):
        batch = sampler.next_batch()
        pre = seen[-1]
        slot = (batch.indices.unsqueeze(1) == pre.unsqueeze(0)).float().argmax(1)
        counts += torch.bincount(slot, minlength=5)
        g = normalize_scores(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]))
        torch.testing.assert_close(batch.weights, (1 / (5 * g[slot])).float())
    expected = counts.sum() * torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]) / 20
    chi2 = stats.chisquare(counts.numpy(), expected.numpy())
    assert chi2.pvalue > 1e-3
    assert all(len(p) == 5 for p in seen)


def test_presample_is_uniform_with_replacement():
    seen = []

    def score_fn(idx):
        seen.append(idx.clone())
        return torch.ones(len(idx))

    sampler = ImportanceSampler(7, 3, presample=10, score_fn=score_fn, tau_th=0.0)
    sampler.observe(torch.arange(3), scores=torch.tensor([1.0, 2.0, 3.0]))
    for _ in range(300):
        sampler.next_batch()
    allidx = torch.cat(seen)
    assert len(allidx) == 3000
    assert stats.chisquare(torch.bincount(allidx, minlength=7).numpy()).pvalue > 1e-3
    assert any(len(torch.unique(p)) < 10 for p in seen)  # 10 draws from 7: repeats


def test_switch_constant_scores_never_activate():
    calls = []
    sampler = ImportanceSampler(500, 10, presample=40, score_fn=lambda i: calls.append(i) or torch.ones(len(i)))
    for _ in range(200):
        batch = sampler.next_batch()
        assert batch.weights is None and len(batch) == 10
        sampler.observe(batch.indices, losses=torch.ones(10), scores=torch.full((10,), 0.3))
        assert not sampler.active
    assert not calls
    assert sampler.tau == pytest.approx(1 - 0.9 ** 200)  # EMA of tau = 1 from 0
    assert sampler.metrics()["is_active"] == 0.0


def test_switch_turns_on_after_ema_passes_threshold():
    b, presample = 10, 40
    skew = torch.tensor([50.0] + [1.0] * (b - 1))
    new = tau(skew)
    th = default_tau_th(presample, b)
    assert new > th
    k_expected = next(k for k in range(1, 100) if new * (1 - 0.9 ** k) > th)
    pre_scores = []

    def score_fn(idx):
        s = torch.ones(len(idx))
        s[0] = 100.0
        pre_scores.append(s)
        return s

    sampler = ImportanceSampler(500, b, presample=presample, score_fn=score_fn)
    first_active = None
    for step in range(1, 60):
        batch = sampler.next_batch()
        if sampler.active:
            first_active = step
            assert batch.weights is not None and len(batch) == b
            break
        sampler.observe(batch.indices, scores=skew)
    assert first_active == k_expected + 1
    ema = new * (1 - 0.9 ** k_expected)
    # once active, tau is updated from the presample's scores and observed scores are ignored
    assert sampler.tau == pytest.approx(0.9 * ema + 0.1 * tau(pre_scores[-1]))
    before = sampler.tau
    sampler.observe(batch.indices, scores=torch.ones(b))
    assert sampler.tau == before
    m = sampler.metrics()
    assert m["is_active"] == 1.0 and m["is_tau"] == pytest.approx(before)
    assert m["is_weight_max"] == pytest.approx(float(batch.weights.max()))


def test_exact_resume_weights_only():
    def make():
        return ImportanceSampler(300, 8, presample=30, score_fn=lambda i: (i % 13).float() ** 2 + 0.1,
                                 tau_th=1.3, seed=5)

    def run(s, steps):
        out = []
        for _ in range(steps):
            batch = s.next_batch()
            s.observe(batch.indices, scores=(batch.indices % 5).float() ** 3 + 0.01)
            out.append((batch.indices.clone(), None if batch.weights is None else batch.weights.clone(),
                        s.tau, s.active))
        return out

    ref = make()
    full = run(ref, 30)
    assert any(a for *_, a in full) and not all(a for *_, a in full)
    for split in (12, 18):  # while uniform, and while importance sampling
        s = make()
        run(s, split)
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        buf.seek(0)
        fresh = make()
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert fresh.metrics() == s.metrics()
        rest = run(fresh, 30 - split)
        for (i1, w1, t1, a1), (i2, w2, t2, a2) in zip(full[split:], rest):
            assert torch.equal(i1, i2) and t1 == t2 and a1 == a2
            assert (w1 is None and w2 is None) or torch.equal(w1, w2)


def test_sampler_validation():
    with pytest.raises(ValueError, match="presample"):
        ImportanceSampler(10, 2, presample=0, score_fn=len)
    with pytest.raises(ValueError, match="presample .2. must be at least the global batch size .4"):
        ImportanceSampler(10, 2, presample=2, score_fn=len, rank=0, world_size=2)
    with pytest.raises(ValueError, match="score_fn"):
        ImportanceSampler(10, 2, presample=4, score_fn=None)
    with pytest.raises(ValueError, match="tau_momentum"):
        ImportanceSampler(10, 2, presample=4, score_fn=len, tau_momentum=1.0)
    with pytest.raises(ValueError, match="tau_kind"):
        ImportanceSampler(10, 2, presample=4, score_fn=len, tau_kind="var")
    with pytest.raises(ValueError, match="divisible"):
        ImportanceSampler(10, 2, presample=5, score_fn=len, rank=0, world_size=2)
    s = ImportanceSampler(10, 2, presample=4, score_fn=lambda i: torch.ones(3), tau_th=0.0)
    s.observe(torch.arange(2), scores=torch.tensor([1.0, 5.0]))
    with pytest.raises(ValueError, match="score_fn returned"):
        s.next_batch()


# -- scoring a model ----------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


def test_model_scorer_modes_chunks_and_scores():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(20, 5)
    y = torch.randint(3, (20,))
    net.train()
    net(x)  # populate running stats
    fetch = lambda idx: (x[idx], y[idx])
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    ub = model_scorer(net, fetch)(idx)
    assert net.training and net.body[3].training  # modes restored
    net.eval()
    with torch.no_grad():
        z = net(x[idx])
    net.train()
    torch.testing.assert_close(ub, upper_bound_scores(z, y[idx]))
    torch.testing.assert_close(model_scorer(net, fetch, chunk_size=3)(idx), ub)
    torch.testing.assert_close(model_scorer(net, fetch, score="loss")(idx), F.cross_entropy(z, y[idx], reduction="none"))
    gn = model_scorer(net, fetch, score="gradnorm", chunk_size=5)(idx)
    net.eval()
    ref = []
    for i in idx:
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm())
    torch.testing.assert_close(gn, torch.stack(ref), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="score"):
        model_scorer(net, fetch, score="hessian")


def test_registry_factory_builds_a_working_sampler():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(50, 4), torch.randint(3, (50,))
    ctx = SourceContext(num_samples=50, batch_size=5, seed=2, model=net, train_x=x, train_y=y,
                        transform=lambda t: 2 * t)
    s = create("importance", ctx, presample=20, tau_th=0.0, chunk_size=7)
    assert isinstance(s, ImportanceSampler) and s.wants_scores
    s.observe(torch.arange(5), scores=torch.rand(5))
    batch = s.next_batch()
    assert s.active and len(batch) == 5 and batch.weights is not None
    # the scorer saw the transformed inputs
    with torch.no_grad():
        z = net(2 * x[batch.indices])
    s2 = create("importance", ctx, presample=20, tau_th=0.0, score="loss")
    assert s2.tau_th == 0.0 and z.shape == (5, 3)
    with pytest.raises(ValueError):
        create("importance", SourceContext(num_samples=50, batch_size=5))


# -- DDP: two ranks on CPU with gloo ----------------------------------------------------------


def _ddp_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        calls = []

        def score_fn(idx):
            calls.append(len(idx))
            return (idx % 7 + 1).float() ** 2

        s = ImportanceSampler(1000, 4, presample=12, score_fn=score_fn, tau_th=0.5, seed=3)
        out = []
        for _ in range(8):
            batch = s.next_batch()
            s.observe(batch.indices, scores=(batch.indices % 3 + 1).float() ** 3)
            out.append({"idx": batch.indices, "w": batch.weights, "tau": s.tau, "active": s.active})
        torch.save({"steps": out, "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_identical_global_batches():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        # fork keeps the test fast (no re-import of torch); the workers only use CPU tensors and gloo
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True,
                           start_method=method)
        r0 = torch.load(os.path.join(d, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(d, "rank1.pt"), weights_only=True)
    assert r0["calls"] and all(c == 6 for c in r0["calls"] + r1["calls"])  # each rank scores half
    # a single process with the global batch (8) and the same presample draws the same global batches
    single = ImportanceSampler(1000, 8, presample=12, score_fn=lambda i: (i % 7 + 1).float() ** 2,
                               tau_th=0.5, seed=3)
    actives = []
    for a, b in zip(r0["steps"], r1["steps"]):
        batch = single.next_batch()
        single.observe(batch.indices, scores=(batch.indices % 3 + 1).float() ** 3)
        assert a["tau"] == b["tau"] == pytest.approx(single.tau)
        assert a["active"] == b["active"] == single.active
        torch.testing.assert_close(torch.cat([a["idx"], b["idx"]]), batch.indices)
        if single.active:
            torch.testing.assert_close(torch.cat([a["w"], b["w"]]), batch.weights)
        actives.append(single.active)
    assert any(actives) and not all(actives)


# -- engine integration -------------------------------------------------------------------------


def test_engine_runs_importance_sampler(tmp_path):
    train = pytest.importorskip("sgdlab.train")
    cfg = {"seed": 0, "device": "cpu", "duration": "30 steps",
           "data": {"name": "synthetic", "num_samples": 200, "shape": [40], "num_classes": 3, "seed": 0},
           "model": {"name": "mlp"}, "sampler": {"name": "importance", "batch_size": 16, "presample": 48,
                                                 "tau_th": 1.0},
           "optim": {"name": "sgd", "lr": 0.1}, "eval": {"every": 0}, "checkpoint": {"every": 0},
           "log": {"every": 1, "progress": False}}
    summary = train.run(cfg, tmp_path / "run")
    assert summary["steps"] == 30
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "is_tau" in r]
    assert rows and any(r["is_active"] == 1.0 for r in rows) and rows[0]["is_active"] == 0.0


def test_warns_when_observe_is_never_called():
    from sgdlab.sampling.importance import OBSERVE_WARNING_STEPS

    quiet = ImportanceSampler(100, 4, presample=8, score_fn=lambda i: torch.ones(len(i)))
    lonely = ImportanceSampler(100, 4, presample=8, score_fn=lambda i: torch.ones(len(i)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(OBSERVE_WARNING_STEPS + 5):
            b = quiet.next_batch()
            quiet.observe(b.indices, scores=torch.ones(4))
        for _ in range(OBSERVE_WARNING_STEPS - 1):
            lonely.next_batch()
    with pytest.warns(UserWarning, match="observe.. was never called"):
        lonely.next_batch()
