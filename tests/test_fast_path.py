"""The fast-path switches change speed, not results."""

import json

import pytest
import torch

from sgdlab import data, train

BASE = {"seed": 1, "duration": "30 steps", "model": {"name": "cnn2d", "in_channels": 3, "size": 32, "channels": 8},
        "sampler": {"name": "epoch", "batch_size": 8}, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "eval": {"every": 10}, "checkpoint": {"every": 0}, "log": {"every": 5, "progress": False}}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return str(data.write_synthetic_cifar(tmp_path_factory.mktemp("cifar"), "cifar10", train_per_file=16, test=16))


def _rows(d):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(d / "metrics.jsonl")]


def test_device_resident_loader_gives_the_same_run(tmp_path, cifar_root):
    for on_device in (False, True):
        cfg = dict(BASE, data={"name": "cifar10", "root": cifar_root, "augment": True, "on_device": on_device})
        train.run(cfg, tmp_path / str(on_device), quiet=True)
    assert _rows(tmp_path / "False") == _rows(tmp_path / "True")


def test_channels_last_changes_nothing_on_cpu(tmp_path, cifar_root):
    for cl in (False, True):
        cfg = dict(BASE, data={"name": "cifar10", "root": cifar_root, "augment": True}, fast={"channels_last": cl})
        train.run(cfg, tmp_path / str(cl), quiet=True)
    a, b = _rows(tmp_path / "False"), _rows(tmp_path / "True")
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), k


def test_bf16_autocast_trains(tmp_path):
    cfg = {"seed": 0, "duration": "150 steps", "data": {"name": "mnist1d"}, "model": {"name": "mlp"},
           "sampler": {"name": "epoch", "batch_size": 100}, "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
           "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"every": 10, "progress": False}}
    train.run(dict(cfg, fast={"autocast": "bf16"}), tmp_path / "amp", quiet=True)
    train.run(cfg, tmp_path / "fp32", quiet=True)
    amp, fp32 = _rows(tmp_path / "amp"), _rows(tmp_path / "fp32")
    assert amp[-1]["train_loss"] < 0.7 * amp[0]["train_loss"]
    assert amp[-1]["test_acc"] == pytest.approx(fp32[-1]["test_acc"], abs=0.05)
    assert amp != fp32  # it really ran in reduced precision


@pytest.mark.slow
def test_compile_trains(tmp_path):
    cfg = {"seed": 0, "duration": "60 steps", "data": {"name": "mnist1d"}, "model": {"name": "mlp"},
           "sampler": {"name": "epoch", "batch_size": 100}, "fast": {"compile": True},
           "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"progress": False}}
    train.run(cfg, tmp_path / "c", quiet=True)
    eager = dict(cfg, fast={"compile": False})
    train.run(eager, tmp_path / "e", quiet=True)
    a, b = _rows(tmp_path / "c"), _rows(tmp_path / "e")
    assert a[-1]["test_acc"] == pytest.approx(b[-1]["test_acc"], abs=0.02)
    assert torch.isfinite(torch.tensor(a[-1]["train_loss"]))
