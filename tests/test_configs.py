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


TINY = {"duration": "20 steps", "data": {"name": "mnist1d"}, "model": {"name": "mlp", "hidden": [32]},
        "sampler": {"name": "epoch", "batch_size": 50}, "eval": {"every": 0}, "checkpoint": {"every": 0},
        "log": {"progress": False}}


def _tiny(tmp_path) -> Path:
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_threads_beyond_the_limit_are_refused(tmp_path, capsys):
    """torch.set_num_threads takes a C int: a huge 'threads' must fail in check, not crash run."""
    from sgdlab.cli import main
    from sgdlab.errors import ConfigError
    from sgdlab.train.config import load_config

    with pytest.raises(ConfigError, match="threads"):
        load_config(dict(TINY, threads=99999999999))
    assert load_config(dict(TINY, threads=4096)).threads == 4096
    assert main(["check", str(_tiny(tmp_path)), "--threads", "99999999999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgdlab: error: ") and "'threads'" in err and "4096" in err


@pytest.mark.parametrize("module, source, expect", [
    ("", None, "''"),
    ("sgdlab_raises_on_import", "raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    ("sgdlab_bad_syntax", "def (\n", "SyntaxError"),
], ids=["empty", "raises", "syntax"])
def test_import_that_fails_is_one_line_naming_the_module(module, source, expect, tmp_path, monkeypatch, capsys):
    from sgdlab import cli
    from sgdlab.train import config

    monkeypatch.setattr(config, "_CLI_IMPORTS", [])
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    assert cli.main(["--import", module, "check", str(_tiny(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sgdlab: error: --import: cannot import {module!r}") and expect in err
    assert err.count("\n") == 1 and "Traceback" not in err
