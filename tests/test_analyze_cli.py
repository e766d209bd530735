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


def test_noise_scale_uses_the_global_batch_of_a_data_parallel_run(runs, tmp_path):
    """``g = lr / (1 - m) (N / B - 1)`` with B the batch each step averages over: world_size x per-rank batch."""
    import shutil

    from sgdlab.experiments.analyze import main as analyze

    ddp = tmp_path / "ddp"
    shutil.copytree(runs / "small", ddp, ignore=shutil.ignore_patterns("analysis"))
    summary = json.loads((ddp / "summary.json").read_text())
    (ddp / "summary.json").write_text(json.dumps({**summary, "world_size": 2}))
    one = analyze("noise", runs / "small", max_examples=200, num_pairs=2)["results"]["sgd_noise_scale"]
    two = analyze("noise", ddp, max_examples=200, num_pairs=2)["results"]["sgd_noise_scale"]
    assert (one["world_size"], one["batch_size"]) == (1, 100)
    assert (two["world_size"], two["batch_size"], two["batch_size_per_rank"]) == (2, 200, 100)
    n = one["num_samples"]
    assert one["g"] == pytest.approx(0.1 / (1 - 0.9) * (n / 100 - 1))
    assert two["g"] == pytest.approx(0.1 / (1 - 0.9) * (n / 200 - 1))
