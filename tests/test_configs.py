"""Every shipped config validates and instantiates (``sgdlab check``), data files present or not."""

from pathlib import Path

import pytest

from sgdlab.train.check import check_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_checks(path, monkeypatch):
    monkeypatch.delenv("SGDLAB_CIFAR10", raising=False)
    monkeypatch.delenv("SGDLAB_CIFAR100", raising=False)
    # the training step of check runs for the small models; the big CIFAR ones are validated on the meta device
    ok, lines = check_config(path, step=path.parent.name == "mini")
    assert ok, "\n".join(lines)
    assert any(line.startswith("model:") for line in lines)
