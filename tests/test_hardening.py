"""Hostile and careless input, round two: no code runs from data, nothing is written through a planted link,
names never become paths, damaged states and NaN feedback give one line, sweeps stay linear and stoppable.

One test (or a few) per finding of docs/robustness.md's "Hardening" list; each failed before the fix.
"""

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sgdlab import data, files, train
from sgdlab.cli import main
from sgdlab.errors import ConfigError, DataError, NonFiniteLossError
from sgdlab.experiments import aggregate, protocol, report, studies
from sgdlab.experiments import sweep as sw
from sgdlab.sampling.base import MULTINOMIAL_LIMIT, categorical
from sgdlab.sampling.blind import EpochSampler, ReplacementSampler
from sgdlab.sampling.history import OnlineBatchSelection, PrioritizedSampler
from sgdlab.sampling.importance import ImportanceSampler, tau
from sgdlab.sampling.srs import SequencedReplacementSampler
from sgdlab.train import check, guard
from sgdlab.train.config import config_to_dict, load_config
from test_engine import TINY
from test_studies import TINY as TINY_STUDY

QUICK = dict(TINY, duration="20 steps", eval={"every": 10}, checkpoint={"every": 10})


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A completed 20-step run (copied by the tests that change it)."""
    d = tmp_path_factory.mktemp("run") / "r"
    train.run(QUICK, d, quiet=True)
    return d


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# 1. ---------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar_file_with_a_reduce_payload_is_refused_and_never_runs(tmp_path):
    folder = data.write_synthetic_cifar(tmp_path / "c", "cifar10", train_per_file=4, test=4)
    assert len(data.create("cifar10", root=str(folder)).train_y) == 20  # real format still loads
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Payload(str(marker)), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"data_batch_1: not a readable CIFAR.*posix.mkdir|data_batch_1.*mkdir"):
        data.create("cifar10", root=str(folder))
    assert not marker.exists()


# 2. ---------------------------------------------------------------------------------------------


def test_report_replaces_a_planted_link_and_names_cannot_inject_lines(tmp_path, done_run):
    d = _copy_run(done_run, tmp_path / "r")
    victim = tmp_path / "victim_rc"
    victim.write_text("safe\n")
    (d / "report.md").symlink_to(victim)
    (d / "report.html").symlink_to(victim)
    report.write_report(d)
    assert victim.read_text() == "safe\n"
    assert not (d / "report.md").is_symlink() and (d / "report.md").read_text().startswith("# Run report")
    # a name with a newline is refused when the config is read ...
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["name"] = "x\necho pwned >> .bashrc"
    with pytest.raises(ConfigError, match="control characters"):
        load_config(cfg)
    # ... and whatever reaches the renderer stays one line, without raw HTML
    md, _ = report.render("a\n# injected <script>", [report.Section("s\nt", [report.Block("p", "p\r\n- item")])])
    assert "\n# injected" not in md and "&lt;script>" in md and "\n- item" not in md


# 3. ---------------------------------------------------------------------------------------------


def test_resume_refuses_new_imports_before_importing_them(tmp_path, done_run, monkeypatch, capsys):
    d = _copy_run(done_run, tmp_path / "r")
    marker = tmp_path / "imported"
    (tmp_path / "h32_evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["imports"] = ["h32_evil_plugin"]
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["resume", str(d), "duration=30 steps"]) == 2
    err = capsys.readouterr().err
    assert "h32_evil_plugin" in err and "nothing was imported" in err and err.count("\n") == 1
    assert not marker.exists() and "h32_evil_plugin" not in sys.modules


# 4. ---------------------------------------------------------------------------------------------


def test_lock_and_appends_refuse_planted_links_and_leave_the_target_whole(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    d = tmp_path / "run"
    d.mkdir()
    (d / guard.LOCK_NAME).symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        guard.FolderLock(d).acquire()
    (d / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        files.open_append(d / "metrics.jsonl")
    assert victim.read_text() == "precious\n"


def test_atomic_writes_replace_a_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "summary.json").symlink_to(victim)
    files.write_text(tmp_path / "summary.json", "{}")
    assert victim.read_text() == "precious\n" and (tmp_path / "summary.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "victim"]  # no temporary left


def test_run_into_a_folder_with_a_planted_lock_link_exits_2(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    d = tmp_path / "r"
    d.mkdir()
    (d / guard.LOCK_NAME).symlink_to(victim)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(QUICK))
    assert main(["run", str(cfg), "--out", str(d), "--quiet"]) == 2
    assert "symbolic link" in capsys.readouterr().err and victim.read_text() == "precious\n"


# 5. ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "a/b", "tab\there"])
def test_protocol_names_that_are_not_one_folder_name_are_refused(tmp_path, name):
    p = tmp_path / "p.yaml"
    p.write_text(TINY_STUDY.replace("name: tiny", f"name: {json.dumps(name)}"))
    with pytest.raises(ConfigError, match="name"):
        protocol.load_protocol(p)


# 9. ---------------------------------------------------------------------------------------------


def test_trial_names_of_sweep_json_never_leave_the_sweep(tmp_path, done_run, capsys):
    outside = _copy_run(done_run, tmp_path / "outside_run")
    sweep_dir = tmp_path / "a" / "b"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"trials": [{"name": "../../outside_run", "label": "x",
                                                                  "seed": 0, "overrides": {}}]}))
    with pytest.raises(ConfigError, match=r"trials\[0\]\.name.*path separator"):
        aggregate.load_trials(sweep_dir)
    assert main(["report", str(sweep_dir)]) == 2
    assert "trials[0].name" in capsys.readouterr().err and not (outside / "report.md").exists()


# 10. and 17. (another sampler's state) -------------------------------------------------------------


def test_a_prioritized_state_covering_7_of_4000_examples_is_refused():
    s = PrioritizedSampler(4000, 8)
    state = s.state_dict()
    state["priorities"], state["seen"] = state["priorities"][:7], state["seen"][:7]
    with pytest.raises(ValueError, match=r"priorities'\] has shape \(7,\), this sampler needs \(4000,\)"):
        s.load_state_dict(state)


def _samplers():
    score = lambda idx: torch.ones(len(idx))  # noqa: E731
    return {"epoch": EpochSampler(100, 4), "replacement": ReplacementSampler(100, 4),
            "srs": SequencedReplacementSampler(100, 4), "obs": OnlineBatchSelection(100, 4),
            "prioritized": PrioritizedSampler(100, 4), "importance": ImportanceSampler(100, 4, presample=16,
                                                                                       score_fn=score)}


@pytest.mark.parametrize("src", ["epoch", "replacement", "srs", "obs", "prioritized", "importance"])
def test_loading_another_samplers_state_is_one_value_error(src):
    samplers = _samplers()
    state = samplers[src].state_dict()
    for name, target in samplers.items():
        if name == src:
            target.load_state_dict(state)  # its own state still loads
            continue
        with pytest.raises(ValueError) as e:
            target.load_state_dict(state)
        assert "\n" not in str(e.value) and "state" in str(e.value)


# 11. --------------------------------------------------------------------------------------------


def test_seeds_that_differ_above_bit_32_give_different_streams():
    def first(cls, seed):
        return cls(1000, 8, seed=seed).next_batch().indices.tolist()

    for cls in (EpochSampler, ReplacementSampler, SequencedReplacementSampler, PrioritizedSampler):
        assert first(cls, 0) != first(cls, 2**32), cls.__name__
        assert first(cls, 5) == first(cls, 5)


def test_runs_with_seeds_0_and_2_pow_32_differ(tmp_path):
    losses = []
    for seed in (0, 2**32):
        train.run(dict(QUICK, duration="2 steps", seed=seed, log={"every": 1, "progress": False}),
                  tmp_path / str(seed), quiet=True)
        rows = [json.loads(x) for x in (tmp_path / str(seed) / "metrics.jsonl").read_text().splitlines()]
        losses.append(rows[0]["train_loss"])
    assert losses[0] != losses[1]


def test_nan_feedback_is_refused_and_leaves_the_sampler_as_it_was():
    p = PrioritizedSampler(50, 4)
    p.observe(torch.arange(4), losses=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    before = p.state_dict()
    with pytest.raises(ValueError, match="losses must be finite"):
        p.observe(torch.arange(4), losses=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    assert torch.equal(p.priorities, before["priorities"]) and torch.isfinite(p.probabilities()).all()
    p.next_batch()
    obs = OnlineBatchSelection(50, 4)
    with pytest.raises(ValueError, match="losses must be finite"):
        obs.observe(torch.arange(4), losses=torch.tensor([float("nan")] * 4))
    assert torch.equal(obs.losses, torch.zeros(50, dtype=torch.float64))


def test_importance_observe_checks_the_scores_shape():
    s = _samplers()["importance"]
    for bad in (torch.ones(7), torch.ones(2, 2)):
        with pytest.raises(ValueError, match=r"one score per index \(4\)"):
            s.observe(torch.arange(4), scores=bad)
    s.observe(torch.arange(4), scores=torch.ones(4))
    assert s.tau == pytest.approx(0.1)  # 0.9 * 0 + 0.1 * 1


def _nan_loss(out, y):
    return torch.nn.functional.cross_entropy(out, y) * float("nan")


def test_gradient_noise_and_hessian_on_a_nan_loss_are_one_line():
    from sgdlab import analysis

    torch.manual_seed(0)
    m, x, y = torch.nn.Linear(3, 2), torch.randn(10, 3), torch.randint(2, (10,))
    for method in ("exact", "two_batch"):
        with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
            analysis.gradient_noise_scale(m, _nan_loss, (x, y), method=method, batch_sizes=(2, 4), num_pairs=3)
    with pytest.raises(NonFiniteLossError, match="curvature product is NaN"):
        analysis.hessian_eigenvalues(m, _nan_loss, (x, y), k=1)


# 12. --------------------------------------------------------------------------------------------


def test_sweep_appends_each_trial_and_writes_the_manifest_twice(tmp_path, monkeypatch):
    writes = []
    real = sw._write_manifest
    monkeypatch.setattr(sw, "_write_manifest", lambda *a: writes.append(1) or real(*a))
    m = sw.run_sweep(dict(QUICK, duration="2 steps"), sw.grid_points({"optim.lr": [0.1, 0.05]}), 2,
                     tmp_path / "s", progress=False)
    assert m["counts"]["ran"] == 4 and len(writes) == 2  # once at the start, once at the end
    log = [json.loads(x) for x in (tmp_path / "s" / sw.LOG_NAME).read_text().splitlines()]
    assert [r["name"] for r in log] == [t["name"] for t in m["trials"]] and {r["status"] for r in log} == {"completed"}


def test_plan_validates_once_per_point_and_gives_the_fully_validated_configs():
    base = dict(QUICK, data={"name": "mnist1d", "seed": 0})
    _, trials = sw.plan(base, sw.grid_points({"optim.lr": [0.1, 0.2]}), [0, 7, 2**40], seed_keys=["data.seed"])
    for t in trials:
        raw = json.loads(json.dumps(base))
        raw.update(seed=t.seed)
        raw["data"]["seed"], raw["optim"]["lr"] = t.seed, t.overrides["optim.lr"]
        raw["log"]["progress"] = False
        assert t.config == config_to_dict(load_config(raw))
    assert trials[0].config["data"] is not trials[1].config["data"]  # seed_keys' sections are not shared
    with pytest.raises(ConfigError, match=r"seeds: 9223372036854775807 is outside"):
        sw.plan(QUICK, None, [0, 2**63 - 1])


# 13. --------------------------------------------------------------------------------------------

_PARENT = """
import sys, time
from sgdlab.experiments import sweep
ex = sweep._pool(2)
pids = [f.result() for f in [ex.submit(__import__('os').getpid) for _ in range(8)]]
print(' '.join(str(p) for p in sorted(set(ex._processes))), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_sweep_workers_die_when_the_sweep_is_killed(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
        proc.kill()  # SIGKILL: no handler of the parent runs
        proc.wait()
        deadline = time.time() + 10
        alive = pids
        while alive and time.time() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _alive(p)]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# 14. --------------------------------------------------------------------------------------------


def test_check_warns_about_budgets_of_days_and_millions_of_rows(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(QUICK, duration="1000000000000 steps", log={"every": 1})))
    ok, lines = check.check_config(cfg)
    assert ok
    assert any(x.startswith("warning: duration 1000000000000 steps would take about") for x in lines)
    assert any(x.startswith("warning: log.every: 1 over 1,000,000,000,000 steps") for x in lines)
    ok, lines = check.check_config(tmp_path / "c.yaml", ["duration=20 steps", "log.every=10"])
    assert ok and not any(x.startswith("warning") for x in lines)


def test_check_bounds_its_own_time(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "TIME_LIMIT", 0.5)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(QUICK, data={"name": "mnist1d", "num_samples": 10**8, "cache": False})))
    t0 = time.perf_counter()
    ok, lines = check.check_config(cfg)
    assert not ok and lines[-1].startswith("check stopped after 0.5 s building the dataset")
    assert time.perf_counter() - t0 < 30


# 15. --------------------------------------------------------------------------------------------


def test_arguments_longer_than_a_file_name_are_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(QUICK))
    milestones = "schedule.milestones=[" + ",".join(str(i + 0.5) for i in range(100)) + "]"
    assert len(milestones) > 255
    assert main(["check", str(cfg), "notes=" + "a" * 300, milestones]) == 0
    assert not files.is_existing_path("x" * 5000)


# 16. --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["nan", "inf", "-inf"])
def test_a_non_finite_cell_of_trials_csv_is_one_line(tmp_path, cell):
    p = tmp_path / "trials.csv"
    p.write_text(f"arm,seed,status,test_error\na,0,completed,0.5\na,1,completed,{cell}\n")
    with pytest.raises(ConfigError, match=rf"trials.csv:3: test_error: {cell} is not finite"):
        studies.read_table(p)


# 17. --------------------------------------------------------------------------------------------


def test_categorical_beyond_torch_multinomial_limit_is_exact():
    p = torch.zeros(MULTINOMIAL_LIMIT + 10, dtype=torch.float64)
    p[5], p[-1] = 1.0, 3.0
    x = categorical(p, 40_000, torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) == {5, p.numel() - 1}
    share = float((x == 5).double().mean())
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 40_000)
    small = torch.tensor([0.2, 0.8])  # below the limit: torch.multinomial's stream, unchanged
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(categorical(small, 50, g1), torch.multinomial(small, 50, replacement=True, generator=g2))


def test_history_samplers_refuse_sizes_beyond_memory_before_allocating():
    t0 = time.perf_counter()
    for cls in (PrioritizedSampler, OnlineBatchSelection):
        with pytest.raises(ValueError, match="GiB of memory"):
            cls(10**13, 32)
    assert time.perf_counter() - t0 < 5


def test_raw_library_errors_are_one_line():
    from sgdlab.regularize import shake
    from sgdlab.regularize.random_gradient import RandomGradient

    with pytest.raises(ValueError, match="floating-point"):
        shake(torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), training=True)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^64\)"):
        RandomGradient(seed=2**70)
    big = torch.full((4,), 1e308, dtype=torch.float64)
    assert tau(big) == pytest.approx(1.0) and tau(big * torch.tensor([1.0, 1, 1, 0.5], dtype=torch.float64)) > 1


def test_check_of_a_zero_size_model_is_one_line_without_torch_warnings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(QUICK, model={"name": "cnn1d", "length": 0})))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok, lines = check.check_config(cfg)
    assert not ok and "layers without weights" in lines[-1]
    assert not [w for w in caught if "zero-element" in str(w.message)]


# 18. --------------------------------------------------------------------------------------------


def test_a_second_study_into_the_same_results_folder_stops_at_once(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_STUDY)
    results = tmp_path / "results"
    (results / "tiny").mkdir(parents=True)
    with guard.FolderLock(results / "tiny", "study"):
        with pytest.raises(ConfigError, match="in use by another sgdlab study"):
            studies.run_study(p, out=tmp_path / "other", results=results, progress=False)
    assert not (tmp_path / "other").exists() and list((results / "tiny").iterdir()) == [
        results / "tiny" / guard.LOCK_NAME]


def test_names_are_checked_once_by_one_rule():
    for bad in ("", ".", "..", "a/b", "a\\b", "a\nb", "a\x00b", "a\u202eb", "x" * 201):
        with pytest.raises(ConfigError):
            files.check_name(bad, "name")
    assert files.check_name("lr=0.1__seed=3", "name") == "lr=0.1__seed=3"
    np.testing.assert_equal(files.name_problem("ok"), None)


def test_sigterm_during_a_sweep_stops_it_between_trials(tmp_path):
    """The first trial asks the sweep to stop; no further trial starts (checked between trials)."""
    def stop_after_first(t, r):
        guard.request_stop(signal.SIGTERM)

    with pytest.raises(guard.RunInterrupted) as e:
        sw.run_sweep(dict(QUICK, duration="2 steps"), None, 3, tmp_path / "s", progress=False,
                     on_result=stop_after_first)
    states = [t["status"] for t in e.value.summary["trials"]]
    assert states == ["completed", "new", "new"] and e.value.summary["status"] == "interrupted"


def test_sweep_and_ray_backend_import_one_floor_down_not_each_other():
    import ast

    import sgdlab.experiments.ray_backend as rb
    import sgdlab.experiments.trials as tr

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "sweep" not in imported(rb) and not {"sweep", "ray_backend"} & imported(tr)
    assert sw.execute_trial is tr.execute_trial and rb.STOP_FILE == tr.STOP_FILE
