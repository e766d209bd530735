"""`sgdlab analyze` on real run directories writes JSON results and PNG plots."""

import json

import pytest

from sgdlab import train
from sgdlab.cli import main

RUN = {"seed": 0, "duration": "60 steps", "data": {"name": "mnist1d"}, "model": {"name": "mlp", "hidden": [16]},
       "sampler": {"name": "epoch", "batch_size": 100}, "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
       "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"progress": False}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    train.run(RUN, root / "small", quiet=True)
    train.run(dict(RUN, sampler={"name": "epoch", "batch_size": 1000}, seed=1), root / "large", quiet=True)
    return root


@pytest.mark.parametrize("kind", ["sharpness", "hessian", "noise"])
def test_analyze_single_run(runs, kind, capsys):
    assert main(["analyze", kind, str(runs / "small")]) == 0
    out = runs / "small" / "analysis" / f"{kind}.json"
    assert out.is_file()
    result = json.loads(out.read_text())
    assert result


def test_analyze_interpolation_between_two_runs(runs, capsys):
    assert main(["analyze", "interpolate", str(runs / "small"), str(runs / "large")]) == 0
    written = capsys.readouterr().out.split()
    assert any(p.endswith(".png") for p in written) and any(p.endswith(".json") for p in written)
