import subprocess
import sys

import pytest
import torch
import yaml

from sgdlab import data
from sgdlab.cli import main

BASE = {"duration": "20 steps", "data": {"name": "mnist1d"}, "model": {"name": "mlp"},
        "sampler": {"name": "epoch", "batch_size": 50}, "log": {"progress": False},
        "eval": {"every": 0}, "checkpoint": {"every": 0}}


def _write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("patch,needle", [
    ({"optim": {"lr": 0.1, "momentun": 0.9}}, "unknown key 'optim.momentun' (did you mean 'optim.momentum'?)"),
    ({"sampler": {"name": "epoch", "batch_size": "many"}}, "'sampler.batch_size'"),
    ({"optim": {"lr": -1}}, "'optim.lr'"),
    ({"durration": "5 steps"}, "unknown key 'durration' (did you mean 'duration'?)"),
    ({"duration": "5 fortnights"}, "'duration'"),
    ({"model": {"name": "cnn1e"}}, "unknown model 'cnn1e' (did you mean 'cnn1d'?)"),
    ({"model": {"name": "mlp", "hiden": [3]}}, "unknown key 'model.hiden' (did you mean 'model.hidden'?)"),
    ({"sampler": {"name": "epoc", "batch_size": 5}}, "unknown sampler 'epoc'"),
    ({"loss": {"random_gradiant": {}}}, "unknown key 'loss.random_gradiant'"),
    ({"schedule": {"name": "cosine", "unit": "weeks"}}, "'schedule.unit'"),
    ({"seed": True}, "invalid value for 'seed': expected a number, not a boolean (got True)"),
    ({"optim": {"betas": [0.9]}}, "invalid value for 'optim.betas': expected a list of 2 values, got [0.9]"),
    ({"sampler": {"name": "epoch", "batch_size": True}}, "'sampler.batch_size'"),
    ({"optim": {"lr": 0.1, "momentum": 0.0, "nesterov": True}}, "nesterov needs optim.name 'sgd' and a momentum > 0"),
    ({"optim": {"name": "adam", "lr": 0.1, "betas": [0.9, 2]}}, "betas must both lie in [0, 1)"),
    ({"schedule": {"name": "multistep", "milestones": [20, 10]}}, "milestones must be strictly increasing"),
    ({"schedule": {"name": "triangular"}}, "the triangular schedule needs a period"),
    ({"loss": {"name": "mse", "label_smoothing": 0.1}}, "label_smoothing applies to cross_entropy only"),
    ({"data": {"name": "mnist1d", "train_split": 2}}, "train_split must be a fraction strictly between 0 and 1"),
    ({"model": {"name": "mlp", "hidden": "abc"}}, "model (mlp"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, capsys, patch, needle):
    code, out = _run(["run", _write(tmp_path, {**BASE, **patch}), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert needle in out.err
    assert "Traceback" not in out.err and "Value error" not in out.err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_bad_override_exits_2(tmp_path, capsys):
    code, out = _run(["run", _write(tmp_path, BASE), "optim.nesterov=maybe", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "'optim.nesterov'" in out.err


def test_missing_cifar_folder_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SGDLAB_CIFAR10", raising=False)
    monkeypatch.delenv("SGDLAB_DATA", raising=False)
    cfg = {**BASE, "data": {"name": "cifar10", "root": str(tmp_path / "absent")}, "model": {"name": "cnn2d"}}
    code, out = _run(["run", _write(tmp_path, cfg), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "no CIFAR files found" in out.err and "SGDLAB_CIFAR10" in out.err


def test_cifar_folder_missing_one_file_names_it(tmp_path, capsys):
    folder = data.write_synthetic_cifar(tmp_path / "c", "cifar10", train_per_file=4, test=4)
    (folder / "data_batch_3").unlink()
    cfg = {**BASE, "data": {"name": "cifar10", "root": str(folder)}}
    code, out = _run(["run", _write(tmp_path, cfg), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "lacks data_batch_3" in out.err and "Traceback" not in out.err


def test_cuda_device_without_cuda_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out = _run(["run", _write(tmp_path, {**BASE, "device": "cuda"}), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "CUDA is not available" in out.err


def test_truncated_cifar_file_exits_2(tmp_path, capsys):
    folder = data.write_synthetic_cifar(tmp_path / "c", "cifar10", train_per_file=4, test=4)
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[:100])
    cfg = {**BASE, "data": {"name": "cifar10", "root": str(folder)}}
    code, out = _run(["run", _write(tmp_path, cfg), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "test_batch" in out.err and "truncated" in out.err


def test_run_with_overrides_and_cifar_end_to_end(tmp_path, capsys):
    folder = data.write_synthetic_cifar(tmp_path / "c", "cifar10", train_per_file=8, test=8)
    cfg = {**BASE, "data": {"name": "cifar10", "root": str(folder), "augment": True},
           "model": {"name": "cnn2d", "in_channels": 3, "size": 32}, "sampler": {"name": "epoch", "batch_size": 10}}
    code, out = _run(["run", _write(tmp_path, cfg), "optim.lr=0.01", "duration=4 steps", "--out",
                      str(tmp_path / "r")], capsys)
    assert code == 0, out.err
    assert "final test accuracy" in out.out
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01 and saved["duration"] == "4 steps"


def test_check_reports_missing_data_but_validates_the_rest(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SGDLAB_CIFAR10", raising=False)
    monkeypatch.delenv("SGDLAB_DATA", raising=False)
    cfg = {**BASE, "data": {"name": "cifar10", "root": str(tmp_path / "absent")},
           "model": {"name": "cnn2d", "in_channels": 3, "size": 32}}
    code, out = _run(["check", _write(tmp_path, cfg)], capsys)
    assert code == 0 and "files missing" in out.out and "model: cnn2d" in out.out
    assert "step: one training step on a batch of shape (8, 3, 32, 32)" in out.out
    # without options the model takes its input shape from the data ...
    cfg["model"] = {"name": "cnn2d"}
    code, out = _run(["check", _write(tmp_path, cfg, "from_data.yaml")], capsys)
    assert code == 0 and "step: one training step" in out.out
    # ... and a model pinned to one channel cannot take CIFAR's images: the check fails, as its run would
    cfg["model"] = {"name": "cnn2d", "in_channels": 1, "size": 32}
    code, out = _run(["check", _write(tmp_path, cfg, "one_channel.yaml")], capsys)
    assert code == 2 and "expected input[8, 3, 32, 32] to have 1 channels" in out.err
    code, out = _run(["check", _write(tmp_path, {**BASE, "model": {"name": "nope"}}, "bad.yaml")], capsys)
    assert code == 2 and "FAILED" in out.out


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    bad = _write(tmp_path, {**BASE, "optim": {"lrr": 0.1}})
    p = subprocess.run([sys.executable, "-m", "sgdlab.cli", "run", bad], capture_output=True, text=True)
    assert p.returncode == 2 and "optim.lrr" in p.stderr and "Traceback" not in p.stderr
