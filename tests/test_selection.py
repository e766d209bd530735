"""InfoBatch, RHO-LOSS and windowed selective backprop: exact semantics, resume and data parallelism."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from sgdlab.regularize import SelectiveBackprop, create_loss_transform
from sgdlab.sampling import InfoBatch, RhoLoss, infobatch_weights
from sgdlab.sampling.selection import holdout_split, train_irreducible


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _fake_loss(idx: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic 'training loss' of examples ``idx`` at step ``step`` (varied, no ties)."""
    i = idx.double()
    return (torch.sin(i * 1.7 + step * 0.31) + 1.2) * (1.0 + 0.01 * i)


# -- InfoBatch ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prune", [0.5, 0.3])
def test_infobatch_expected_weighted_gradient_is_full_data_gradient(prune):
    """Enumerate every drop pattern of the well-learned examples: E[sum_i w_i g_i] = sum_i g_i exactly."""
    losses = torch.tensor([0.1, 2.0, 0.3, float("nan"), 1.5, 0.2, 0.7], dtype=torch.float64)
    n = losses.numel()
    seen = ~torch.isnan(losses)
    well = (seen & (losses < losses[seen].mean())).nonzero().reshape(-1).tolist()
    assert well == [0, 2, 5, 6]  # mean of the observed = 0.8
    g = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(3, dtype=torch.float64)
    total_p = 0.0
    for pattern in itertools.product([False, True], repeat=len(well)):
        dropped = torch.zeros(n, dtype=torch.bool)
        dropped[[w for w, d in zip(well, pattern) if d]] = True
        p = math.prod(prune if d else 1 - prune for d in pattern)
        w = infobatch_weights(losses, prune, dropped)
        assert (w[dropped] == 0).all() and (w[~dropped] > 0).all()
        expected += p * (w[:, None] * g).sum(0)
        total_p += p
    assert total_p == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(expected, g.sum(0), rtol=0, atol=1e-12)
    # the examples that are not well learned (and the never-observed one) are never dropped
    w = infobatch_weights(losses, prune, torch.ones(n, dtype=torch.bool))
    assert w.tolist() == [0, 1, 0, 1, 1, 0, 0]


def _drive(sampler: InfoBatch, steps: int, start: int = 0):
    """Draw ``steps`` batches, feeding back the fake losses; return the (indices, weights) drawn."""
    out = []
    for t in range(start, start + steps):
        b = sampler.next_batch()
        out.append((b.indices.clone(), b.weights.clone()))
        sampler.observe(b.indices, losses=_fake_loss(b.indices, t))
    return out


def test_infobatch_epochs_prune_with_the_right_frequency_and_end_on_full_data():
    n, b = 200, 10
    s = InfoBatch(n, b, prune=0.5, delta=0.75, epochs=8, seed=3)
    assert len(s) == 20 and s.epoch_steps == 20  # nothing observed yet: the first epoch is full
    seen_per_epoch, kept_fraction = {}, []
    t = 0
    while t < 400:
        batch = _drive(s, 1, t)[0]
        t += 1
        e = s.epoch
        if e == 8:
            break
        seen_per_epoch.setdefault(e, []).append(batch)
        if s.step == s.epoch_steps and 1 <= e <= 5:
            kept_fraction.append(s.metrics()["ib_kept_fraction"])
    assert sorted(seen_per_epoch) == list(range(8))
    for e, batches in seen_per_epoch.items():
        idx = torch.cat([x for x, _ in batches])
        w = torch.cat([x for _, x in batches])
        assert all(x.numel() == b for x, _ in batches)  # every batch is full
        assert set(w.tolist()) <= {1.0, 2.0}
        if e == 0 or e >= 6:  # first epoch (nothing observed) and the last 1 - delta = 25% of 8 epochs
            assert sorted(idx.tolist()) == list(range(n)) and (w == 1).all()
            assert len(batches) == n // b
        else:
            assert len(batches) < n // b  # pruned
            assert set(range(n)) > set(idx.tolist())
            assert (w == 2.0).any()
    # about half of the below-mean examples are dropped: each pruning epoch keeps 1 - 0.5 * P(l < mean)
    assert 0.6 < sum(kept_fraction) / len(kept_fraction) < 0.9


def test_infobatch_drop_probability_is_prune():
    """Over many epochs with fixed losses every below-mean example is dropped with frequency ``prune``."""
    n, prune, epochs = 40, 0.3, 400
    s = InfoBatch(n, 8, prune=prune, delta=1.0, epochs=epochs, seed=0)
    losses = torch.arange(n, dtype=torch.float64)
    s.losses = losses.clone()
    drops = torch.zeros(n)
    for e in range(epochs):
        s.epoch = e
        s._plan()
        kept = torch.zeros(n, dtype=torch.bool)
        kept[s._order] = True
        drops += (~kept).float()
    well = losses < losses.mean()
    assert (drops[~well] == 0).all()
    freq = drops[well] / epochs
    se = math.sqrt(prune * (1 - prune) / (epochs * int(well.sum())))
    assert abs(float(freq.mean()) - prune) < 4 * se


def test_infobatch_resumes_bit_exactly_mid_epoch():
    a = InfoBatch(101, 7, prune=0.5, delta=0.875, epochs=6, seed=11)
    _drive(a, 23)  # into the second (pruned) epoch
    assert a.epoch == 1 and 0 < a.step < a.epoch_steps
    b = InfoBatch(101, 7, prune=0.5, delta=0.875, epochs=6, seed=11)
    b.load_state_dict(_roundtrip(a.state_dict()))
    ra, rb = _drive(a, 50, 23), _drive(b, 50, 23)
    for (ia, wa), (ib, wb) in zip(ra, rb):
        assert torch.equal(ia, ib) and torch.equal(wa, wb)
    assert torch.equal(a.losses, b.losses)
    with pytest.raises(ValueError, match="prune"):
        InfoBatch(101, 7, prune=0.4, epochs=6, seed=11).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="prune"):
        InfoBatch(10, 2, prune=1.0, epochs=3)
    with pytest.raises(ValueError, match="epochs"):
        InfoBatch(10, 2, epochs=0)


def test_infobatch_is_a_batch_sampler():
    s = InfoBatch(50, 5, epochs=4, seed=0)
    first = list(s)
    assert len(first) == 10 and sorted(i for b in first for i in b) == list(range(50))
    for i, batch in enumerate(first):
        s.observe(torch.tensor(batch), losses=_fake_loss(torch.tensor(batch), i))
    second = list(s)
    assert len(second) < 10 and s.last_weights is not None


def _infobatch_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        s = InfoBatch(90, 5, prune=0.5, delta=0.8, epochs=5, seed=4)
        got = []
        for t in range(60):
            bt = s.next_batch()
            s.observe(bt.indices, losses=_fake_loss(bt.indices, t))
            got.append([bt.indices.tolist(), bt.weights.tolist()])
    finally:
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(got))


def test_infobatch_two_gloo_processes_match_one_process(tmp_path):
    import multiprocessing as mp

    one = InfoBatch(90, 10, prune=0.5, delta=0.8, epochs=5, seed=4, rank=0, world_size=1)
    ref = []
    for t in range(60):
        bt = one.next_batch()
        one.observe(bt.indices, losses=_fake_loss(bt.indices, t))
        ref.append((bt.indices.tolist(), bt.weights.tolist()))
    ctx = mp.get_context("fork")
    out = str(tmp_path / "ddp")
    procs = [ctx.Process(target=_infobatch_rank, args=(r, 2, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    for (i, w), a, b in zip(ref, r0, r1):
        assert a[0] + b[0] == i and a[1] + b[1] == w


# -- RHO-LOSS -----------------------------------------------------------------------------------


def test_rho_loss_takes_the_largest_reducible_losses():
    n = 60
    il = torch.linspace(0, 3, n, dtype=torch.float64)
    calls = []

    def loss_fn(idx):
        calls.append(idx.clone())
        return (torch.cos(idx.double()) + 2.0).float()

    pool = torch.arange(10, n)
    s = RhoLoss(n, 4, presample=16, irreducible=il, loss_fn=loss_fn, pool=pool, seed=5)
    for step in range(5):
        b = s.next_batch()
        pre = s.presample_at(step)
        assert torch.equal(calls[-1], pre) and pre.unique().numel() == 16 and int(pre.min()) >= 10
        red = (torch.cos(pre.double()) + 2.0).float().double() - il[pre]
        best = pre[torch.argsort(red, descending=True)[:4]]
        assert sorted(b.indices.tolist()) == sorted(best.tolist()) and b.weights is None
    assert s.selection_forwards == 5 * 16
    t = RhoLoss(n, 4, presample=16, irreducible=il, loss_fn=loss_fn, pool=pool, seed=5)
    t.load_state_dict(_roundtrip(s.state_dict()))
    assert torch.equal(t.next_batch().indices, s.next_batch().indices)
    with pytest.raises(ValueError, match="presample"):
        RhoLoss(n, 4, presample=2, irreducible=il, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="irreducible"):
        RhoLoss(n, 4, presample=8, irreducible=il[:5], loss_fn=loss_fn)


def test_irreducible_model_learns_its_holdout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = (x[:, 0] > 0).long()
    held, pool = holdout_split(300, 0.3, seed=1)
    assert held.numel() == 90 and torch.equal(torch.cat([held, pool]).sort().values, torch.arange(300))
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 2)
    il = train_irreducible(net, lambda i: (x[i], y[i]), held, 300, steps=100, batch_size=30, lr=0.5)
    assert il.shape == (300,) and il.dtype == torch.float64
    assert float(il.mean()) < 0.3  # a separable problem: the holdout model generalises


# -- selective backprop -------------------------------------------------------------------------


def test_selective_backprop_window_and_interrupt():
    sb = SelectiveBackprop(0.5, start=0.25, end=0.75, interrupt=3)
    act = [sb.active(step, step / 20) for step in range(20)]
    # window: steps 5..14 (progress 0.25 .. 0.70); interrupt: steps with (step + 1) % 3 == 0 train in full
    assert act == [5 <= t < 15 and (t + 1) % 3 != 0 for t in range(20)]
    losses = torch.arange(8.0)
    torch.testing.assert_close(sb(losses, step=0, progress=0.0), losses)  # outside: identity
    assert sb.metrics() == {"sb_kept": 8.0}
    out = sb(losses, step=6, progress=0.3)
    assert out.tolist() == [0, 0, 0, 0, 8, 10, 12, 14] and out.mean() == losses[4:].mean()
    torch.testing.assert_close(sb(losses, step=8, progress=0.4), losses)  # (8 + 1) % 3 == 0: full batch
    assert SelectiveBackprop(0.5).active(0, 1.0)  # end = 1 is inclusive
    for bad in ({"start": 0.5, "end": 0.5}, {"interrupt": -1}, {"scale_factor": 0.5},
                {"scale_factor": 0.0, "method": "select"}, {"method": "drop"}):
        with pytest.raises(ValueError):
            SelectiveBackprop(0.5, **bad)
    t = create_loss_transform("selective_backprop", seed=0, keep=0.25, start=0.1, interrupt=2)
    assert (t.keep, t.start, t.interrupt) == (0.25, 0.1, 2)


def test_selective_backprop_select_scores_downscaled_images():
    shapes = []

    class Net(torch.nn.Module):
        def forward(self, x):
            shapes.append(tuple(x.shape))
            return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)

    x = torch.arange(6.0).reshape(6, 1, 1, 1).expand(6, 1, 8, 8).contiguous()
    y = torch.zeros(6, dtype=torch.long)
    sb = SelectiveBackprop(0.5, scale_factor=0.5, method="select")
    ce = lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none")
    keep = sb.select(Net(), x, y, ce, step=0, progress=0.0)
    assert shapes == [(6, 1, 4, 4)]
    # label 0 and logits (m, -m): the loss falls with m, so the 3 smallest means have the largest losses
    assert keep.tolist() == [0, 1, 2]
    assert sb.selection_forwards == 6 * 0.25
    losses = torch.ones(6)
    assert sb(losses, step=0, progress=0.0) is losses  # the selection already happened
    sb2 = SelectiveBackprop(0.5, method="select", interrupt=1)
    assert sb2.select(Net(), x, y, ce, step=0, progress=0.0) is None and sb2.selection_forwards == 0


def test_infobatch_tail_by_progress_and_epochs_done():
    """Without ``epochs`` the tail starts with the first epoch planned at progress >= delta."""
    s = InfoBatch(40, 10, prune=0.5, delta=0.5, seed=1)
    assert s.epochs_done == 0.0
    _drive(s, 4)  # epoch 0: full, 4 steps
    assert s.epochs_done == 1.0
    s.set_progress(0.4)
    _drive(s, 1, 4)
    assert s.pruning() and s.metrics()["ib_kept_fraction"] < 1 and s.epochs_done == 1 + 1 / s.epoch_steps
    _drive(s, s.epoch_steps - 1, 5)
    s.set_progress(0.5)  # the next epoch is planned at progress 0.5: full data
    _drive(s, 1, 10)
    assert not s.pruning() and s.epoch == 2 and s.epoch_steps == 4 and (s.last_weights == 1).all()
    t = InfoBatch(40, 10, prune=0.5, delta=0.5, seed=1)
    t.load_state_dict(_roundtrip(s.state_dict()))
    assert t.progress == 0.5 and t.epochs_done == s.epochs_done


# -- the engine: forward-equivalents, RHO-LOSS's cached holdout model, InfoBatch's own epochs ----------------


def _cfg(**over):
    cfg = {"seed": 0, "device": "cpu", "threads": 1, "duration": "20 steps", "cost_ratio": 2.0,
           "data": {"name": "synthetic", "num_samples": 150, "shape": [20], "num_classes": 3, "seed": 0},
           "model": {"name": "mlp", "hidden": [16]}, "sampler": {"name": "epoch", "batch_size": 12},
           "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "schedule": {"name": "constant"},
           "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"every": 5, "progress": False}}
    for k, v in over.items():
        cfg[k] = v
    return cfg


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_forward_equivalents_against_a_hand_count(tmp_path):
    from sgdlab import train

    n_train = 150
    b, r = 12, 2.0
    s = train.run(_cfg(), tmp_path / "uniform", quiet=True)
    assert s["forward_equivalents"] == 20 * b * (1 + r) and s["cost_ratio"] == r
    assert [row["fwd"] for row in _rows(tmp_path / "uniform")] == [k * b * (1 + r) for k in (5, 10, 15, 20)]
    # a budget in forward-equivalents stops at the first step that reaches it
    s = train.run(_cfg(duration="700 fwd", schedule={"name": "cosine", "unit": "fraction"}), tmp_path / "fwd",
                  quiet=True)
    assert s["steps"] == 20 and s["forward_equivalents"] == 720
    # selective backprop (select): a scoring forward of 12, then forward and backward of the kept 6
    sb = {"name": "cross_entropy", "selective_backprop": {"keep": 0.5, "method": "select"}}
    s = train.run(_cfg(loss=sb), tmp_path / "sb", quiet=True)
    assert s["forward_equivalents"] == 20 * (b + 6 * (1 + r))
    # importance sampling: + the presample of every importance-sampled step
    imp = {"name": "importance", "batch_size": b, "presample": 24, "tau_th": 0.0}
    s = train.run(_cfg(sampler=imp), tmp_path / "is", quiet=True)
    is_steps = torch.load(tmp_path / "is" / "checkpoints" / "last.pt", weights_only=True)["source"]["is_steps"]
    assert is_steps > 0 and s["forward_equivalents"] == 20 * b * (1 + r) + is_steps * 24
    # RHO-LOSS: the holdout model's training and scoring of all examples, then a presample per step
    rho = {"name": "rho_loss", "batch_size": b, "presample": 24, "holdout": {"fraction": 0.25, "steps": 7}}
    s = train.run(_cfg(sampler=rho), tmp_path / "rho", quiet=True)
    setup = 7 * b * (1 + r) + n_train
    assert s["setup_forwards"] == setup
    assert s["forward_equivalents"] == setup + 20 * (24 + b * (1 + r))
    # a measured ratio is stored and reused
    s = train.run(_cfg(cost_ratio="auto"), tmp_path / "auto", quiet=True)
    ckpt = torch.load(tmp_path / "auto" / "checkpoints" / "last.pt", weights_only=True)
    assert s["cost_ratio"] > 0 and ckpt["budget"]["cost_ratio"] == s["cost_ratio"]


def test_rho_loss_holdout_model_is_trained_once_and_reused_on_resume(tmp_path, monkeypatch):
    from sgdlab import train
    from sgdlab.sampling import selection

    rho = {"name": "rho_loss", "batch_size": 12, "presample": 24, "holdout": {"fraction": 0.25, "steps": 7}}
    calls = []
    real = selection.train_irreducible
    monkeypatch.setattr(selection, "train_irreducible", lambda *a, **k: calls.append(1) or real(*a, **k))
    full = train.run(_cfg(sampler=rho), tmp_path / "full", quiet=True)
    train.run(_cfg(sampler=rho, duration="10 steps"), tmp_path / "part", quiet=True)
    assert len(calls) == 2 and (tmp_path / "part" / "cache" / "rho_loss_irreducible.pt").is_file()
    monkeypatch.setattr(selection, "train_irreducible", lambda *a, **k: pytest.fail("trained again on resume"))
    resumed = train.resume(tmp_path / "part", overrides=["duration=20 steps"], quiet=True)
    assert resumed["steps"] == 20
    assert resumed["forward_equivalents"] == full["forward_equivalents"]
    assert resumed["final"] == full["final"]
    # the rows agree except for the time and the evaluation at the end of the first part
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "test_loss", "test_acc")}
                          for r in rows]
    assert strip(_rows(tmp_path / "part")) == strip(_rows(tmp_path / "full"))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_infobatch_in_the_engine_resumes_exactly_and_counts_its_own_epochs(tmp_path):
    from sgdlab import train

    ib = {"name": "infobatch", "batch_size": 12, "prune": 0.5, "delta": 0.75}
    s = train.run(_cfg(sampler=ib, duration="4 epochs"), tmp_path / "own", quiet=True)
    rows = _rows(tmp_path / "own")
    assert s["steps"] < 4 * 13 and rows[-1]["ib_epoch"] == 3  # 4 InfoBatch epochs of at most 13 steps
    assert s["forward_equivalents"] == s["steps"] * 12 * 3
    full = train.run(_cfg(sampler=ib, duration="25 steps"), tmp_path / "full", quiet=True)
    train.run(_cfg(sampler=ib, duration="13 steps"), tmp_path / "part", quiet=True)  # mid-epoch
    resumed = train.resume(tmp_path / "part", overrides=["duration=25 steps"], quiet=True)
    assert resumed["final"] == full["final"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["source"]["losses"], b["source"]["losses"])


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["infobatch", "rho_loss"])
def test_engine_two_gloo_ranks_match_one_process(tmp_path, sampler):
    """torchrun, 2 CPU ranks with batch 6 against one process with batch 12: the same global batches."""
    import os
    import subprocess
    import sys

    import yaml

    from sgdlab import train

    opts = {"infobatch": {"prune": 0.5, "delta": 0.75},
            "rho_loss": {"presample": 24, "holdout": {"fraction": 0.25, "steps": 5}}}[sampler]
    cfg = _cfg(sampler={"name": sampler, "batch_size": 6, **opts}, duration="30 steps")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sgdlab.cli",
           "run", str(path), "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train.run(dict(cfg, sampler=dict(cfg["sampler"], batch_size=12)), tmp_path / "one", quiet=True)
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["steps"] == single["steps"] == 30
    assert ddp["forward_equivalents"] == single["forward_equivalents"]
    one_rows, ddp_rows = _rows(tmp_path / "one"), _rows(tmp_path / "ddp")
    assert [r["train_loss"] for r in ddp_rows] == pytest.approx([r["train_loss"] for r in one_rows], rel=1e-4)


def test_fwd_duration_parses_and_needs_a_fraction_schedule():
    from sgdlab.errors import ConfigError
    from sgdlab.train.config import load_config, parse_duration

    for text in ("2000 fwd", "2000 forward_equivalents", "2e3 forward-equivalents", "2000 Forward Equivalents"):
        d = parse_duration(text)
        assert (d.value, d.unit, str(d)) == (2000.0, "fwd", "2000 fwd")
    with pytest.raises(ConfigError, match="forward-equivalents"):
        load_config(_cfg(duration="2000 fwd", schedule={"name": "cosine", "unit": "epochs"}))
    with pytest.raises(ConfigError, match="cost_ratio"):
        load_config(_cfg(cost_ratio=-1.0))
