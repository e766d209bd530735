"""A release people can adopt: suggestions for keys other libraries name differently, quick-mode regimes,
the package's version and changelog."""

from __future__ import annotations

import json

import pytest

from sgdlab.cli import main
from sgdlab.experiments.protocol import load_protocol
from sgdlab.train import ConfigError, load_config


@pytest.mark.parametrize("override, hint", [
    ("optim.learning_rate=0.1", "unknown key 'optim.learning_rate' (did you mean 'optim.lr'?)"),
    ("sampler.batchsize=32", "unknown key 'sampler.batchsize' (did you mean 'sampler.batch_size'?)"),
    ("optim.wd=0.1", "unknown key 'optim.wd' (did you mean 'optim.weight_decay'?)"),
])
def test_keys_named_as_other_libraries_name_them_get_our_name(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config({}, [override])
    assert str(e.value) == hint


@pytest.mark.parametrize("override", ["data.name=digits", "model.name=resnet9000", "sampler.name=mine"])
def test_an_unknown_dataset_model_or_sampler_points_to_import(override):
    with pytest.raises(ConfigError, match=r"unknown .*--import MODULE or 'imports: \[MODULE\]' \(docs/custom.md\)"):
        load_config({}, [override])


def test_quick_mode_states_the_regime_that_ran():
    proto = load_protocol("srs")[0]
    assert proto.regime_that_ran() == " ".join(proto.regime.split()).rstrip(".")
    quick = proto.regime_that_ran(quick=True)
    assert quick.startswith("quick mode (duration=2 epochs; eval.every=0; seeds 100, 101; arms epoch late, "
                            "srs late), a pilot of the protocol's regime: mnist5k")
    assert "50 epochs" in quick  # the full regime is named as what the pilot shortens, not as what ran


def test_a_quick_study_says_so_in_every_verdict(tmp_path, monkeypatch):
    from test_studies import TINY

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert main(["study", str(tmp_path / "tiny.yaml"), "--quick", "--out", str(tmp_path / "q"), "--jobs", "1",
                 "--quiet"]) == 0
    verdicts = json.loads((tmp_path / "q" / "verdicts.json").read_text())["verdicts"]
    assert verdicts and all(v["text"].startswith("In regime quick mode (duration=15 steps; seeds 10, 11), a pilot "
                                                 "of the protocol's regime: MNIST-1D, mlp 16 hidden, 30 steps: ")
                            for v in verdicts)
