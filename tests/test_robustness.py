"""Faults and hostile input: stop signals, folder locks, config drift on resume, corrupt checkpoints,
bounded YAML, numeric ranges, filesystem errors, strict JSON (see docs/robustness.md)."""

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from sgdlab import train
from sgdlab.cli import main
from sgdlab.experiments import sweep as sw
from sgdlab.train import guard
from test_engine import TINY, _rows, _weights

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
CLI = [sys.executable, "-m", "sgdlab.cli"]


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait_for(pred, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _rows_written(d, n):
    def pred():
        p = Path(d) / "metrics.jsonl"
        return p.is_file() and p.read_text().count("\n") >= n
    return pred


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_signal_mid_run_saves_marks_interrupted_and_resumes_bit_identically(tmp_path, sig):
    # checkpoint.every 0: without the signal handling nothing would be saved before the end
    cfg = dict(TINY, duration="400 steps", checkpoint={"every": 0}, eval={"every": 200})
    cfg_path = _write(tmp_path / "cfg.yaml", cfg)
    run_dir = tmp_path / "sig"
    proc = subprocess.Popen([*CLI, "run", str(cfg_path), "--out", str(run_dir), "--quiet"], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    reached = _wait_for(_rows_written(run_dir, 3), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert reached, "the run ended before it could be signalled"
    assert proc.returncode == 128 + sig, err
    assert err.count("\n") == 1 and "resume" in err and "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 30 <= summary["steps"] < 400
    st = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert st["step"] == summary["steps"]
    assert sw.trial_state(run_dir) == "interrupted"

    out = subprocess.run([*CLI, "resume", str(run_dir), "--quiet"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    train.run(cfg, tmp_path / "ref", quiet=True)
    ref, res = _weights(tmp_path / "ref"), _weights(run_dir)
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    assert _rows(tmp_path / "ref") == _rows(run_dir)  # train_loss means across the stop step included
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_stop_between_log_steps_in_process_is_exact(tmp_path):
    """Stopping at a step that is not a log step keeps the partial loss mean in the checkpoint."""
    cfg = dict(TINY, duration="60 steps")
    train.run(cfg, tmp_path / "ref", quiet=True)

    class StopAt:
        def __init__(self, *, seed, at=17):
            self.at = at

        def __call__(self, losses, *, step=None, epoch=None):
            if step == self.at:
                guard.request_stop(signal.SIGTERM)
            return losses

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    from sgdlab import regularize

    if "stop_at_test" not in regularize.loss_transform_names():
        regularize.register_loss_transform("stop_at_test")(StopAt)
    d = tmp_path / "s"
    with pytest.raises(guard.RunInterrupted) as e:
        train.run(dict(cfg, loss={"name": "cross_entropy", "stop_at_test": {"at": 17}}), d, quiet=True)
    assert e.value.signum == signal.SIGTERM and e.value.summary["steps"] == 18
    st = torch.load(d / "checkpoints/last.pt", weights_only=True)
    assert st["step"] == 18 and st["acc_n"] == 8
    # the resume must use the same loss transform list; it never fires again after step 17
    train.resume(d, quiet=True)
    assert _rows(tmp_path / "ref") == _rows(d)


def test_signal_during_setup_leaves_nothing_behind(tmp_path):
    d = tmp_path / "early"
    with guard.stop_signals():
        guard.request_stop(signal.SIGINT)
        with pytest.raises(guard.RunInterrupted, match="before the first step"):
            train.run(TINY, d, quiet=True)
    assert not d.exists()
    assert train.run(dict(TINY, duration="10 steps"), d, quiet=True)["status"] == "completed"


def test_sigint_on_a_sweep_stops_queued_trials(tmp_path):
    cfg_path = _write(tmp_path / "cfg.yaml", dict(TINY, duration="3000 steps", eval={"every": 0},
                                                  checkpoint={"every": 0}))
    out = tmp_path / "sweep"
    proc = subprocess.Popen([*CLI, "sweep", str(cfg_path), "--seeds", "3", "--jobs", "1", "--out", str(out),
                             "--quiet", "--no-report"], env=ENV, stderr=subprocess.PIPE, text=True)
    names = [sw.trial_name({}, s) for s in range(3)]
    reached = _wait_for(_rows_written(out / names[0], 2), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert reached and proc.returncode == 130, err
    assert "run the same sweep command again" in err and err.count("\n") == 1
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [t["status"] for t in manifest["trials"]] == ["interrupted", "new", "new"]
    assert not (out / names[1]).exists() and not (out / names[2]).exists()
    assert (out / names[0] / "checkpoints/last.pt").is_file()


@pytest.mark.slow
def test_sigterm_on_a_parallel_sweep_interrupts_running_trials(tmp_path):
    cfg = dict(TINY, duration="3000 steps", eval={"every": 0}, checkpoint={"every": 0})
    cfg_path = _write(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "sweep"
    proc = subprocess.Popen([*CLI, "sweep", str(cfg_path), "--seeds", "3", "--jobs", "2", "--out", str(out),
                             "--quiet", "--no-report"], env=ENV, stderr=subprocess.PIPE, text=True)
    names = [sw.trial_name({}, s) for s in range(3)]
    reached = _wait_for(lambda: all(_rows_written(out / n, 1)() for n in names[:2]), proc, timeout=180)
    proc.send_signal(signal.SIGTERM)  # to the sweep process alone: it forwards the stop to its workers
    _, err = proc.communicate(timeout=120)
    assert reached and proc.returncode == 143, err
    states = [t["status"] for t in json.loads((out / "sweep.json").read_text())["trials"]]
    assert states == ["interrupted", "interrupted", "new"]
    for n in names[:2]:
        assert json.loads((out / n / "summary.json").read_text())["status"] == "interrupted"


# ------------------------------------------------------------------------------------------------
# Locks
# ------------------------------------------------------------------------------------------------


def test_two_concurrent_runs_into_one_folder(tmp_path):
    cfg_path = _write(tmp_path / "cfg.yaml", dict(TINY, duration="100000 steps", eval={"every": 0},
                                                  schedule={"name": "constant"}))
    d = tmp_path / "r"
    first = subprocess.Popen([*CLI, "run", str(cfg_path), "--out", str(d), "--quiet"], env=ENV,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(_rows_written(d, 1), first)
        second = subprocess.run([*CLI, "run", str(cfg_path), "optim.lr=0.2", "--out", str(d), "--quiet"], env=ENV,
                                capture_output=True, text=True, timeout=120)
        resumed = subprocess.run([*CLI, "resume", str(d), "--quiet"], env=ENV, capture_output=True, text=True,
                                 timeout=120)
        still_running = first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert still_running and first.returncode == 143
    assert second.returncode == 2 and resumed.returncode == 2
    assert f"PID {first.pid} on host" in second.stderr and second.stderr.count("\n") == 1
    assert f"PID {first.pid} on host" in resumed.stderr
    rows = _rows(d)
    steps = [r["step"] for r in rows]
    assert steps == list(range(10, steps[-1] + 1, 10))
    assert {r["lr"] for r in rows} == {0.05}
    assert yaml.safe_load((d / "config.yaml").read_text())["optim"]["lr"] == 0.05
    assert json.loads((d / "summary.json").read_text())["status"] == "interrupted"
    assert torch.load(d / "checkpoints/last.pt", weights_only=True)["step"] >= steps[-1]


def test_lock_is_released_on_exit_and_names_the_holder(tmp_path):
    with guard.FolderLock(tmp_path, "run"):
        with pytest.raises(train.ConfigError, match=rf"PID {os.getpid()} on host"):
            guard.FolderLock(tmp_path, "run").acquire()
    with guard.FolderLock(tmp_path, "sweep"):
        pass
    with guard.FolderLock(tmp_path, "sweep"), pytest.raises(train.ConfigError, match="sweep"):
        sw.run_sweep(dict(TINY, duration="5 steps"), None, 1, tmp_path, progress=False)


# ------------------------------------------------------------------------------------------------
# Config drift on resume
# ------------------------------------------------------------------------------------------------


def _interrupted_run(tmp_path, **kw):
    d = tmp_path / "run"
    train.run(dict(TINY, duration="40 steps", **kw), d, quiet=True)
    (d / "summary.json").unlink()
    return d


@pytest.mark.parametrize("edit,key", [
    (lambda c: c["optim"].update(lr=0.5), "optim.lr"),
    (lambda c: c["optim"].update(weight_decay=0.01), "optim.weight_decay"),
    (lambda c: c["model"].update(hidden=[64]), "model.hidden"),
    # the resolved config lists epoch's own options (drop_last), so a sampler change rewrites the section
    (lambda c: c.update(sampler={"name": "srs", "batch_size": c["sampler"]["batch_size"]}), "sampler.name"),
    (lambda c: c.update(duration="20 steps"), "duration"),
    (lambda c: c.update(duration="3 epochs"), "duration"),
])
def test_edited_config_yaml_is_refused_naming_the_key(tmp_path, capsys, edit, key):
    d = _interrupted_run(tmp_path)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    edit(cfg)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = (d / "checkpoints/last.pt").read_bytes()
    code = main(["resume", str(d), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{key} (" in err and err.count("\n") == 1
    assert (d / "checkpoints/last.pt").read_bytes() == before


def test_resume_may_extend_the_duration_and_change_logging(tmp_path, capsys):
    d = tmp_path / "run"
    train.run(dict(TINY, duration="40 steps"), d, quiet=True)  # completed
    assert main(["resume", str(d), "duration=80 steps", "eval.every=20", "log.every=5", "--quiet"]) == 0
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 80
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert saved["duration"] == "80 steps" and saved["log"]["every"] == 5
    assert [r["step"] for r in _rows(d)][-4:] == [65, 70, 75, 80]
    assert main(["resume", str(d), "optim.lr=0.3", "--quiet"]) == 2
    assert "optim.lr (0.05 -> 0.3)" in capsys.readouterr().err


def test_another_world_size_resumes_with_one_note_and_a_bad_global_batch_is_one_line(tmp_path, capsys):
    d = _interrupted_run(tmp_path)
    path = d / "checkpoints/last.pt"
    good = torch.load(path, weights_only=True)
    torch.save({**good, "global_batch": "8"}, path)
    assert main(["resume", str(d), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "global_batch must be a positive integer, got '8'" in err and err.count("\n") == 1
    torch.save({**good, "world_size": 2}, path)  # as if written by 2 processes: resumes on this one
    assert main(["resume", str(d)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "process(es) on 1" in line]
    assert len(notes) == 1 and "not carried over: dropout" in notes[0]


# ------------------------------------------------------------------------------------------------
# Corrupt and foreign checkpoints
# ------------------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _corrupt_kinds(good: bytes, other_model: bytes):
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10  # inside a tensor record: only the zip CRC32 notices
    head = bytearray(good)
    head[0] ^= 0xFF
    evil = io.BytesIO()
    torch.save({"step": 1, "model": _Payload()}, evil)
    empty, no_opt = io.BytesIO(), io.BytesIO()
    torch.save({}, empty)
    st = torch.load(io.BytesIO(good), weights_only=True)
    del st["optimizer"]
    torch.save(st, no_opt)
    return {
        "truncated": good[: len(good) // 3], "zero_bytes": b"", "bit_flip_data": bytes(flipped),
        "bit_flip_header": bytes(head), "random_bytes": os.urandom(3000),
        "reduce_pickle_zip": evil.getvalue(), "raw_pickle": pickle.dumps(_Payload()),
        "other_model": other_model, "empty_dict": empty.getvalue(), "missing_optimizer": no_opt.getvalue(),
        "text_file": b"hello\n",
    }


@pytest.fixture(scope="module")
def checkpoint_blobs(tmp_path_factory):
    base = tmp_path_factory.mktemp("blobs")
    train.run(dict(TINY, duration="20 steps", eval={"every": 0}), base / "a", quiet=True)
    train.run(dict(TINY, duration="20 steps", eval={"every": 0}, model={"name": "mlp", "hidden": [7]}),
              base / "b", quiet=True)
    return (base / "a" / "checkpoints/last.pt").read_bytes(), (base / "b" / "checkpoints/last.pt").read_bytes()


@pytest.mark.parametrize("kind", ["truncated", "zero_bytes", "bit_flip_data", "bit_flip_header", "random_bytes",
                                  "reduce_pickle_zip", "raw_pickle", "other_model", "empty_dict",
                                  "missing_optimizer", "text_file"])
def test_corrupt_checkpoint_resume_and_analyze_one_line(tmp_path, capsys, monkeypatch, checkpoint_blobs, kind):
    monkeypatch.chdir(tmp_path)
    good, other = checkpoint_blobs
    blob = _corrupt_kinds(good, other)[kind]
    d = tmp_path / "run"
    train.run(dict(TINY, duration="20 steps", eval={"every": 0}), d, quiet=True)
    (d / "summary.json").unlink()
    (d / "checkpoints/last.pt").write_bytes(blob)
    if kind == "other_model":  # the other model's own config would be recorded: make it a foreign file
        st = torch.load(io.BytesIO(blob), weights_only=True)
        st.pop("config")
        torch.save(st, d / "checkpoints/last.pt")
    code = main(["resume", str(d), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "weights_only" not in err
    assert "not an sgdlab checkpoint" in err or "corrupt" in err or "not a checkpoint of this model" in err
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(guard.CheckpointError):
        train.load_run(d)


def test_last_pt_as_a_directory_is_an_error_not_a_fresh_start(tmp_path, capsys):
    d = _interrupted_run(tmp_path)
    (d / "checkpoints/last.pt").unlink()
    (d / "checkpoints/last.pt").mkdir()
    assert main(["resume", str(d), "--quiet"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert len(_rows(d)) == 4  # nothing retrained


def test_init_from_a_non_checkpoint_is_one_line(tmp_path, capsys):
    junk = tmp_path / "passwd"
    junk.write_text("root:x:0:0:root:/root:/bin/bash\n")
    cfg = _write(tmp_path / "c.yaml", dict(TINY, checkpoint={"every": 0, "init_from": str(junk)}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.init_from" in err and "not an sgdlab checkpoint" in err
    assert not (tmp_path / "r").exists()


def test_crc_check_catches_a_flip_torch_would_load(checkpoint_blobs, tmp_path):
    good, _ = checkpoint_blobs
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    flipped = bytearray(good)
    h = info.header_offset
    name_len, extra_len = (int.from_bytes(good[h + i:h + i + 2], "little") for i in (26, 28))
    flipped[h + 30 + name_len + extra_len + 5] ^= 0x01  # a byte of the largest tensor's data
    torch.load(io.BytesIO(bytes(flipped)), weights_only=True)  # torch alone takes it as good
    p = tmp_path / "x.pt"
    p.write_bytes(bytes(flipped))
    with pytest.raises(guard.CheckpointError, match="CRC32"):
        guard.load_checkpoint(p)


# ------------------------------------------------------------------------------------------------
# One-line errors for bad config input
# ------------------------------------------------------------------------------------------------

BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
        + "notes: *i\n")


@pytest.mark.parametrize("text,needle", [
    (BOMB, "expands to more than"),
    ("seed: " + "[" * 5000 + "]" * 5000, "nesting deeper than"),
    ("seed: 1\nseed: 2\n", ":2:1: duplicate key 'seed' (first at line 1)"),
    ("optim:\n  lr: [1, 2\n", "c.yaml:3:1:"),
    ("seed: " + "9" * 5000, "c.yaml:1:7: integer too large"),
    ("seed: 1180591620717411303424\n", "'seed'"),
    ("seed: -1\n", "'seed'"),
    ("optim:\n  lr: 1e400\n", "'optim.lr': Input should be a finite number"),
    ("schedule:\n  warmup: .inf\n", "'schedule.warmup'"),
    ("schedule:\n  name: multistep\n  milestones: [.nan]\n", "'schedule.milestones.0'"),
    ("duration: 1e999 steps\n", "is too long (at most 1e+12 steps)"),
    ("model:\n  name: mlp\n  hidden: [-4]\n", "model (mlp"),
    ("model:\n  name: cnn1d\n  channels: 3000000\n", "more than this machine"),
    ("data:\n  name: mnist1d\n  seed: -1\n", "data (mnist1d"),
    ("model:\n  name: mlp\n  hidden: [.inf]\n", "hidden[0]: must be a finite number"),
    ("device: mps\n", "MPS"),
])
def test_bad_config_text_is_one_line(tmp_path, capsys, text, needle):
    if "mps" in text and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    p = tmp_path / "c.yaml"
    p.write_text(text)
    code = main(["run", str(p), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # a failed set-up leaves nothing that blocks the next run


@pytest.mark.parametrize("blob,needle", [
    (b"seed: 1\n\xff\xfe\n", "not UTF-8 text (byte 0xff at offset 8)"),
    ("seed: 1\n".encode("utf-16"), "binary file (or UTF-16 text)"),
    (bytes(range(256)), "binary file"),
])
def test_non_text_config_files(tmp_path, capsys, blob, needle):
    p = tmp_path / "c.yaml"
    p.write_bytes(blob)
    assert main(["check", str(p)]) == 2
    assert needle in capsys.readouterr().out


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=[", "override 'optim.lr=['"),
    ("optim.lr.x=1", "'lr' is not a section"),
    ("seed=&a [*a]", "override"),
    (".lr=1", "empty key"),
])
def test_bad_overrides_are_one_line(tmp_path, capsys, override, needle):
    p = _write(tmp_path / "c.yaml", dict(TINY, duration="5 steps"))
    assert main(["run", str(p), override, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_model_that_cannot_take_the_data_fails_in_one_line_and_check_agrees(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", dict(TINY, model={"name": "mlp", "hidden": [8], "in_features": 13}))
    assert main(["check", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "FAILED" in out and "cannot train on mnist1d batches of shape (8, 40)" in out
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cannot train on mnist1d batches of shape (50, 40)" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------
# Filesystem faults and strict JSON
# ------------------------------------------------------------------------------------------------


def test_out_naming_a_file_and_a_read_only_folder(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", dict(TINY, duration="5 steps"))
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["run", str(cfg), "--out", str(f)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["run", str(cfg), "--out", str(ro / "r")]) == 2
        err = capsys.readouterr().err
        assert f"{ro / 'r'}: Permission denied" in err and err.count("\n") == 1
    finally:
        ro.chmod(0o700)


def test_full_disk_while_checkpointing_keeps_last_pt(tmp_path, monkeypatch, capsys):
    d = _interrupted_run(tmp_path)
    before = (d / "checkpoints/last.pt").read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device", str(f.name))

    monkeypatch.setattr(torch, "save", full)
    assert main(["resume", str(d), "duration=80 steps", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and re.search(r"checkpoints/\.last\.pt\.\w+\.tmp: No space", err)
    assert (d / "checkpoints/last.pt").read_bytes() == before
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["last.pt"]


def test_metrics_are_strict_json_with_null_for_non_finite(tmp_path):
    d = tmp_path / "n"
    cfg = dict(TINY, optim={"name": "sgd", "lr": 1e30}, checkpoint={"every": 0})
    with pytest.raises(train.engine.NonFiniteLossError):
        train.run(cfg, d, quiet=True)
    text = (d / "metrics.jsonl").read_text()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for line in
            text.splitlines()]
    assert rows[-1]["train_loss"] is None
    json.loads((d / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))


def _children(pid):
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and PR_SET_PDEATHSIG")
def test_torchrun_workers_die_with_their_launcher(tmp_path):
    cfg_path = _write(tmp_path / "cfg.yaml", dict(TINY, duration="100000 steps", eval={"every": 0},
                                                  sampler={"name": "epoch", "batch_size": 16}))
    env = {k: v for k, v in ENV.items() if k != "WORLD_SIZE"}
    d = tmp_path / "ddp"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "sgdlab.cli", "run", str(cfg_path), "--out", str(d), "--quiet"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(_rows_written(d, 2), launcher, timeout=240)
    workers = _children(launcher.pid)
    assert len(workers) >= 2
    launcher.kill()  # SIGKILL: torchrun cannot forward anything
    launcher.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]


def _alive(pid):
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (OSError, IndexError):
        return False


# ------------------------------------------------------------------------------------------------
# Hand-edited states and finished runs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,match", [
    ("pool", lambda p: torch.full_like(p, -1), "outside"),
    ("pool", lambda p: p.clone().fill_(100), "outside"),
    ("pool", lambda p: p.double(), "integer example indices"),
    ("cursor", lambda c: -1, "cursor"),
    ("cursor", lambda c: 100, "cursor"),
    ("cursor", lambda c: 10**30, "cursor"),
    ("steps", lambda s: -5, "steps"),
    ("steps", lambda s: 2.5, "steps"),
    ("steps", lambda s: True, "steps"),
])
def test_srs_state_with_an_impossible_position_is_refused(key, value, match):
    from sgdlab.sampling import SequencedReplacementSampler

    s = SequencedReplacementSampler(100, 10, seed=1)
    for _ in range(3):
        s.next_batch()
    good = s.state_dict()
    fresh = SequencedReplacementSampler(100, 10, seed=1)
    fresh.load_state_dict(good)  # the saved state itself loads and continues the stream
    assert torch.equal(fresh.next_batch().indices, s.next_batch().indices)
    bad = dict(good, **{key: value(good[key])})
    other = SequencedReplacementSampler(100, 10, seed=1)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(bad)


@pytest.mark.parametrize("edit", ["srs_pool", "negative_step"])
def test_resume_refuses_a_hand_edited_checkpoint_with_valid_checksums(tmp_path, capsys, edit):
    d = _interrupted_run(tmp_path, sampler={"name": "srs", "batch_size": 50})
    path = d / "checkpoints/last.pt"
    st = torch.load(path, weights_only=True)
    if edit == "srs_pool":
        st["source"]["pool"] = torch.full_like(st["source"]["pool"], -1)
    else:
        st["step"] = -5
    torch.save(st, path)  # torch writes fresh CRC32s, so only the contents can give it away
    rows = len(_rows(d))
    assert main(["resume", str(d), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "does not fit" in err
    assert ("outside" in err) if edit == "srs_pool" else ("non-negative" in err)
    assert len(_rows(d)) == rows  # nothing trained


def test_resume_of_a_completed_run_still_checks_the_folder(tmp_path, capsys):
    d = tmp_path / "done"
    train.run(dict(TINY, duration="20 steps", eval={"every": 0}), d, quiet=True)
    assert main(["resume", str(d), "--quiet"]) == 0  # complete and intact: nothing to do
    capsys.readouterr()
    only = tmp_path / "only_summary"
    only.mkdir()
    (only / "summary.json").write_text((d / "summary.json").read_text())
    assert main(["resume", str(only)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["resume", str(d), "--threads", "0"]) == 2
    assert "threads" in capsys.readouterr().err
    blob = (d / "checkpoints/last.pt").read_bytes()
    (d / "checkpoints/last.pt").write_bytes(blob[: len(blob) // 3])
    assert main(["resume", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.pt" in err and "Traceback" not in err


def test_init_from_another_architecture_is_refused_by_check_and_run(tmp_path, capsys):
    src = tmp_path / "mlp"
    train.run(dict(TINY, duration="20 steps", eval={"every": 0}), src, quiet=True)
    cnn = dict(TINY, duration="20 steps", eval={"every": 0}, model={"name": "cnn1d"},
               checkpoint={"every": 0, "init_from": str(src)})
    cfg = _write(tmp_path / "cnn.yaml", cnn)
    assert main(["check", str(cfg)]) == 2
    assert "none of this model's" in capsys.readouterr().err
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "none of this model's" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    same = _write(tmp_path / "mlp.yaml", dict(cnn, model=TINY["model"]))
    assert main(["check", str(same)]) == 0
    assert "init_from: 4 tensors" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "0"], "batch-size must be a positive integer"),
    (["--batch-size", "-3"], "batch-size must be a positive integer"),
    (["--seed", "99999999999999999999"], "seed must be an integer in"),
    (["--seed", "-1"], "seed must be an integer in"),
])
def test_analyze_refuses_bad_batch_size_and_seed_by_name(tmp_path, capsys, args, match):
    d = tmp_path / "run"
    d.mkdir()
    assert main(["analyze", "hessian", str(d), *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    f = tmp_path / "tiny.yaml"
    f.write_text("seed: 1\n")
    assert main(["analyze", "hessian", str(f)]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err


def test_sweep_cli_refuses_a_bad_baseline_before_any_trial_runs(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", dict(TINY, duration="20 steps", eval={"every": 0}))
    out = tmp_path / "s"
    assert main(["sweep", str(cfg), "--grid", "optim.lr=0.01,0.02", "--baseline", "x=y", "--out", str(out),
                 "--quiet"]) == 2
    assert "no group has x=y" in capsys.readouterr().err
    assert not out.exists()  # refused before the folder, let alone a trial


@pytest.mark.parametrize("kind", ["hessian", "sharpness", "noise"])
def test_analyze_a_diverged_checkpoint_says_its_loss_is_not_finite(tmp_path, capsys, kind):
    d = tmp_path / "run"
    train.run(dict(TINY, duration="20 steps", eval={"every": 0}), d, quiet=True)
    path = d / "checkpoints/last.pt"
    st = torch.load(path, weights_only=True)
    st["model"] = {k: torch.full_like(v, float("nan")) for k, v in st["model"].items()}
    torch.save(st, path)
    assert main(["analyze", kind, str(d), "--examples", "50"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss of" in err and "is nan on the first 50 examples" in err
    assert not (d / "analysis").exists() or not any((d / "analysis").iterdir())


def test_library_calls_refuse_values_that_used_to_pass_or_crash_late():
    """``shake(training="no")`` would shake (a non-empty string is truthy); ``num_bootstrap=0`` ended in an
    IndexError; ``slq(num_points=0)`` returned an empty density."""
    import torch.nn as nn
    import torch.nn.functional as F

    from sgdlab.analysis import HessianOperator, gradient_noise_stats, slq
    from sgdlab.regularize import shake

    x1, x2 = torch.ones(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="training must be True or False"):
        shake(x1, x2, training="no")
    assert torch.equal(shake(x1, x2, training=False), torch.full((4, 3), 0.5))
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = (torch.randn(64, 3), torch.randint(0, 2, (64,)))
    with pytest.raises(ValueError, match="num_bootstrap"):
        gradient_noise_stats(model, F.cross_entropy, data, method="two_batch", batch_sizes=(4, 16), num_bootstrap=0)
    with pytest.raises(ValueError, match="num_points"):
        slq(HessianOperator(model, F.cross_entropy, data), num_vectors=1, num_steps=3, num_points=0)
