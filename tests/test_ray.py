import pytest

from sgdlab.experiments import sweep as sw

ray = pytest.importorskip("ray", reason="the Ray backend is optional: pip install 'sgdlab[ray]'")

TINY = {
    "duration": "30 steps", "data": {"name": "mnist1d"}, "model": {"name": "mlp", "hidden": [16]},
    "sampler": {"name": "epoch", "batch_size": 50}, "optim": {"lr": 0.05}, "eval": {"every": 0},
    "checkpoint": {"every": 0}, "log": {"every": 10},
}


def test_ray_backend_on_a_local_instance(tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        m = sw.run_sweep(TINY, sw.grid_points({"optim.lr": [0.1, 0.01]}), 1, tmp_path / "s", backend="ray",
                         progress=False)
        assert m["counts"]["ran"] == 2
        assert [t["status"] for t in m["trials"]] == ["completed", "completed"]
        # finished trials are skipped on the cluster as well
        m = sw.run_sweep(TINY, sw.grid_points({"optim.lr": [0.1, 0.01]}), 1, tmp_path / "s", backend="ray",
                         progress=False)
        assert m["counts"]["skipped"] == 2
    finally:
        ray.shutdown()
