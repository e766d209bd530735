import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sgdlab import train
from sgdlab.errors import ConfigError
from sgdlab.experiments import sweep as sw

TINY = {
    "duration": "200 steps",
    "data": {"name": "mnist1d"},
    "model": {"name": "mlp", "hidden": [32]},
    "sampler": {"name": "epoch", "batch_size": 50},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "eval": {"every": 50},
    "checkpoint": {"every": 20},
    "log": {"every": 10, "progress": False},
}


def test_parse_grid_reads_yaml_values():
    g = sw.parse_grid(["optim.lr=0.1,1e-3", "model.hidden=[32],[64,64]", "sampler.name=epoch,srs",
                       "model.shake={forward: even},{forward: shake}"])
    assert g["optim.lr"][0] == 0.1 and float(g["optim.lr"][1]) == 1e-3
    assert g["model.hidden"] == [[32], [64, 64]]
    assert g["sampler.name"] == ["epoch", "srs"]
    assert g["model.shake"] == [{"forward": "even"}, {"forward": "shake"}]
    pts = sw.grid_points({"a": [1, 2], "b": ["x", "y"]})
    assert [dict(p.overrides) for p in pts] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"},
                                                {"a": 2, "b": "y"}]
    with pytest.raises(ConfigError, match="key=v1"):
        sw.parse_grid(["optim.lr"])


def test_trial_names_are_stable_safe_and_unique():
    a = sw.trial_name({"optim.lr": 0.1, "model.hidden": [32, 32]}, 3)
    assert a == "optim.lr=0.1__model.hidden=_32_32__seed=3"
    assert a == sw.trial_name({"optim.lr": 0.1, "model.hidden": [32, 32]}, 3)
    assert "/" not in sw.trial_name({"data.root": "/a/b"}, 0)
    long1 = sw.trial_name({"model.shake": {"forward": "shake" * 30, "x": 1}}, 0)
    long2 = sw.trial_name({"model.shake": {"forward": "shake" * 30, "x": 2}}, 0)
    assert long1 != long2 and len(long1) < 130
    assert sw.trial_name(sw.Point({"sampler.name": "srs"}, "S R/S"), 1) == "S_R_S__seed=1"


def test_plan_validates_every_trial_before_running(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        sw.plan(TINY, sw.grid_points({"optim.lrr": [0.1]}), 1)
    _base, trials = sw.plan(TINY, sw.grid_points({"optim.lr": [0.1, 0.2]}), 2)
    assert [(t.label, t.seed) for t in trials] == [("optim.lr=0.1", 0), ("optim.lr=0.1", 1),
                                                   ("optim.lr=0.2", 0), ("optim.lr=0.2", 1)]
    assert trials[3].config["optim"]["lr"] == 0.2 and trials[3].config["seed"] == 1
    assert not trials[0].config["log"]["progress"]


def _rows(d):
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in open(Path(d) / "metrics.jsonl")]


def test_sigkill_mid_sweep_then_rerun_skips_finished_and_resumes_interrupted(tmp_path):
    cfg = dict(TINY, duration="300 steps")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "sgdlab.cli", "sweep", str(cfg_path), "--seeds", "3",
                             "--jobs", "1", "--out", str(out), "--quiet", "--no-report"], env=env,
                            start_new_session=True)
    names = [sw.trial_name({}, s) for s in range(3)]
    first, second = out / names[0], out / names[1]
    deadline = time.time() + 120
    killed_mid = False
    try:
        while time.time() < deadline and proc.poll() is None:
            if sw.trial_state(first) == "completed" and (second / "checkpoints/last.pt").exists() \
                    and sw.trial_state(second) == "interrupted":
                killed_mid = True
                break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_mid, "the sweep did not reach the middle of the second trial in time"
    assert sw.trial_state(out / names[2]) == "new"
    summary0 = (first / "summary.json").read_bytes()
    mtime0 = (first / "summary.json").stat().st_mtime_ns
    ckpt0 = (first / "checkpoints/last.pt").stat().st_mtime_ns

    m = sw.run_sweep(cfg_path, None, 3, out, jobs=1, progress=False)
    assert m["counts"] == {"ran": 1, "resumed": 1, "skipped": 1, "failed": 0, "interrupted": 0}
    assert (first / "summary.json").read_bytes() == summary0
    assert (first / "summary.json").stat().st_mtime_ns == mtime0
    assert (first / "checkpoints/last.pt").stat().st_mtime_ns == ckpt0
    assert [t["status"] for t in m["trials"]] == ["completed"] * 3
    # the resumed trial is identical to an uninterrupted run of the same config and seed
    ref = tmp_path / "ref"
    train.run(dict(cfg, seed=1, log=dict(cfg["log"], progress=False)), ref, quiet=True)
    assert _rows(ref) == _rows(second)
    manifest = json.loads((out / "sweep.json").read_text())
    assert [t["name"] for t in manifest["trials"]] == names
    # a third run does nothing
    assert sw.run_sweep(cfg_path, None, 3, out, jobs=1, progress=False)["counts"]["skipped"] == 3


def test_parallel_sweep_and_changed_config_is_refused(tmp_path):
    cfg = dict(TINY, duration="30 steps", eval={"every": 0}, checkpoint={"every": 0})
    m = sw.run_sweep(cfg, sw.grid_points({"optim.lr": [0.1, 0.01]}), 1, tmp_path / "s", jobs=2, progress=False)
    assert m["counts"]["ran"] == 2 and all(t["status"] == "completed" for t in m["trials"])
    with pytest.raises(ConfigError, match="different config"):
        sw.run_sweep(dict(cfg, duration="40 steps"), sw.grid_points({"optim.lr": [0.1]}), 1, tmp_path / "s",
                     progress=False)


def test_cli_sweep_exit_codes(tmp_path, capsys):
    from sgdlab.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(TINY, duration="20 steps", eval={"every": 0})))
    assert main(["sweep", str(cfg_path), "--grid", "optim.lrr=0.1", "--out", str(tmp_path / "x")]) == 2
    assert main(["sweep", str(cfg_path), "--grid", "optim.lr=0.1,0.05", "--seeds", "1", "--jobs", "1",
                 "--out", str(tmp_path / "y"), "--quiet"]) == 0
    assert (tmp_path / "y" / "report.html").is_file()
    assert "skipped 0" in capsys.readouterr().out


def test_ray_backend_without_ray_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    cfg = dict(TINY, duration="10 steps", eval={"every": 0}, checkpoint={"every": 0})
    with pytest.raises(ConfigError, match=r"pip install 'sgdlab\[ray\]'"):
        sw.run_sweep(cfg, None, 1, tmp_path / "r", backend="ray", progress=False)


def test_in_process_trials_run_on_one_thread_like_the_workers(tmp_path):
    """--jobs 1 must give the numbers of --jobs 2 (one thread per worker), and leave the caller's threads."""
    import torch

    # a conv net with batch 128: big enough that torch splits its kernels over two threads
    cfg = dict(TINY, duration="40 steps", model={"name": "cnn1d"}, sampler={"name": "epoch", "batch_size": 128})
    before = torch.get_num_threads()  # the test session runs on one thread (conftest)
    torch.set_num_threads(2)
    try:
        sw.run_sweep(cfg, None, [0], tmp_path / "s", jobs=1, progress=False)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        train.run(dict(cfg, seed=0), tmp_path / "one", quiet=True)
    finally:
        torch.set_num_threads(before)
    trial = next(p for p in (tmp_path / "s").iterdir() if (p / "metrics.jsonl").is_file())
    a = torch.load(trial / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_as_a_grid_key_is_refused(tmp_path, capsys):
    """--seeds sets every trial's seed, so a seed grid would give groups of identical runs."""
    from sgdlab.cli import main

    with pytest.raises(ConfigError, match=r"grid key 'seed'.*--seeds"):
        sw.plan(TINY, sw.grid_points({"seed": [1, 2]}), 2)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    assert main(["sweep", str(cfg_path), "--grid", "seed=1,2", "--seeds", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgdlab: error: ") and "'seed'" in err and "--seeds" in err
    assert not (tmp_path / "x").exists()


def test_too_many_trials_are_refused_before_planning(tmp_path, capsys):
    from sgdlab.cli import main

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    assert main(["sweep", str(cfg_path), "--seeds", "10000000000", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgdlab: error: ") and "--seeds" in err and "100,000" in err
    with pytest.raises(ConfigError, match="--grid"):
        sw.grid_points({f"k{i}": list(range(10)) for i in range(6)})  # 10**6 points
    with pytest.raises(ConfigError, match="--seeds/--grid"):
        sw.plan(TINY, sw.grid_points({"optim.lr": [0.1, 0.2]}), 60_000)


def test_bad_baseline_is_refused_before_any_trial_runs(tmp_path):
    points = sw.grid_points({"optim.lr": [0.1, 0.2]})
    for baseline in ("x=y", "optim.lr=0.3", "label=nope", "nokey"):
        with pytest.raises(ConfigError, match="--baseline"):
            sw.run_sweep(TINY, points, 1, tmp_path / "s", progress=False, baseline=baseline)
    assert not (tmp_path / "s").exists()
