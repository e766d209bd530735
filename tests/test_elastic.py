"""Elastic determinism in plain loops: global sampler states and keyed per-example draws.

Ranks are simulated by building one sampler per rank with explicit ``rank``/``world_size`` (threads with
an in-process all-gather for the score-driven samplers); the global batch of a step is the ranks' slices
in rank order. A state written at world size W must load at any W' dividing the global batch and continue
the very sequence a single process draws.
"""

from __future__ import annotations

import threading

import pytest
import torch

from sgdlab import keyed, regularize
from sgdlab.data import cifar_augment
from sgdlab.sampling import (EpochSampler, ImportanceSampler, OnlineBatchSelection, PrioritizedSampler,
                             ReplacementSampler, SequencedReplacementSampler, history, importance, rank_batch_size)

N, G = 97, 12  # dataset size, global batch


def _blind(kind, world, rank):
    b = G // world
    if kind == "epoch":
        return EpochSampler(N, b, seed=3, rank=rank, world_size=world)
    if kind == "epoch_tail":
        return EpochSampler(N, b, seed=3, drop_last=False, rank=rank, world_size=world)
    if kind == "replacement":
        return ReplacementSampler(N, b, seed=3, rank=rank, world_size=world)
    return SequencedReplacementSampler(N, b, seed=3, rank=rank, world_size=world)


def _same(a, b) -> bool:
    """Exact equality of two nested sampler states (tensors by value)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _global_steps(samplers, steps):
    out = []
    for _ in range(steps):
        batches = [s.next_batch() for s in samplers]
        out.append(torch.cat([b.indices for b in batches]).tolist())
    return out


@pytest.mark.parametrize("kind", ["epoch", "epoch_tail", "replacement", "srs"])
@pytest.mark.parametrize("worlds", [(2, 4), (3, 1), (4, 6), (1, 3)])
def test_blind_state_is_global_and_resumes_at_another_world_size(kind, worlds):
    w, w2 = worlds
    reference = _global_steps([_blind(kind, 1, 0)], 30)
    first = [_blind(kind, w, r) for r in range(w)]
    got = _global_steps(first, 13)
    states = [s.state_dict() for s in first]
    for st in states[1:]:  # no rank in the state: every rank writes the same one
        assert _same(st, states[0])
    second = [_blind(kind, w2, r) for r in range(w2)]
    for s in second:
        s.load_state_dict(states[0])
    got += _global_steps(second, 17)
    assert got == reference


def test_rank_batch_size_refuses_a_world_that_does_not_divide_the_global_batch():
    assert rank_batch_size(12, 4) == 3
    with pytest.raises(ValueError, match=r"global batch of 12 examples cannot be split over 5 processes") as e:
        rank_batch_size(12, 5)
    assert "\n" not in str(e.value)


def test_a_state_of_another_global_batch_is_refused():
    s = EpochSampler(N, 6, seed=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="global_batch"):
        EpochSampler(N, 5, seed=3, rank=0, world_size=2).load_state_dict(s.state_dict())


# -- score-driven samplers: ranks as threads, all-gather in process --------------------------------


class _Group:
    """An all-gather among ``world`` threads (rank from a thread-local), standing in for torch.distributed."""

    def __init__(self, world):
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def all_gather_cat(self, t, world_size):
        assert world_size == self.world
        if world_size == 1:
            return t
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        out = torch.cat(list(self.slots))
        self.barrier.wait()
        return out


def _scores(idx):  # a fixed non-uniform score per example
    return 0.1 + (torch.as_tensor(idx).double() * 0.618).remainder(1.0)


def _losses(idx):
    return 1.0 + (torch.as_tensor(idx).double() * 0.377).remainder(1.0)


def _score_driven(kind, world, rank):
    b = G // world
    if kind == "importance":
        return ImportanceSampler(N, b, presample=24, score_fn=_scores, tau_th=1.01, tau_momentum=0.5, seed=5,
                                 rank=rank, world_size=world)
    if kind == "online":
        return OnlineBatchSelection(N, b, s_e=20.0, seed=5, rank=rank, world_size=world)
    return PrioritizedSampler(N, b, alpha=0.7, beta=0.5, beta_steps=10, seed=5, rank=rank, world_size=world)


def _run_ranks(monkeypatch, samplers, steps):
    """Step every rank's sampler in its own thread; returns global (indices, weights) per step."""
    world = len(samplers)
    group = _Group(world)
    monkeypatch.setattr(importance, "_all_gather_cat", group.all_gather_cat)
    monkeypatch.setattr(history, "_all_gather_cat", group.all_gather_cat)
    out = [[None] * world for _ in range(steps)]
    errors = []

    def work(rank):
        group.local.rank = rank
        s = samplers[rank]
        try:
            for t in range(steps):
                batch = s.next_batch()
                out[t][rank] = batch
                s.observe(batch.indices, losses=_losses(batch.indices), scores=_scores(batch.indices))
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    rows = []
    for parts in out:
        idx = torch.cat([p.indices for p in parts]).tolist()
        w = None if parts[0].weights is None else torch.cat([p.weights for p in parts])
        rows.append((idx, w))
    return rows


@pytest.mark.parametrize("kind", ["importance", "online", "prioritized"])
def test_score_driven_state_is_global_and_resumes_at_another_world_size(monkeypatch, kind):
    reference = _run_ranks(monkeypatch, [_score_driven(kind, 1, 0)], 20)
    first = [_score_driven(kind, 2, r) for r in range(2)]
    got = _run_ranks(monkeypatch, first, 8)
    states = [s.state_dict() for s in first]
    assert _same(states[1], states[0])
    second = [_score_driven(kind, 4, r) for r in range(4)]
    for s in second:
        s.load_state_dict(states[0])
    got += _run_ranks(monkeypatch, second, 12)
    assert [i for i, _ in got] == [i for i, _ in reference]
    for (_, w), (_, ref) in zip(got, reference):
        assert (w is None) == (ref is None)
        if w is not None:
            torch.testing.assert_close(w, ref, rtol=1e-6, atol=0)
    if kind == "importance":
        assert any(w is not None for _, w in reference)  # importance sampling did switch on


# -- keyed draws ----------------------------------------------------------------------------------


def test_keyed_uniforms_match_the_splitmix64_reference_and_are_uniform():
    base = keyed.mix(3, 7, 11)
    idx = torch.tensor([0, 1, 5, 2**40, 123456789])
    got = keyed.uniform_from_keys(base, idx, torch.float64)
    m64 = (1 << 64) - 1

    def splitmix(z):
        z &= m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    # the top 53 bits with the highest flipped (the arithmetic shift's signed value plus 1/2), over 2^53
    ref = [((splitmix(base + i * 0x9E3779B97F4A7C15) >> 11) ^ (1 << 52)) * 2.0**-53 for i in idx.tolist()]
    assert got.tolist() == ref
    u = keyed.Keys(0, 5, torch.arange(200_000)).uniform(keyed.stream_id("t"), 2)
    se = (1 / 12 / u.shape[0]) ** 0.5  # standard error of the mean of U(0, 1)
    assert (u.mean(0) - 0.5).abs().max() < 5 * se
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 5 / u.shape[0] ** 0.5
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0


def _split(t, world):
    return list(t.chunk(world))


def test_keyed_draws_do_not_depend_on_how_the_batch_is_split():
    torch.manual_seed(0)
    idx = torch.randperm(500)[:24]
    x = torch.randn(24, 3, 8, 8)
    whole = cifar_augment(x, fill=0.0, keys=keyed.Keys(7, 11, idx))
    parts = [cifar_augment(xp, fill=0.0, keys=keyed.Keys(7, 11, ip)) for xp, ip in zip(_split(x, 4), _split(idx, 4))]
    assert torch.equal(torch.cat(parts), whole)
    other = cifar_augment(x, fill=0.0, keys=keyed.Keys(7, 12, idx))  # another step: other crops and flips
    assert not torch.equal(other, whole)

    def coefficients(indices, step):
        a1, b1 = [], []
        with regularize.keyed(7, step, indices) as keys:
            for _ in range(2):  # two shake layers take two streams
                from sgdlab.regularize.shake import draw_coefficients

                a, b = draw_coefficients(torch.zeros(len(indices), 4))
                a1.append(a.flatten())
                b1.append(b.flatten())
            rg = regularize.RandomGradient(0.0, 1.0, per_sample=True, p=0.5, seed=9)
            f = rg(torch.ones(len(indices)))
            assert len(keys) == len(indices)
        return torch.stack(a1 + b1), f

    ref_c, ref_f = coefficients(idx, 3)
    assert not torch.equal(ref_c[0], ref_c[1])  # the two layers draw differently
    got = [coefficients(i, 3) for i in _split(idx, 3)]
    assert torch.equal(torch.cat([c for c, _ in got], 1), ref_c)
    assert torch.equal(torch.cat([f for _, f in got]), ref_f)
    assert not torch.equal(coefficients(idx, 4)[0], ref_c)


def test_keyed_batch_level_draws_are_one_per_batch_and_outside_a_context_the_generator_is_used():
    from sgdlab.regularize.shake import draw_coefficients

    idx = torch.arange(10)
    with regularize.keyed(1, 2, idx):
        a, _ = draw_coefficients(torch.zeros(10, 3), level="batch")
    with regularize.keyed(1, 2, idx[:3]):  # another rank's slice: the same batch coefficient
        a2, _ = draw_coefficients(torch.zeros(3, 3), level="batch")
    assert a.shape == (1, 1) and torch.equal(a, a2)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    plain = draw_coefficients(torch.zeros(10, 3), generator=g1)[0]
    assert torch.equal(plain, torch.rand((2, 10, 1), generator=g2)[0])


def test_keyed_context_checks_its_rows():
    with regularize.keyed(0, 0, torch.arange(5)):
        with pytest.raises(ValueError, match="batch has 4 examples but the keyed context has 5 indices"):
            regularize.shake(torch.zeros(4, 2), torch.ones(4, 2), training=True)
    with pytest.raises(ValueError, match="generator or keys, not both"):
        cifar_augment(torch.zeros(2, 3, 8, 8), generator=torch.Generator(), keys=keyed.Keys(0, 0, torch.arange(2)))
    with pytest.raises(ValueError, match="indices must be a 1-D integer tensor"):
        keyed.Keys(0, 0, torch.zeros(3))


# -- the engine: one run, any world size ------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

FRAMEWORKS = Path(__file__).resolve().parent / "frameworks"
RUN = {
    "seed": 3, "device": "cpu", "threads": 1, "duration": "40 steps",
    "data": {"name": "synthetic", "num_samples": 96, "num_test": 16, "shape": [3, 8, 8], "num_classes": 4,
             "augment": True},
    "model": {"name": "shake_resnet", "depth": 8, "width": 4, "batchnorm": False,
              "shake": {"forward": "shake", "backward": "shake", "level": "image"}},
    "sampler": {"name": "srs", "batch_size": 8},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "constant"},
    "loss": {"name": "cross_entropy", "random_gradient": {"low": 0.0, "high": 1.0, "per_sample": True}},
    "eval": {"every": 0}, "checkpoint": {"every": 20}, "log": {"every": 1, "progress": False},
    "imports": ["elastic_trace"],
}


def _env(trace: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SGDLAB_TRACE_DIR": str(trace)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(FRAMEWORKS), env.get("PYTHONPATH", "")])
    return env


def _sgdlab(args, procs, trace: Path):
    trace.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "sgdlab.cli", *args], env=_env(trace), capture_output=True,
                          text=True, timeout=600, check=False)
    return proc


def _trace(folder: Path) -> dict:
    """Per (kind, step): the list of calls in order, each the global rows (ranks concatenated in order)."""
    ranks = defaultdict(list)
    for path in sorted(folder.glob("trace-rank*.jsonl")):
        rank = int(path.name.split("-")[1][4:])
        ranks[rank] += [json.loads(line) for line in path.read_text().splitlines()]
    calls = defaultdict(lambda: defaultdict(list))  # (kind, step) -> call number -> [rows per rank]
    for rank in sorted(ranks):
        count = defaultdict(int)
        for row in ranks[rank]:
            key = (row["kind"], row["step"])
            calls[key][count[key]].append(row)
            count[key] += 1
    out = {}
    for key, per_call in calls.items():
        out[key] = [{f: sum((r[f] for r in rows), []) for f in rows[0] if f not in ("kind", "step")}
                    for _, rows in sorted(per_call.items())]
    return out


def _train_losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def _assert_same_run(got: dict, ref: dict, steps) -> None:
    for (kind, step), calls in ref.items():
        if step not in steps:
            continue
        other = got[(kind, step)]
        assert len(other) == len(calls), (kind, step)
        for mine, theirs in zip(other, calls):
            assert mine["indices"] == theirs["indices"], (kind, step)
            for field in theirs:
                if field == "weights":  # scores of the presample, computed in other chunks, then normalised
                    assert mine[field] == pytest.approx(theirs[field], rel=1e-5), (kind, step)
                elif field == "sums":  # augmented images: same crops and flips, summed in another batch shape
                    assert mine[field] == pytest.approx(theirs[field], rel=1e-6, abs=1e-5), (kind, step)
                elif field != "indices":
                    assert mine[field] == theirs[field], (kind, step, field)


def _elastic(tmp_path, resume_procs, **changes):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**RUN, **changes}))
    ref = tmp_path / "one"
    p = _sgdlab(["run", str(cfg), "--out", str(ref), "--quiet"], 1, tmp_path / "trace-one")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    part = tmp_path / "two"
    p = _sgdlab(["run", str(cfg), "--out", str(part), "--quiet", "sampler.batch_size=4", "duration=20 steps"], 2,
                tmp_path / "trace-two")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one = _trace(tmp_path / "trace-one")
    _assert_same_run(_trace(tmp_path / "trace-two"), one, range(20))
    la, lp = _train_losses(ref), _train_losses(part)
    assert sorted(lp) == list(range(1, 21))
    for s in range(1, 21):
        assert lp[s] == pytest.approx(la[s], rel=1e-5), s
    for procs in resume_procs:
        run = tmp_path / f"resumed{procs}"
        shutil.copytree(part, run)
        p = _sgdlab(["resume", str(run), "duration=40 steps"], procs, tmp_path / f"trace-{procs}")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "dropout" in p.stdout  # the one line naming what is not carried over
        got = _trace(tmp_path / f"trace-{procs}")
        assert {s for _, s in got} == set(range(20, 40))
        assert {k for k, _ in got} == {k for k, _ in one}
        _assert_same_run(got, one, range(20, 40))
        la, lb = _train_losses(ref), _train_losses(run)
        assert sorted(lb) == list(range(1, 41))
        for s in range(1, 41):
            assert lb[s] == pytest.approx(la[s], rel=1e-5), s
        a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["model"]
        b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    return part


@pytest.mark.slow
def test_a_two_process_run_resumes_as_one_and_as_four_processes_with_the_same_draws(tmp_path):
    """SRS, image-level Shake-Shake, per-sample Random Gradient and batched augmentation: 40 steps as 1
    process, and as 2 processes checkpointed at step 20 then resumed as 1 and as 4: every step trains the same
    global batch with the same per-example coefficients, factors and crops, to the same losses and weights.
    3 processes cannot share the global batch of 8: one line, exit 2."""
    part = _elastic(tmp_path, [1, 4])
    p = _sgdlab(["resume", str(part), "duration=40 steps"], 3, tmp_path / "trace-3")
    assert p.returncode != 0
    assert "trains a global batch of 8 examples, which 3 processes cannot share equally" in p.stderr


@pytest.mark.slow
def test_importance_sampling_resumes_at_another_world_size(tmp_path):
    """The same with ImportanceSampler (presample 24 scored in shares and all-gathered): the global batches and
    their weights of a 2-process run resumed as 1 and as 4 processes are the 1-process run's."""
    _elastic(tmp_path, [1, 4], sampler={"name": "importance", "batch_size": 8, "presample": 24, "tau_th": 0.0})
    rows = [json.loads(line) for line in (tmp_path / "trace-one" / next(
        p.name for p in (tmp_path / "trace-one").glob("trace-rank0-*.jsonl"))).read_text().splitlines()]
    assert any(r["kind"] == "batch" and r["weights"] for r in rows)  # importance sampling was on


@pytest.mark.slow
def test_sync_bn_makes_a_batchnorm_model_world_size_invariant(tmp_path):
    """With BatchNorm and sync_bn: true, 2 processes train what 1 process trains (losses within 1e-5)."""
    model = {**RUN["model"], "batchnorm": True}
    _elastic(tmp_path, [], model=model, sync_bn=True)


def test_a_checkpoint_of_another_world_size_resumes_in_one_process(tmp_path):
    """Fast case, one process: the step-20 checkpoint of a run, rewritten as two processes of 4 examples
    would have written it, resumes here with 8 per process and ends bit-identical to the uninterrupted run."""
    import yaml

    from sgdlab.train import engine

    cfg = {k: v for k, v in RUN.items() if k != "imports"}
    full, part = tmp_path / "full", tmp_path / "part"
    engine.run(cfg, full, quiet=True)
    engine.run({**cfg, "duration": "20 steps"}, part, quiet=True)
    path = part / "checkpoints" / "last.pt"
    st = torch.load(path, weights_only=True)
    assert st["global_batch"] == 8 and st["world_size"] == 1
    st.update(world_size=2, rng_ranks=[st["rng"], st["rng"]])
    st["config"]["sampler"]["batch_size"] = 4
    torch.save(st, path)
    saved = yaml.safe_load((part / "config.yaml").read_text())
    saved["sampler"]["batch_size"] = 4
    (part / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    summary = engine.resume(part, overrides=["duration=40 steps"], quiet=True)
    assert summary["steps"] == 40 and summary["world_size"] == 1
    assert _train_losses(part) == _train_losses(full)
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(path, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["global_batch"] == 8


def _sync_bn_worker(rank, folder):
    import torch.distributed as dist

    from sgdlab.train.distributed import convert_sync_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 3, 4, 4, generator=g) * 2 + 1, torch.randn(8, 3, 4, 4, generator=g)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-1, 1, generator=g)
    mine = convert_sync_batchnorm(torch.nn.Sequential(ref), torch.device("cpu"))[0]
    assert type(mine).__name__ == "GlooSyncBatchNorm" and torch.equal(mine.weight, ref.weight)
    ref, mine = torch.nn.BatchNorm2d(3), mine  # the reference: plain BatchNorm on the whole batch
    ref.load_state_dict(mine.state_dict())
    xr, xm = x.clone().requires_grad_(True), x[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    yr, ym = ref(xr), mine(xm)
    (yr * w).sum().backward()
    (ym * w[rank * 4:(rank + 1) * 4]).sum().backward()
    grads = [mine.weight.grad.clone(), mine.bias.grad.clone()]
    for t in grads:
        dist.all_reduce(t)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ym, yr[rank * 4:(rank + 1) * 4], **close)
    torch.testing.assert_close(xm.grad, xr.grad[rank * 4:(rank + 1) * 4], **close)
    torch.testing.assert_close(grads, [ref.weight.grad, ref.bias.grad], **close)
    torch.testing.assert_close(mine.running_var, ref.running_var, **close)
    torch.testing.assert_close(mine.running_mean, ref.running_mean, **close)
    (Path(folder) / f"ok{rank}").write_text("ok")
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_bn_on_cpu_gives_the_global_batch_statistics_and_gradients(tmp_path):
    """sync_bn on a CPU process group (gloo): two ranks holding halves of a batch get the outputs, input
    gradients, parameter gradients (summed over ranks) and running statistics of one BatchNorm on the whole."""
    import torch.multiprocessing as mp

    mp.spawn(_sync_bn_worker, args=(str(tmp_path),), nprocs=2)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
