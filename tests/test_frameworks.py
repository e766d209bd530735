"""sgdlab inside other training stacks: torchrun, StatefulDataLoader, Lightning, Accelerate, torch.compile.

Multi-process cases run 2 CPU processes (gloo) launched with ``python -m torch.distributed.run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent / "frameworks"


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(script: Path, *args, timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_sampler_built_before_the_process_group_slices_or_raises(tmp_path):
    _torchrun(HERE / "prebuilt.py", tmp_path)
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["slices"] == [True, True, True]  # lazily resolved: this rank's slice of one global batch
        for msg in out["raised"] + out["iter_raised"] + [out["importance"]]:
            assert "before torch.distributed was initialized" in msg and "2 ranks" in msg
            assert "\n" not in msg


@pytest.mark.parametrize("name", ["EpochSampler", "ReplacementSampler", "SequencedReplacementSampler"])
def test_stateful_dataloader_with_workers_resumes_exactly(name):
    tdl = pytest.importorskip("torchdata.stateful_dataloader")
    import sgdlab.sampling as sampling

    cls = getattr(sampling, name)
    n, b, epochs, stop = 40, 8, 3, 7  # len 5: the checkpoint falls in the second epoch
    data = torch.utils.data.TensorDataset(torch.arange(n))

    def loader(sampler):
        return tdl.StatefulDataLoader(data, batch_sampler=sampler, num_workers=2)

    unbroken = loader(cls(n, b, seed=2))
    ref = [[x[0].tolist() for x in unbroken] for _ in range(epochs)]
    first = loader(cls(n, b, seed=2))
    got, state = [], None
    for _ in range(epochs):
        epoch = []
        for x in first:
            epoch.append(x[0].tolist())
            if sum(map(len, got)) + len(epoch) == stop:
                state = first.state_dict()
                break
        got.append(epoch)
        if state is not None:
            break
    resumed = loader(cls(n, b, seed=2))
    resumed.load_state_dict(state)
    got[-1] += [x[0].tolist() for x in resumed]  # the rest of the interrupted epoch
    while len(got) < epochs:
        got.append([x[0].tolist() for x in resumed])
    assert got == ref


class _ShakeNet(torch.nn.Module):
    """A tiny two-branch network: two shake blends drawn from the model's own generator."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        from sgdlab.regularize import shake

        h = shake(self.a(x), self.b(x), training=self.training, generator=self.generator)
        h = shake(torch.relu(h), h, rule="M3", level="batch", training=self.training, generator=self.generator)
        return self.head(h)


def _compiled_matches_eager(backend: str) -> None:
    from sgdlab.regularize import RandomGradient

    torch._dynamo.reset()
    torch.manual_seed(0)
    net, x = _ShakeNet(), torch.randn(5, 4)
    rg = RandomGradient(seed=3, p=0.5, per_sample=True)

    def step(model, x):
        return rg(model(x).square().mean(1)).mean()

    compiled = torch.compile(step, fullgraph=True, backend=backend)  # fails on any graph break
    results = []
    for fn in (compiled, step):
        net.zero_grad()
        net.generator.manual_seed(0)
        rg.generator.manual_seed(3)
        losses = []
        for _ in range(3):
            loss = fn(net, x)
            loss.backward()
            losses.append(loss.detach())
        results.append((torch.stack(losses), [p.grad.clone() for p in net.parameters()]))
    (lc, gc), (le, ge) = results
    assert len(set(lc.tolist())) == 3  # fresh coefficients every step
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fullgraph_compile_of_shake_and_random_gradient_with_generators():
    _compiled_matches_eager("aot_eager")  # dynamo + AOT autograd, no code generation: a few seconds


@pytest.mark.slow
def test_fullgraph_compile_inductor_of_shake_and_random_gradient():
    _compiled_matches_eager("inductor")  # a minute on a small CPU


# ---------------------------------------------------------------------------------------------
# Your own data and model in the engine and the CLI
# ---------------------------------------------------------------------------------------------

PLUGIN = '''
import torch
from sgdlab import data, models


@data.register("byo_blobs")
def byo_blobs(num_train: int = 96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_train + 32, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return data.Dataset("byo_blobs", x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes=2)


@models.register("byo_mlp", input_shape=(36,), num_classes=2)
def byo_mlp(num_classes: int = 2, in_features: int = 36, hidden: int = 16):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, num_classes))
'''


def test_models_get_the_data_shape():
    from sgdlab import models

    assert models.shape_kwargs("mlp", (1, 28, 28)) == {"in_features": 784}
    assert models.shape_kwargs("cnn2d", (3, 32, 32)) == {"in_channels": 3, "size": 32}
    assert models.shape_kwargs("wrn28_2", (3, 32, 32)) == {}
    net = models.create("mlp", num_classes=3, input_shape=(1, 28, 28))
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    explicit = models.create("mlp", num_classes=3, input_shape=(1, 28, 28), in_features=40)
    assert explicit.net[0].in_features == 40  # a value the config sets wins


def test_user_registrations_through_imports_survive_resume(tmp_path, monkeypatch, capsys):
    import yaml

    from sgdlab import cli
    from sgdlab.train import config

    monkeypatch.setattr(config, "_CLI_IMPORTS", [])  # --import below must not leak into other tests
    monkeypatch.chdir(tmp_path)
    (tmp_path / "byo_plugin.py").write_text(PLUGIN)
    (tmp_path / "byo.yaml").write_text(yaml.safe_dump({
        "data": {"name": "byo_blobs"}, "model": {"name": "byo_mlp"}, "sampler": {"name": "srs", "batch_size": 8},
        "optim": {"lr": 0.1}, "duration": "8 steps", "eval": {"every": 0}, "checkpoint": {"every": 4},
        "log": {"every": 2, "progress": False}}))
    assert cli.main(["run", "byo.yaml", "--import", "byo_plugin", "--out", "run", "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["imports"] == ["byo_plugin"]
    # lengthen the finished run and resume it after forgetting the plugin: the run's config imports it again
    saved["duration"] = "12 steps"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (tmp_path / "run" / "summary.json").unlink()
    from sgdlab.data import datasets
    from sgdlab.models import registry

    config._CLI_IMPORTS.clear()
    del datasets._DATASETS["byo_blobs"], registry._MODELS["byo_mlp"], sys.modules["byo_plugin"]
    assert cli.main(["resume", "run", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 12
    assert "byo_blobs" in datasets._DATASETS
    assert cli.main(["check", "byo.yaml", "--import=no_such_plugin"]) == 2
    assert "cannot import 'no_such_plugin'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Lightning and Accelerate, 2 CPU processes, SRS, 2 workers: disjoint slices, exact mid-epoch resume
# ---------------------------------------------------------------------------------------------


def _check_ddp_run(out: Path) -> None:
    """Both ranks trained disjoint halves of one global SRS batch per step, and the run resumed from its
    step-12 checkpoint (mid-epoch: 8 steps per effective epoch) trained the same batches to the same
    weights, bit for bit."""
    from sgdlab.sampling import SequencedReplacementSampler

    full = [json.loads((out / f"full-rank{r}.json").read_text()) for r in (0, 1)]
    resumed = [json.loads((out / f"resumed-rank{r}.json").read_text()) for r in (0, 1)]
    one = SequencedReplacementSampler(64, 8, seed=5, rank=0, world_size=1)  # the global batches
    glob = [one.next_batch().indices.tolist() for _ in range(20)]
    assert [s for s, _ in full[0]] == list(range(20))
    assert [full[0][i][1] + full[1][i][1] for i in range(20)] == glob
    assert [s for s, _ in resumed[0]] == list(range(12, 20))
    assert [resumed[r][i][1] for r in (0, 1) for i in range(8)] == [full[r][12 + i][1] for r in (0, 1) for i in range(8)]
    a, b = torch.load(out / "full.pt", weights_only=True), torch.load(out / "resumed.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lightning_ddp_srs_disjoint_slices_and_exact_resume_with_workers(tmp_path):
    pytest.importorskip("lightning")
    proc = subprocess.run([sys.executable, str(HERE / "lightning_ddp.py"), str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_ddp_run(tmp_path)


@pytest.mark.slow
def test_accelerate_torchrun_srs_disjoint_slices_and_exact_resume_with_workers(tmp_path):
    pytest.importorskip("accelerate")
    _torchrun(HERE / "accelerate_ddp.py", tmp_path, timeout=600)
    _check_ddp_run(tmp_path)


def test_lightning_callback_resumes_mid_epoch_exactly(tmp_path):
    """One process: Lightning's fetcher reads a batch ahead, so the sampler's own state would be a step
    ahead of training; the callback's checkpoint resumes at the next untrained batch."""
    pl = pytest.importorskip("lightning.pytorch")
    from sgdlab.integrations.lightning import SamplerCheckpoint
    from sgdlab.sampling import EpochSampler

    data = torch.utils.data.TensorDataset(torch.arange(40), torch.randn(40, 3, generator=torch.Generator().manual_seed(0)))

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.seen = torch.nn.Linear(3, 1), []

        def setup(self, stage):
            self.sampler = EpochSampler(40, 8, seed=1)  # 5 steps per epoch

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_sampler=self.sampler)

        def training_step(self, batch, i):
            self.seen.append(batch[0].tolist())
            return self.net(batch[1]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(steps, ckpt=None):
        pl.seed_everything(0)
        m = M()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[SamplerCheckpoint()],
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.fit(m, ckpt_path=ckpt)
        return trainer, m

    _, full = fit(12)
    part_trainer, _ = fit(7)  # stops in the second epoch
    part_trainer.save_checkpoint(tmp_path / "part.ckpt")
    _, rest = fit(12, tmp_path / "part.ckpt")
    assert rest.seen == full.seen[7:]
    assert torch.equal(rest.net.weight, full.net.weight)


def _continue_in_child(rank, sampler, expected, path):
    Path(path).write_text(json.dumps(sampler.next_batch().indices.tolist() == expected))


def test_sampler_sent_to_a_spawned_process_continues_exactly(tmp_path):
    """ddp_spawn-style: the sampler is pickled into a fresh process (torch.multiprocessing.spawn)."""
    import torch.multiprocessing as mp

    from sgdlab.sampling import SequencedReplacementSampler

    sampler, ref = SequencedReplacementSampler(100, 10, seed=1), SequencedReplacementSampler(100, 10, seed=1)
    for _ in range(3):
        sampler.next_batch(), ref.next_batch()
    mp.spawn(_continue_in_child, args=(sampler, ref.next_batch().indices.tolist(), str(tmp_path / "ok")), nprocs=1)
    assert json.loads((tmp_path / "ok").read_text()) is True


@pytest.mark.slow
def test_lightning_resumes_at_another_world_size(tmp_path):
    """A checkpoint written by 2 Lightning DDP processes (global batch 8, 4 per rank) resumed by 1 and by 4
    processes trains the global batches of an uninterrupted 1-process run, to the same weights (1e-5)."""
    pytest.importorskip("lightning")

    def fit(name, devices, steps, ckpt=None):
        args = [sys.executable, str(HERE / "lightning_elastic.py"), str(tmp_path), name, str(devices), str(steps)]
        proc = subprocess.run(args + ([str(ckpt)] if ckpt else []), env=_env(), capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in range(devices)]
        return [s for s, _ in ranks[0]], [sum((r[i][1] for r in ranks), []) for i in range(len(ranks[0]))]

    _check_elastic(tmp_path, fit, "part.ckpt")


def _check_elastic(out: Path, fit, saved: str) -> None:
    """12 steps in 1 process; 6 steps in 2 processes, saved; resumed in 1 and in 4 processes to step 12: the
    same global batches at every step and the same final weights (1e-5: only the reduction order differs)."""
    full_steps, full = fit("full", 1, 12)
    assert full_steps == list(range(12))
    part_steps, part = fit("part", 2, 6)
    assert part_steps == list(range(6)) and part == full[:6]
    for procs in (1, 4):
        steps, rest = fit(f"resumed{procs}", procs, 12, out / saved)
        assert steps == list(range(6, 12)) and rest == full[6:]
        a = torch.load(out / "full.pt", weights_only=True)
        b = torch.load(out / f"resumed{procs}.pt", weights_only=True)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_accelerate_resumes_at_another_world_size(tmp_path):
    """``accelerator.save_state`` under 2 torchrun processes, ``load_state`` under 1 and under 4."""
    pytest.importorskip("accelerate")

    def fit(name, procs, steps, state=None):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
            if procs > 1 else [sys.executable]
        args = [*launch, str(HERE / "accelerate_elastic.py"), str(tmp_path), name, str(steps)]
        proc = subprocess.run(args + ([str(state)] if state else []), env=_env(), capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in range(procs)]
        return [s for s, _ in ranks[0]], [sum((r[i][1] for r in ranks), []) for i in range(len(ranks[0]))]

    _check_elastic(tmp_path, fit, "part-state")
