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


def test_ray_backend_stops_on_a_signal_and_resumes(tmp_path):
    """A stop request to a Ray sweep interrupts the running trial with a checkpoint and leaves queued ones
    new; the same sweep run again resumes and completes them all."""
    import signal
    import threading
    import time

    from sgdlab.train import guard

    long = {**TINY, "duration": "3000 steps", "checkpoint": {"every": 50}}
    points = sw.grid_points({"optim.lr": [0.1, 0.05, 0.01]})
    out = tmp_path / "s"

    def stop_when_running():
        deadline = time.monotonic() + 120
        # once the first trial has trained (a checkpoint exists): a stop during its set-up would leave it new
        while time.monotonic() < deadline and not any(p.is_file() for p in out.glob("*/checkpoints/*")):
            time.sleep(0.02)
        guard.request_stop(signal.SIGTERM)

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # one trial at a time, two queued
    try:
        threading.Thread(target=stop_when_running, daemon=True).start()
        with pytest.raises(guard.RunInterrupted) as info:
            sw.run_sweep(long, points, 1, out, backend="ray", progress=False)
        states = [t["status"] for t in info.value.summary["trials"]]
        assert states.count("interrupted") == 1 and states.count("new") == 2, states
        m = sw.run_sweep(long, points, 1, out, backend="ray", progress=False)
        assert m["counts"]["resumed"] == 1 and m["counts"]["ran"] == 2, m["counts"]
        assert [t["status"] for t in m["trials"]] == ["completed"] * 3
    finally:
        ray.shutdown()
