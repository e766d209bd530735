import csv
import json
import textwrap

import pytest

from sgdlab.cli import main
from sgdlab.errors import ConfigError
from sgdlab.experiments import ledger, protocol, studies
from sgdlab.experiments import stats as st

TINY = """\
name: tiny
title: a reasonable learning rate beats a tiny one
claim: "a learning rate of 0.1 trains; 1e-5 does not"
citation: "test fixture"
regime: "MNIST-1D, mlp 16 hidden, 30 steps"
estimate: "seconds"
base:
  device: cpu
  duration: 30 steps
  data: {name: mnist1d}
  model: {name: mlp, hidden: [16]}
  sampler: {name: epoch, batch_size: 50}
  optim: {lr: 0.1, momentum: 0.9}
  eval: {every: 15, train: true}
  checkpoint: {every: 0}
  log: {every: 10}
arms:
  - {label: tiny lr, set: {optim.lr: 1.0e-5}}
  - {label: lr 0.1}
seeds: {final: [0, 1, 2], pilot: [10, 11]}
metrics:
  loss_half: {kind: at_fraction, of: train_eval_loss, fraction: 0.5}
worst: {loss_half: 2.31}
record: [wall_time]
claims:
  - {id: lower, text: "lr 0.1 lowers the test error", metric: test_error, treatment: lr 0.1, baseline: tiny lr,
     direction: lower, sesoi: 0.05}
  - {id: higher, text: "lr 0.1 raises the test error", metric: test_error, treatment: lr 0.1,
     baseline: tiny lr, direction: higher, sesoi: 0.05}
  - {id: half, text: "lr 0.1 lowers the loss halfway", metric: loss_half, treatment: lr 0.1, baseline: tiny lr,
     direction: lower, sesoi: 0.1, primary: false}
quick:
  set: {duration: 15 steps}
"""


def _write(tmp_path, text=TINY, name="tiny.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_user_protocol_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path)
    assert main(["study", str(path), "--out", str(tmp_path / "runs"), "--jobs", "1", "--quiet"]) == 0
    res = tmp_path / "results" / "tiny"
    data = json.loads((res / "verdicts.json").read_text())
    by = {c["id"]: c for c in data["verdicts"]}
    assert by["lower"]["outcome"] == st.SUPPORTED and by["higher"]["outcome"] == st.CONTRADICTED
    assert by["lower"]["seeds"] == [0, 1, 2] and by["lower"]["ci_high"] < 0
    # Holm over the two primary claims; the secondary one is not adjusted
    raw = [by["lower"]["p"], by["higher"]["p"]]
    assert [by["lower"]["p_holm"], by["higher"]["p_holm"]] == pytest.approx(st.holm(raw))
    assert by["half"]["p_holm"] is None
    assert "In regime MNIST-1D, mlp 16 hidden, 30 steps" in by["lower"]["text"]
    assert data["protocol_sha256"] == protocol.load_protocol(path)[2] and data["commit"]
    assert (res / "protocol.yaml").read_text() == TINY
    with open(res / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    # seed-major order in the sweep; one row per trial with the claims' metrics
    assert len(rows) == 6 and {"test_error", "loss_half", "wall_time"} <= set(rows[0])
    sweep = json.loads((tmp_path / "runs" / "final" / "sweep.json").read_text())
    assert sweep["protocol_sha256"] == data["protocol_sha256"]
    # the ledger reads the results back; verdicts are recomputed from the table alone
    capsys.readouterr()
    assert main(["ledger", "--markdown"]) == 0
    md = capsys.readouterr().out
    table, regimes = md.split("\n\n")
    assert table.startswith("| study | claim |") and table.count("\n") == 3 and "supported" in table
    assert regimes == "- `tiny`: its verdicts hold in the regime MNIST-1D, mlp 16 hidden, 30 steps.\n"
    assert "lr 0.1 lowers the loss halfway" not in md  # secondary claims stay in the study's report
    (res / "verdicts.json").unlink()
    assert main(["ledger", "--recompute"]) == 0
    again = json.loads((res / "verdicts.json").read_text())
    assert again["verdicts"] == data["verdicts"]


def test_quick_mode_labels_pilot_estimates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path)
    assert main(["study", str(path), "--quick", "--out", str(tmp_path / "q"), "--jobs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pilot, not a verdict" in out and "not run yet" in out
    trials = json.loads((tmp_path / "q" / "trials" / "sweep.json").read_text())["trials"]
    assert sorted({t["seed"] for t in trials}) == [10, 11]  # pilot seeds, never the final ones
    assert not (tmp_path / "results").exists()


def test_diverged_trials_count_at_the_worst_value():
    proto, _, _ = protocol.load_protocol(studies_path("tiny_inline", TINY))
    table = [{"arm": "tiny lr", "seed": s, "status": "completed", "test_error": 0.8, "loss_half": 2.0}
             for s in (0, 1, 2)]
    table += [{"arm": "lr 0.1", "seed": 0, "status": "nonfinite", "test_error": None, "loss_half": None},
              {"arm": "lr 0.1", "seed": 1, "status": "completed", "test_error": 0.3, "loss_half": 1.0},
              {"arm": "lr 0.1", "seed": 2, "status": "completed", "test_error": 0.31, "loss_half": 1.1}]
    r = studies.verdicts_from_tables(proto, table)
    c = r["claims"][0]
    assert c["diverged"] == 1 and c["values"] == pytest.approx([0.2, -0.5, -0.49])  # worst test error 1.0
    assert r["claims"][2]["values"] == pytest.approx([0.31, -1.0, -0.9])  # the protocol's worst.loss_half
    table[4]["status"] = "interrupted"
    with pytest.raises(ConfigError, match="incomplete"):
        studies.verdicts_from_tables(proto, table)
    with pytest.raises(ConfigError, match="pairing by seed"):
        studies.verdicts_from_tables(proto, [t for t in table if (t["arm"], t["seed"]) != ("lr 0.1", 2)
                                             and t["status"] != "interrupted"])


_TMP = {}


def studies_path(name, text):
    import tempfile
    from pathlib import Path

    d = _TMP.setdefault("d", Path(tempfile.mkdtemp()))
    p = d / f"{name}.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("patch,match", [
    (("seeds: {final: [0, 1, 2], pilot: [10, 11]}", "seeds: {final: [0, 1, 2], pilot: [2, 11]}"), "never reused"),
    (("\n     baseline: tiny lr,", "\n     baseline: nope,"), "unknown arm"),
    (("sesoi: 0.1, primary", "sesoi: 0.1, worst: 1, primary"), "claims.2.worst"),
    (("worst: {loss_half: 2.31}", "worst: {}"), "worst.loss_half"),
    (("seeds: {final: [0, 1, 2], pilot: [10, 11]}", "seeds: {final: [0, 1, 2], pilot: [10, 11]}\nseed_keys: [seed]"),
     "not a dotted config key"),
    (("seeds: {final: [0, 1, 2], pilot: [10, 11]}",
      "seeds: {final: [0, 1, 2], pilot: [10, 11]}\nseed_keys: [optim.lr]"), "also set by arm 'tiny lr'"),
])
def test_protocol_errors_name_the_field(patch, match):
    text = TINY.replace(*patch)
    assert text != TINY
    with pytest.raises(ConfigError, match=match):
        protocol.load_protocol(studies_path("bad", text))


def test_unknown_study_exits_2(capsys):
    assert main(["study", "nope", "--quick"]) == 2
    assert "unknown study" in capsys.readouterr().err


def test_optimum_slope_on_constructed_results():
    text = textwrap.dedent("""\
        name: ob
        title: t
        claim: c
        citation: c
        regime: r
        base: {device: cpu}
        arms:
          - {label: "lr={lr} N={num_samples} B={batch_size}",
             vary: {optim.lr: [0.01, 0.04], data.num_samples: [1000, 4000], sampler.batch_size: [8, 16, 32, 64, 128]}}
        seeds: {final: [0, 1, 2, 3]}
        claims:
          - {id: lr, text: "B* grows with lr", kind: optimum_slope, metric: test_acc, x: sampler.batch_size,
             factors: [optim.lr, data.num_samples], slope_of: optim.lr, direction: higher, sesoi: 0.25}
          - {id: n, text: "B* grows with N", kind: optimum_slope, metric: test_acc, x: sampler.batch_size,
             factors: [optim.lr, data.num_samples], slope_of: data.num_samples, direction: higher, sesoi: 0.25}
        """)
    proto, _, _ = protocol.load_protocol(studies_path("ob", text))
    import numpy as np

    rng = np.random.default_rng(0)
    table = []
    for label, over in proto.arm_list():
        # log2 B* = 6 + 1.0 log2(lr / 0.01) + 0.5 log2(N / 1000): slopes 1 and 0.5
        opt = 3 + np.log2(over["optim.lr"] / 0.01) + 0.5 * np.log2(over["data.num_samples"] / 1000)
        for s in range(4):
            acc = 0.9 - 0.02 * (np.log2(over["sampler.batch_size"]) - opt) ** 2 + rng.normal(0, 1e-4)
            table.append({"arm": label, "seed": s, "status": "completed", "test_acc": acc})
    r = studies.verdicts_from_tables(proto, table)
    lr, n = r["claims"]
    assert lr["estimate"] == pytest.approx(1.0, abs=0.02) and n["estimate"] == pytest.approx(0.5, abs=0.02)


def test_every_shipped_protocol_validates_and_plans():
    from sgdlab.experiments import sweep as sw

    names = protocol.shipped()
    assert set(names) == {"srs", "shake", "random_gradient", "importance", "batch_size", "scaling", "optimal_batch",
                          "data_selection"}
    for name in names:
        proto, _, _ = protocol.load_protocol(name)
        assert len(proto.seeds.final) >= 5, name  # the coverage test in test_stats.py is at 5 seeds
        assert proto.estimate and proto.regime
        for quick in (False, True):
            base = studies._substitute(proto.base, {"tau_th": 1.5, "cost_ratio": 2.0})
            pts = [sw.Point(studies._substitute(o, {"tau_th": 1.5, "cost_ratio": 2.0}), lab)
                   for lab, o in proto.arm_list(quick)]
            _, trials = sw.plan(base, pts, [0, 3], seed_keys=proto.seed_keys)
            if "data.seed" in proto.seed_keys:  # a fresh draw per seed, one draw per seed across the arms
                assert {(t.seed, t.config["data"]["seed"]) for t in trials} == {(0, 0), (3, 3)}, name


def test_mnist1d_num_train_keeps_one_pool_and_test_set():
    from sgdlab.data import create
    from sgdlab.errors import DataError

    full = create("mnist1d", num_samples=500, cache=False)
    sub = create("mnist1d", num_samples=500, num_train=100, cache=False)
    assert sub.train_x.shape[0] == 100 and (sub.train_x == full.train_x[:100]).all()
    assert (sub.test_x == full.test_x).all()
    with pytest.raises(DataError, match="num_train"):
        create("mnist1d", num_samples=500, num_train=401, cache=False)


def test_sweeps_run_seed_major(tmp_path):
    from sgdlab.experiments.sweep import Point, run_sweep

    cfg = {"device": "cpu", "duration": "2 steps", "data": {"name": "synthetic", "num_samples": 20, "num_test": 10},
           "model": {"name": "mlp", "in_features": 20, "hidden": [4]}, "sampler": {"batch_size": 10},
           "eval": {"every": 0}, "checkpoint": {"every": 0}}
    order = []
    run_sweep(cfg, [Point({}, "a"), Point({"optim.lr": 0.05}, "b")], [0, 1], tmp_path / "s", progress=False,
              seed_major=True, on_result=lambda t, r: order.append((t.seed, t.label)))
    assert order == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]


def test_seed_keys_follow_the_trial_seed_and_pair_the_arms(tmp_path):
    from sgdlab.experiments.sweep import Point, plan

    cfg = {"device": "cpu", "duration": "2 steps", "data": {"name": "synthetic", "num_samples": 20, "num_test": 10},
           "model": {"name": "mlp", "in_features": 20, "hidden": [4]}, "sampler": {"batch_size": 10}}
    _, trials = plan(cfg, [Point({}, "a"), Point({"optim.lr": 0.05}, "b")], [4, 7], seed_keys=["data.seed"])
    assert sorted((t.label, t.seed, t.config["data"]["seed"]) for t in trials) == [
        ("a", 4, 4), ("a", 7, 7), ("b", 4, 4), ("b", 7, 7)]
    _, fixed = plan(cfg, [Point({}, "a")], [4, 7])
    assert {t.config["data"]["seed"] for t in fixed} == {0}  # without seed_keys one draw serves every seed
    with pytest.raises(ConfigError, match="also a grid key"):
        plan(cfg, [Point({"data.seed": 1}, "a")], [4], seed_keys=["data.seed"])


def test_analyses_enter_the_table(tmp_path):
    text = TINY.replace("seeds: {final: [0, 1, 2], pilot: [10, 11]}", "seeds: {final: [0, 1], pilot: [10, 11]}")
    text = text.replace("record: [wall_time]", "record: [wall_time, sharpness]\nanalyses: [{kind: sharpness, samples: 50}]")
    res = studies.run_study(_write(tmp_path, text), out=tmp_path / "runs", results=tmp_path / "results",
                            progress=False)
    rows = studies.read_table(res["artifacts"] / "trials.csv")
    assert len(rows) == 4 and all(r["sharpness"] is not None and r["sharpness"] >= 0 for r in rows)
    assert (res["artifacts"] / "figures").is_dir()


def test_a_target_no_trial_reached_decides_nothing():
    text = TINY.replace("worst: {loss_half: 2.31}",
                        "  steps: {kind: first_below, of: train_eval_loss, target: 0.5, x: step}\n"
                        "worst: {loss_half: 2.31, steps: 30}")
    text = text.replace("claims:\n", "claims:\n  - {id: faster, text: \"lr 0.1 reaches loss 0.5 sooner\", "
                        "metric: steps, treatment: lr 0.1, baseline: tiny lr, direction: lower, sesoi: 5}\n", 1)
    proto, _, _ = protocol.load_protocol(studies_path("tiny_target", text))

    def table(reached_fast: list[float]):
        rows = []
        for s, hit in zip((0, 1, 2), reached_fast):
            rows.append({"arm": "tiny lr", "seed": s, "status": "completed", "test_error": 0.8, "loss_half": 2.0,
                         "steps": 30.0, "steps_reached": 0.0})
            rows.append({"arm": "lr 0.1", "seed": s, "status": "completed", "test_error": 0.3, "loss_half": 1.0,
                         "steps": 10.0 + s if hit else 30.0, "steps_reached": hit})
        return rows

    # no trial of either arm reached the target: every value is the budget, a difference of exactly 0,
    # which the interval alone would call "no effect of the claimed size"
    r = studies.verdicts_from_tables(proto, table([0.0, 0.0, 0.0]))
    studies.finish({"tiny": proto}, {"tiny": r})
    c = r["claims"][0]
    assert (c["unreached"], c["trials"]) == (6, 6)
    assert c["outcome"] == st.INCONCLUSIVE and c["verdict"] == "inconclusive (no trial reached the target)"
    assert "6 of 6 trials never reached the target" in c["text"]
    # the fast arm reached it: a real speed difference, decided as usual, with the censored trials counted
    r = studies.verdicts_from_tables(proto, table([1.0, 1.0, 1.0]))
    studies.finish({"tiny": proto}, {"tiny": r})
    c = r["claims"][0]
    assert (c["unreached"], c["trials"]) == (3, 6) and c["outcome"] == st.SUPPORTED
    assert "3 of 6 trials never reached the target (counted at the budget)" in c["note"]
    # the other claims' metrics are not first_below: nothing is counted
    assert all((x["unreached"], x["trials"]) == (0, 0) for x in r["claims"][1:])


def test_the_commit_recorded_is_the_one_that_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path)
    heads = iter(["aaa", "bbb", "bbb"])  # the checkout moves to bbb while the study runs
    monkeypatch.setattr(studies, "_commit", lambda: next(heads))
    studies.run_study(str(path), quick=True, out=tmp_path / "q", jobs=1, progress=False)
    ctx = json.loads((tmp_path / "q" / "context.json").read_text())
    assert (ctx["commit"], ctx["commit_at_end"]) == ("aaa", "bbb")
    assert "code commit `aaa` (checkout at the end: `bbb`)" in (tmp_path / "q" / "report.md").read_text()


def test_an_installed_wheel_finds_the_shipped_protocols(tmp_path, monkeypatch):
    import sysconfig
    import tomllib
    from pathlib import Path

    # the wheel's data-files put studies/ under <prefix>/share/sgdlab/studies
    root = Path(__file__).resolve().parents[1]
    files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert sorted(files["share/sgdlab/studies"]) == ["studies/*.yaml", "studies/ORDER"]
    share = tmp_path / "share" / "sgdlab" / "studies"
    share.mkdir(parents=True)
    for f in [*(root / "studies").glob("*.yaml"), root / "studies" / "ORDER"]:
        (share / f.name).write_text(f.read_text())
    # outside any source tree, only the installed copy can be found
    monkeypatch.setattr(protocol, "__file__", str(tmp_path / "site-packages" / "sgdlab" / "experiments" / "p.py"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"data": str(tmp_path)})
    monkeypatch.chdir(tmp_path)
    assert protocol.studies_dir() == share
    assert protocol.find_protocol("srs") == share / "srs.yaml" and "shake" in protocol.shipped()


@pytest.mark.parametrize("edit,match", [
    (lambda t: t[: t.index("\n", t.index("\n") + 1) + 12], r"trials\.csv:3: fewer cells"),
    (lambda t: t.replace("0.25", "abc", 1), r"trials\.csv:2: test_error: not a number \('abc'\)"),
    (lambda t: t.replace("a,0,", "a,zero,", 1), r"trials\.csv:2: seed: not an integer"),
    (lambda t: t.replace("0.25", "0.25,7", 1), r"trials\.csv:2: more cells"),
    (lambda t: t.replace("seed,", "", 1), r"trials\.csv:1: the header lacks the column\(s\) seed"),
], ids=["cut", "not-a-number", "seed", "extra-cell", "header"])
def test_a_damaged_table_names_its_line(tmp_path, edit, match):
    path = tmp_path / "trials.csv"
    rows = [{"arm": "a", "seed": "0", "status": "completed", "test_error": "0.25", "wall_time": ""},
            {"arm": "b", "seed": "1", "status": "completed", "test_error": "0.5", "wall_time": "3.0"}]
    studies.write_table(rows, path)
    assert studies.read_table(path)[1] == {"arm": "b", "seed": 1, "status": "completed", "test_error": 0.5,
                                           "wall_time": 3.0}
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError, match=match):
        studies.read_table(path)


def test_ledger_of_a_missing_results_folder_exits_2(tmp_path, capsys):
    for root in (tmp_path / "nowhere", tmp_path / "file"):
        if root.name == "file":
            root.write_text("x")
        assert main(["ledger", "--results", str(root)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sgdlab: error: {root}: ") and err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["ledger", "--results", str(tmp_path / "empty")]) == 0
    assert "no study results" in capsys.readouterr().out
