"""sgdlab.monitors: the eigenvalue against hessian_eigenvalues, the edge of stability under full-batch GD,
the noise scale against its exact value, importance and norm closed forms, and the MLflow store."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdlab.analysis import gradient_noise_stats, hessian_eigenvalues
from sgdlab.monitors import (
    GradientNoiseScale,
    ImportanceMonitor,
    MonitorSet,
    Norms,
    Sharpness,
    create,
    names,
    stability_threshold,
    two_batch_estimates,
)


def _mlp(d=20, h=64, k=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, k))


def _eos_data(n=300, d=20, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = F.one_hot(torch.randint(0, k, (n,), generator=g), k).float()
    return x, y


def test_registry_and_errors():
    assert names() == ["importance", "noise_scale", "norms", "sharpness"]
    assert isinstance(create("sharpness", every=5), Sharpness)
    with pytest.raises(ValueError, match="monitor name"):
        create("sharpnes")
    with pytest.raises(ValueError, match="every"):
        Sharpness(every=0)
    with pytest.raises(ValueError, match="probe"):
        Sharpness(probe=torch.zeros(3))
    with pytest.raises(ValueError, match="splits"):
        GradientNoiseScale(splits=1)
    with pytest.raises(ValueError, match="same prefix"):
        MonitorSet([Sharpness(), Sharpness()], loss_fn=F.mse_loss)


def test_stability_threshold_closed_forms():
    assert stability_threshold(0.1) == pytest.approx(20.0)
    assert stability_threshold(0.1, momentum=0.9) == pytest.approx(38.0)  # (2 + 2 beta) / lr
    assert stability_threshold(0.1, momentum=0.9, nesterov=True) == pytest.approx(38.0 / 2.8)
    with pytest.raises(ValueError, match="lr"):
        stability_threshold(0.0)


def test_sharpness_agrees_with_hessian_eigenvalues_and_warm_start_saves_products():
    model = _mlp(d=8, h=16, k=3)
    x, y = _eos_data(n=64, d=8, k=3)
    mon = Sharpness(every=1, probe=(x, y), max_iter=60, warm_iter=None, tol=1e-10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = mon(model, F.mse_loss, None, opt, step=1)
    ref = float(hessian_eigenvalues(model, F.mse_loss, (x, y), k=1, tol=1e-10, max_iter=200)[0])
    assert out["sharpness"] == pytest.approx(ref, rel=1e-7)
    assert out["sharpness_2_over_lr"] == pytest.approx(40.0)
    assert out["sharpness_ratio"] == pytest.approx(ref / 40.0, rel=1e-7)
    cold = out["sharpness_matvecs"]
    # a small step later the previous eigenvector is a good start: fewer products to the same tolerance
    loss = F.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    warm = mon(model, F.mse_loss, None, opt, step=2)
    ref2 = float(hessian_eigenvalues(model, F.mse_loss, (x, y), k=1, tol=1e-10, max_iter=200)[0])
    assert warm["sharpness"] == pytest.approx(ref2, rel=1e-6)
    assert warm["sharpness_matvecs"] < cold
    assert mon(model, F.mse_loss, None, opt, step=3) != {} and Sharpness(every=2)(model, F.mse_loss, (x, y), opt, 3) == {}


def test_sharpness_warm_checks_are_capped_and_cold_checks_restart():
    """A warm check spends at most ``warm_iter`` products; ``warm=False`` solves every check from scratch."""
    model = _mlp(d=8, h=16, k=3)
    x, y = _eos_data(n=64, d=8, k=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    capped = Sharpness(every=1, probe=(x, y), max_iter=60, warm_iter=2, tol=1e-10)
    cold = Sharpness(every=1, probe=(x, y), max_iter=60, warm=False, tol=1e-10)
    first = capped(model, F.mse_loss, None, opt, step=1)
    assert first["sharpness_matvecs"] > 2  # the cold first check converges to tol with max_iter
    for step in (2, 3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        ref = float(hessian_eigenvalues(model, F.mse_loss, (x, y), k=1, tol=1e-10, max_iter=200)[0])
        a = capped(model, F.mse_loss, None, opt, step=step)
        b = cold(model, F.mse_loss, None, opt, step=step)
        assert a["sharpness_matvecs"] == 2.0
        assert a["sharpness"] <= ref * (1 + 1e-9)  # Ritz values approach the top eigenvalue from below
        assert b["sharpness"] == pytest.approx(ref, rel=1e-7) and b["sharpness_matvecs"] > 2
    with pytest.raises(ValueError, match="warm_iter"):
        Sharpness(warm_iter=1)
    with pytest.raises(ValueError, match="warm must"):
        Sharpness(warm="no")



def _train_with(monitors, steps=20, lr=0.05):
    """A plain full-batch loop on the small MLP; every reading as (step, scalars), in the order handed out."""
    model = _mlp(d=8, h=16, k=3)
    x, y = _eos_data(n=64, d=8, k=3)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ms = MonitorSet(monitors(x, y), loss_fn=F.mse_loss)
    got, handed = [], []
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        out = ms.after_step(model, (x, y), opt, step)
        if out:
            got.append((step, out))
        late = ms.pop_readings()
        handed.append((step, [s for s, _ in late]))
        got += late
    got += ms.pop_readings(wait=True)
    ms.close()
    return got, handed, model, (x, y)


def test_background_sharpness_reads_the_same_numbers_at_the_steps_it_measured():
    """``background=True``: each check measures a copy of the weights of its step in a worker thread; the
    reading equals the foreground one bit for bit, is handed out when the monitor next comes due (whatever
    the timing) and the last one by ``pop_readings(wait=True)``."""
    def mons(bg):
        return lambda x, y: [Sharpness(every=5, probe=(x, y), max_iter=40, tol=1e-6, background=bg)]

    fg, _, model, data = _train_with(mons(False))
    bg, handed, model_bg, _ = _train_with(mons(True))
    assert [s for s, _ in bg] == [s for s, _ in fg] == [5, 10, 15, 20]
    for (_, a), (_, b) in zip(fg, bg):
        assert {k: v for k, v in b.items() if k != "sharpness_seconds"} == a
        assert b["sharpness_seconds"] > 0
    assert [h for h in handed if h[1]] == [(10, [5]), (15, [10]), (20, [15])]  # collected when due again
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_bg.parameters()))
    ref = float(hessian_eigenvalues(model_bg, F.mse_loss, data, k=1, tol=1e-10, max_iter=200)[0])
    assert bg[-1][1]["sharpness"] == pytest.approx(ref, rel=1e-6)


def test_background_is_refused_where_it_cannot_be_measured_apart():
    from sgdlab.errors import ConfigError
    from sgdlab.monitors import Monitor
    from sgdlab.train.config import load_config

    with pytest.raises(ValueError, match="background: Monitor cannot run its checks in the background"):
        Monitor(every=5, background=True)
    with pytest.raises(ConfigError, match=r"unknown key 'monitors\[0\].background'"):
        load_config({"monitors": [{"name": "norms", "background": True}]})
    with pytest.raises(ValueError, match="background must be true or false"):
        Sharpness(background="yes")
    x, y = torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,))
    model = nn.Sequential(nn.Embedding(20, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                          nn.Flatten(), nn.Linear(40, 3))
    ms = MonitorSet([Sharpness(every=1, probe=(x, y), background=True)], loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match=r"model with attention \(1: TransformerEncoderLayer\)"):
        ms.after_step(model, None, None, 1)
    with pytest.raises(ValueError, match="transformers callback"):
        from sgdlab.integrations.monitors_hf import MonitorCallback

        MonitorCallback([Sharpness(every=2, background=True)], F.mse_loss, probe=(x, y))


def test_a_failed_background_check_is_raised_with_its_step():
    class Broken(Sharpness):
        def measure(self, model, loss_fn, batch, optimizer, step):
            raise RuntimeError("no curvature here")

    with pytest.raises(RuntimeError, match="background check of 'sharpness' at step 5 failed: no curvature"):
        _train_with(lambda x, y: [Broken(every=5, probe=(x, y), background=True)], steps=10)


def test_engine_sharpness_probe_defaults_to_the_batch_size():
    from sgdlab.train.config import load_config
    from sgdlab.train.engine import build_dataset
    from sgdlab.train.monitoring import build_monitors

    sizes = []
    for mon in ({"name": "sharpness", "every": 10}, {"name": "sharpness", "every": 10, "probe": 300}):
        cfg = load_config({"data": {"name": "synthetic", "num_samples": 400, "num_test": 100},
                           "sampler": {"name": "epoch", "batch_size": 48}, "monitors": [mon]})
        (built,) = build_monitors(cfg, build_dataset(cfg), torch.device("cpu"), F.cross_entropy).set
        sizes.append(built.probe[0].shape[0])
        assert built.warm_iter == built.max_iter == 20
    assert sizes == [48, 300]


def _gd_eos(lr=2.0, steps=800, every=10, momentum=0.0):
    """Full-batch GD on squared loss (Cohen et al. 2021): the sharpness trajectory as (step, ratio to 2/lr)."""
    model = _mlp()
    x, y = _eos_data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    mon = Sharpness(every=every, probe=(x, y))
    traj = []
    for step in range(1, steps + 1):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        r = mon(model, F.mse_loss, None, opt, step)
        if r:
            traj.append((step, r["sharpness_ratio"], r["sharpness"]))
    return traj


def test_full_batch_gd_sharpens_to_the_edge_of_stability():
    """Progressive sharpening: the top eigenvalue starts at ~0.25 of 2/lr, rises to it and stays within 15%."""
    traj = _gd_eos()
    assert traj[0][1] < 0.6  # starts well below the threshold
    window = [r for s, r, _ in traj if s >= 300]
    assert len(window) == 51
    assert all(0.85 <= r <= 1.15 for r in window), [round(r, 3) for r in window]
    assert sum(window) / len(window) == pytest.approx(1.0, abs=0.1)


def test_two_batch_estimates_invert_the_expected_norms():
    g2, tr, bs, bb = 3.0, 50.0, 8, 64
    got = two_batch_estimates(g2 + tr / bs, g2 + tr / bb, bs, bb)
    assert got == pytest.approx((g2, tr), rel=1e-12)
    with pytest.raises(ValueError):
        two_batch_estimates(1.0, 1.0, 8, 8)


def test_noise_scale_interval_covers_the_exact_value_on_linear_regression():
    """Linear regression at fixed weights: per-example gradients give tr(Sigma) and |G|^2 exactly."""
    g = torch.Generator().manual_seed(1)
    n, d = 4000, 6
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 0.5 * torch.randn(n, 1, generator=g)
    model = nn.Linear(d, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(0.3)
    exact = gradient_noise_stats(model, F.mse_loss, (x, y), method="exact")["b_simple"]
    mon = GradientNoiseScale(every=1, splits=4, window=300, level=0.95)
    out = {}
    for step in range(1, 301):
        idx = torch.randint(0, n, (64,), generator=g)  # batches drawn with replacement: unbiased
        out = mon(model, F.mse_loss, (x[idx], y[idx]), None, step)
    assert out["noise_scale_lo"] <= exact <= out["noise_scale_hi"], (out, exact)
    assert out["noise_scale"] == pytest.approx(exact, rel=0.3)
    assert out["noise_scale_step_efficiency"] == pytest.approx(1 / (1 + out["noise_scale"] / 64))
    state = mon.state_dict()
    again = GradientNoiseScale(every=1, splits=4, window=300, level=0.95)
    again.load_state_dict(state)
    assert again.interval() == mon.interval()


def test_importance_monitor_uniform_scores_give_no_gain():
    """Zero weights and inputs on the unit sphere: every upper-bound score is equal, so tau = 1 and the
    importance-sampled batch has exactly the uniform one's variance."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(500, 5, generator=g), dim=1)
    y = torch.randint(0, 3, (500,), generator=g)
    model = nn.Linear(5, 3, bias=False)
    nn.init.zeros_(model.weight)
    mon = ImportanceMonitor(every=1, probe=(x, y), presample=200, batch=20)
    out = mon(model, None, None, None, 1)
    assert out["importance_tau"] == pytest.approx(1.0, abs=1e-12)
    assert out["importance_predicted_reduction"] == pytest.approx(0.0, abs=1e-12)
    assert out["importance_variance_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert out["importance_effective_batch"] == pytest.approx(20.0, abs=1e-7)


def test_importance_monitor_gains_on_a_trained_linear_model():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(500, 5, generator=g), dim=1)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(5, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-4.0, 0, 0, 0, 0], [4.0, 0, 0, 0, 0]]))
    out = ImportanceMonitor(every=1, probe=(x, y), presample=300, batch=30)(model, None, None, None, 1)
    assert out["importance_tau"] > 1.2
    assert out["importance_predicted_reduction"] == pytest.approx(1 - 1 / out["importance_tau"] ** 2)
    # with the score proportional to the exact per-example gradient norm (linear, |x| = 1), the measured
    # gain is real and the effective batch is the batch times it
    assert out["importance_variance_ratio"] > 1.2
    assert out["importance_effective_batch"] == pytest.approx(30 * out["importance_variance_ratio"])
    assert out["importance_measured_reduction"] == pytest.approx(1 - 1 / out["importance_variance_ratio"])


def test_norms_update_ratio_is_lr_times_grad_over_weight_for_plain_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Norms(every=2)
    ms = MonitorSet([mon], loss_fn=F.mse_loss)
    for step in range(2):
        ms.before_step(model, step)
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out = ms.after_step(model, (x, y), opt, step + 1)
    assert step == 1 and out
    for label, names_ in (("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"])):
        ps = dict(model.named_parameters())
        gn = math.sqrt(sum(float(ps[n].grad.pow(2).sum()) for n in names_))
        wn = math.sqrt(sum(float(w0[n].pow(2).sum()) for n in names_))
        assert out[f"norms/{label}/grad"] == pytest.approx(gn, rel=1e-6)
        assert out[f"norms/{label}/update_ratio"] == pytest.approx(0.1 * gn / wn, rel=1e-5)
    assert out["norms_weight"] == pytest.approx(
        math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.parameters())), rel=1e-6)


def test_mlflow_store_reads_back_with_mlflows_client(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from sgdlab.monitors.mlflow import MlflowLogger

    log = MlflowLogger(tmp_path / "mlruns", experiment="exp", run_name="r", params={"optim": {"lr": 0.5}})
    for step in (10, 20):
        log.log({"sharpness": 1.5 * step, "norms/(root)/grad": 2.0, "bad": float("nan"), "label": "x"}, step)
    log.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(log.run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.5"
    hist = client.get_metric_history(log.run_id, "sharpness")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(10, 15.0), (20, 30.0)]
    assert "norms/_root_/grad" in run.data.metrics and "bad" not in run.data.metrics


def test_lightning_callback_logs_the_monitors(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from sgdlab.integrations.lightning import MonitorCallback

    x, y = _eos_data(n=64, d=8, k=3)

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(d=8, h=16, k=3)

        def forward(self, inp):
            return self.net(inp)

        def training_step(self, batch, i):
            return F.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []

    class Logger(pl.loggers.logger.Logger):
        name, version = "mem", 0

        @property
        def experiment(self):
            return None

        def log_hyperparams(self, *a, **k):
            pass

        def log_metrics(self, metrics, step=None):
            seen.append((step, dict(metrics)))

    cb = MonitorCallback([Sharpness(every=3, probe=(x, y), max_iter=60, warm_iter=None, tol=1e-10), Norms(every=3)],
                         F.mse_loss)
    model = M()
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, callbacks=[cb], logger=Logger(), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer.fit(model, loader)
    steps = [s for s, m in seen if "sharpness" in m]
    assert steps == [3, 6] and [s for s, _ in cb.history] == [3, 6]
    ref = float(hessian_eigenvalues(model, F.mse_loss, (x, y), k=1, tol=1e-10, max_iter=200)[0])
    assert cb.last["sharpness"] == pytest.approx(ref, rel=1e-6)
    assert cb.last["norms_update_ratio"] > 0 and cb.last["sharpness_2_over_lr"] == pytest.approx(20.0)


def test_transformers_callback_logs_through_the_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sgdlab.integrations.monitors_hf import MonitorCallback

    x, y = _eos_data(n=32, d=8, k=3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp(d=8, h=16, k=3)

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": F.mse_loss(out, labels), "logits": out} if labels is not None else out

    rows = [{"x": x[i], "labels": y[i]} for i in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=0.1, lr_scheduler_type="constant", optim="sgd",
                                          report_to=[], logging_steps=100, use_cpu=True, save_strategy="no")
    model = Net()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    with pytest.raises(ValueError, match="probe"):
        MonitorCallback([Sharpness(every=2)], F.mse_loss)
    MonitorCallback([Sharpness(every=2, max_iter=60, warm_iter=None, tol=1e-10), Norms(every=2)], F.mse_loss,
                    probe=(x, y)).attach(trainer)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "sharpness" in r]
    assert [r["step"] for r in logged] == [2, 4]
    ref = float(hessian_eigenvalues(model, F.mse_loss, (x, y), k=1, tol=1e-10, max_iter=200)[0])
    assert logged[-1]["sharpness"] == pytest.approx(ref, rel=1e-6)
    assert logged[-1]["sharpness_2_over_lr"] == pytest.approx(20.0)
    assert "norms_update_ratio" in logged[-1]


# ------------------------------------------------------------------------------------------------ engine

def _cfg(steps=60, monitors=True, **log):
    c = {"seed": 3, "duration": f"{steps} steps", "data": {"name": "synthetic", "num_samples": 400, "num_test": 100},
         "model": {"name": "mlp", "hidden": [16]}, "sampler": {"name": "replacement", "batch_size": 32},
         "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "eval": {"every": 0},
         "checkpoint": {"every": 30}, "log": {"every": 10, "progress": False, **log}}
    if monitors:
        c["monitors"] = [{"name": "sharpness", "every": 20, "probe": 200, "tol": 1e-8, "max_iter": 60,
                          "warm_iter": None},
                         {"name": "noise_scale", "every": 20}, {"name": "norms", "every": 30}]
    return c


def _rows(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_engine_runs_the_monitors_without_changing_training(tmp_path):
    from sgdlab.train import load_run, run

    run(_cfg(monitors=False), tmp_path / "plain", quiet=True)
    run(_cfg(), tmp_path / "mon", quiet=True)
    plain = {r["step"]: r for r in _rows(tmp_path / "plain")}
    mon = {r["step"]: r for r in _rows(tmp_path / "mon")}
    assert all(mon[s]["train_loss"] == r["train_loss"] for s, r in plain.items())  # bit-identical training
    assert [s for s, r in mon.items() if "sharpness" in r] == [20, 40, 60]
    assert [s for s, r in mon.items() if "norms_update_ratio" in r] == [30, 60]
    assert [s for s, r in mon.items() if "noise_scale_raw" in r] == [20, 40, 60]
    assert mon[60]["sharpness_threshold"] == pytest.approx((2 + 2 * 0.9) / 0.1)
    # the eigenvalue is that of the trained data loss on the probe (200 training examples drawn from the seed)
    cfg, model, ds = load_run(tmp_path / "mon")
    idx = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(cfg.seed + 7919))[:200]
    ref = hessian_eigenvalues(model, F.cross_entropy, (ds.train_x[idx], ds.train_y[idx]), k=1, tol=1e-10,
                              max_iter=200)
    assert mon[60]["sharpness"] == pytest.approx(float(ref[0]), rel=1e-6)


def test_engine_monitors_resume_exactly(tmp_path):
    from sgdlab.train import resume, run

    run(_cfg(), tmp_path / "full", quiet=True)
    run(_cfg(steps=30), tmp_path / "part", quiet=True)
    resume(tmp_path / "part", overrides=["duration=60 steps"], quiet=True)
    full, part = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    SKIP = ("time", "monitor_time", "test_acc", "test_loss")  # clocks; the shorter run evaluated at its end
    assert len(full) == len(part) and any("sharpness" in r for r in part[3:])
    for a, b in zip(full, part):
        assert {k: v for k, v in a.items() if k not in SKIP} == \
               {k: v for k, v in b.items() if k not in SKIP}



def test_engine_background_sharpness_logs_rows_at_the_measured_steps_and_resumes_exactly(tmp_path):
    """``background: true`` in the config: training is bit-identical, the eigenvalues equal the foreground
    run's at the same steps (rows of their own, read back in step order) and a resumed run ends with the
    same readings as an uninterrupted one."""
    from sgdlab.train import resume, run

    def cfg(steps=60, background=True):
        c = _cfg(steps=steps)
        c["monitors"] = [dict(c["monitors"][0], background=background)]
        return c

    def readings(run_dir):
        from sgdlab.experiments.aggregate import read_metrics

        return [(r["step"], r["sharpness"], r["sharpness_matvecs"]) for r in read_metrics(run_dir)
                if "sharpness" in r]

    run(cfg(background=False), tmp_path / "fg", quiet=True)
    run(cfg(), tmp_path / "bg", quiet=True)
    fg = {r["step"]: r for r in _rows(tmp_path / "fg")}
    bg = [r for r in _rows(tmp_path / "bg")]
    assert all(r["train_loss"] == fg[r["step"]]["train_loss"] for r in bg if "train_loss" in r)
    assert readings(tmp_path / "bg") == readings(tmp_path / "fg") and [s for s, *_ in readings(tmp_path / "bg")] == [20, 40, 60]
    late = [r for r in bg if "sharpness" in r]
    assert all(set(r) >= {"step", "epoch", "sharpness_seconds"} and "train_loss" not in r for r in late)
    run(cfg(steps=30), tmp_path / "part", quiet=True)  # the check at 20 is collected by the checkpoint at 30
    resume(tmp_path / "part", overrides=["duration=60 steps"], quiet=True)
    assert readings(tmp_path / "part") == readings(tmp_path / "bg")


def test_engine_logs_monitors_to_mlflow_and_the_report_plots_them(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from sgdlab.experiments.report import write_report
    from sgdlab.train import run

    run(_cfg(mlflow=True), tmp_path / "r", quiet=True)
    run_id = (tmp_path / "r" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=(tmp_path / "r" / "mlruns").resolve().as_uri())
    hist = sorted(client.get_metric_history(run_id, "sharpness"), key=lambda m: m.step)
    rows = [r for r in _rows(tmp_path / "r") if "sharpness" in r]
    assert [(m.step, m.value) for m in hist] == [(r["step"], r["sharpness"]) for r in rows]
    assert client.get_run(run_id).data.params["optim.lr"] == "0.1"
    assert len(client.get_metric_history(run_id, "train_loss")) == 6
    paths = write_report(tmp_path / "r")
    md = paths["markdown"].read_text()
    assert "## Monitors" in md and "monitor_sharpness.png" in md and "monitor_noise_scale.png" in md
    assert (tmp_path / "r" / "monitor_sharpness.png").stat().st_size > 1000


def test_monitor_config_errors_name_the_key():
    from sgdlab.errors import ConfigError
    from sgdlab.train.config import load_config

    with pytest.raises(ConfigError, match=r"monitors\[0\].name: unknown monitor 'sharpnes' \(did you mean 'sharpness'"):
        load_config({"monitors": [{"name": "sharpnes"}]})
    with pytest.raises(ConfigError, match=r"unknown key 'monitors\[0\].max_iters' \(did you mean 'monitors\[0\].max_iter'"):
        load_config({"monitors": [{"name": "sharpness", "max_iters": 3}]})
    with pytest.raises(ConfigError, match=r"missing key 'monitors\[0\].name'"):
        load_config({"monitors": [{"every": 3}]})
    with pytest.raises(ConfigError, match="log.mlflow"):
        load_config({"log": {"mlflow": 3}})


def test_monitor_probe_on_a_batch_monitor_is_refused():
    from sgdlab.errors import ConfigError
    from sgdlab.train.config import load_config

    with pytest.raises(ConfigError, match=r"monitors\[0\].probe: noise_scale measures the batch just trained on"):
        load_config({"monitors": [{"name": "noise_scale", "every": 10, "probe": 100}]})


def test_monitors_import_no_engine_layer():
    """sgdlab.monitors sits below sgdlab.train: importing it pulls in neither train, experiments nor cli."""
    import subprocess
    import sys

    code = ("import sys, sgdlab.monitors; bad = [m for m in sys.modules if m.startswith(('sgdlab.train', "
            "'sgdlab.experiments', 'sgdlab.cli', 'sgdlab.integrations'))]; print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_benchmark_accuracy_replay_compares_against_converged_solves():
    """benchmarks/monitors.py's accuracy replay: the default monitor matches the converged reference along
    a short cnn1d run, and a 2-product cap reads at or below it (Ritz values approach from below)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "monitors.py"
    spec = importlib.util.spec_from_file_location("bench_monitors", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_variant("default") == {} and bench.parse_variant("warm_iter=3,probe=64") == {
        "warm_iter": 3, "probe": 64}
    exact = bench.accuracy({"warm_iter": None, "tol": 1e-7, "max_iter": 150}, steps=120, every=40, seed=0)
    capped = bench.accuracy({"warm_iter": 2}, steps=120, every=40, seed=0)
    assert len(exact) == len(capped) == 2  # checks at 80 and 120; the first (cold) one is left out
    assert max(abs(e) for e in exact) < 1e-5
    assert all(e <= 1e-6 for e in capped)
