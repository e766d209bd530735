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


def test_analyze_hessian_blocks_prints_the_per_block_table(runs, capsys):
    code = main(["analyze", "hessian", str(runs / "small"), "--blocks", "-k", "2", "--examples", "300",
                 "--samples", "12"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((runs / "small" / "analysis" / "hessian.json").read_text())
    blocks = result["blocks"]["blocks"]
    assert len(blocks) == 2  # the two Linear layers of the MLP
    assert [(b["block"], b["module"]) for b in blocks] == [("net.0", "Linear"), ("net.2", "Linear")]
    assert "net.0 (Linear)" in out and "net.2 (Linear)" in out  # named by module path and class
    for b in blocks:  # every block's numbers are printed, not only the file paths
        assert b["block"] in out and f"{b['trace']['value']:.6g}" in out
        assert f"{b['top_eigenvalues']['values'][0]:.6g}" in out
    # the layers partition the parameters, and their traces sum as printed
    assert sum(b["num_params"] for b in blocks) == result["spectral_density"]["dim"]
    assert result["blocks"]["sum_of_block_traces"] == pytest.approx(sum(b["trace"]["value"] for b in blocks))
    assert f"{result['eigenvalues']['values'][0]:.6g}" in out and "95% interval" in out
    assert result["num_examples"] == 300 and len(result["eigenvalues"]["values"]) == 2


def test_analyze_noise_prints_the_interval(runs, capsys):
    assert main(["analyze", "noise", str(runs / "small"), "--examples", "200", "--pairs", "20",
                 "--split", "test"]) == 0
    out = capsys.readouterr().out
    result = json.loads((runs / "small" / "analysis" / "noise.json").read_text())
    tb = result["gradient_noise_scale"]["two_batch"]
    assert result["split"] == "test" and tb["num_pairs"] == 20
    assert f"{tb['b_simple_interval'][0]:.5g}" in out and "two-batch" in out
    assert f"{result['gradient_noise_scale']['exact']['b_simple']:.5g}" in out


@pytest.mark.parametrize("argv, word", [
    (["analyze", "hessian", "{run}", "-k", "0"], "k must be a positive integer"),
    (["analyze", "hessian", "{run}", "--samples", "3"], "samples must be an integer >= 4"),
    (["analyze", "hessian", "{run}", "--resamples", "1"], "resamples"),
    (["analyze", "sharpness", "{run}", "--eps", "-1"], "eps must be positive"),
    (["analyze", "noise", "{run}", "--noise-batch-sizes", "64,8"], "noise-batch-sizes"),
    (["analyze", "hessian", "{missing}"], "does not exist"),
    (["analyze", "hessian", "{empty}"], "not a finished run directory (no config.yaml)"),
    (["analyze", "interpolate", "{run}"], "takes 2 run directories"),
    (["analyze", "noise", "{run}", "--threads", "0"], "threads must be a whole number from 1"),
])
def test_analyze_errors_are_one_line_with_exit_2(runs, tmp_path, capsys, argv, word):
    (tmp_path / "empty").mkdir()
    paths = {"run": str(runs / "small"), "missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty")}
    code = main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert word in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_analyze_applies_the_runs_thread_policy_and_reports_each_stage(runs):
    """Like ``run``: ``threads: auto`` gives one thread to a model under 2 million parameters, ``threads=``
    overrides it, and the caller's thread count is restored afterwards."""
    import torch

    from sgdlab.experiments.analyze import main as analyze

    threadpool_info = pytest.importorskip("threadpoolctl").threadpool_info

    seen = []

    def progress(done, total, stage):
        seen.append((done, total, stage, torch.get_num_threads()))
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        assert all(n == torch.get_num_threads() for n in blas), blas  # numpy/scipy's BLAS follows too

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        analyze("noise", runs / "small", max_examples=200, num_pairs=2, progress=progress)
        assert [(d, t, n) for d, t, _, n in seen] == [(0, 2, 1), (1, 2, 1)]
        assert "per-example" in seen[0][2] and "two-batch" in seen[1][2]
        assert torch.get_num_threads() == 2
        seen.clear()
        analyze("hessian", runs / "small", max_examples=200, k=1, num_samples=4, num_vectors=1, num_steps=4,
                blocks="layers", threads=3, progress=progress)
        assert [(d, t, n) for d, t, _, n in seen] == [(0, 4, 3), (1, 4, 3), (2, 4, 3), (3, 4, 3)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
