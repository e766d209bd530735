"""The verdict guards on constructed tables: each case is a mistake a protocol could make that the
machinery must catch (docs/studies.md, "How to write a protocol that holds")."""

import json
import math
import textwrap

import numpy as np
import pytest

from sgdlab.cli import main
from sgdlab.errors import ConfigError
from sgdlab.experiments import ledger, protocol, studies, verdicts
from sgdlab.experiments import stats as st

BASE = """\
name: g
title: guards
claim: c
citation: test fixture
regime: constructed
base:
  device: cpu
  duration: 10 steps
  data: {name: mnist1d}
  model: {name: mlp, hidden: [8]}
  sampler: {name: epoch, batch_size: 50}
  optim: {lr: 0.1}
"""


def _proto(tmp_path, body, name="g"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(BASE.replace("name: g", f"name: {name}") + textwrap.dedent(body))
    return protocol.load_protocol(p)[0]


def _decide(proto, table, pilot=None):
    r = verdicts.verdicts_from_tables(proto, table, pilot)
    verdicts.finish({proto.name: proto}, {proto.name: r})
    return r


LR_GRID = """\
arms:
  - {label: base}
  - {label: "lr={lr}", vary: {optim.lr: [0.01, 0.1, 1.0]}}
seeds: {final: [0, 1, 2, 3], pilot: [10, 11]}
worst: {test_loss: 10.0}
select:
  lr: {candidates: ["lr=0.01", "lr=0.1", "lr=1.0"], metric: test_loss, direction: lower}
claims:
  - {id: c, text: "the best lr beats base", metric: test_acc, treatment: "@lr", baseline: base,
     direction: higher, sesoi: 0.01}
"""


def _rows(arms_vals, seeds, metric="test_acc", **extra):
    return [{"arm": a, "seed": s, "status": "completed", metric: v(s) if callable(v) else v, **extra}
            for a, v in arms_vals.items() for s in seeds]


def _final(best):
    return _rows({"base": lambda s: 0.5 + 0.001 * s, best: lambda s: 0.6 + 0.002 * s}, [0, 1, 2, 3])


@pytest.mark.parametrize("pilot_losses,best,bracketed", [
    ({"lr=0.01": 1.0, "lr=0.1": 0.5, "lr=1.0": 0.2}, "lr=1.0", False),   # best at the grid's top
    ({"lr=0.01": 0.2, "lr=0.1": 0.5, "lr=1.0": 0.9}, "lr=0.01", False),  # best at the grid's bottom
    ({"lr=0.01": 1.0, "lr=0.1": 0.2, "lr=1.0": 0.9}, "lr=0.1", True),    # interior: decided
    ({"lr=0.01": 1.0, "lr=0.1": 0.2, "lr=1.0": 0.2}, "lr=0.1", False),   # interior, tied with the top
])
def test_a_selection_at_the_grid_edge_is_not_bracketed(tmp_path, pilot_losses, best, bracketed):
    proto = _proto(tmp_path, LR_GRID)
    pilot = _rows(pilot_losses, [10, 11], metric="test_loss")
    r = _decide(proto, _final(best), pilot)
    c = r["claims"][0]
    assert r["selection"]["lr"]["arm"] == best and r["selection"]["lr"]["bracketed"] is bracketed
    if bracketed:
        assert c["outcome"] == st.SUPPORTED
    else:
        assert c["verdict"] == "inconclusive (optimum not bracketed)"
        assert "the interval said supported" in c["note"] and repr(best) in c["note"]


def test_a_ladder_rung_that_ran_brackets_the_optimum(tmp_path):
    proto = _proto(tmp_path, LR_GRID.replace("direction: lower}", "direction: lower,\n       ladder: {key: optim.lr, factor: 2, max_rungs: 3}}"))
    rung1 = proto.ladder_arm("lr", "high", 1)
    assert rung1 == ("lr=1.0 [ladder lr=2]", {"optim.lr": 2.0})
    pilot = _rows({"lr=0.01": 1.0, "lr=0.1": 0.5, "lr=1.0": 0.2, rung1[0]: 0.4}, [10, 11], metric="test_loss")
    r = _decide(proto, _final("lr=1.0"), pilot)
    assert r["selection"]["lr"]["bracketed"] and r["claims"][0]["outcome"] == st.SUPPORTED
    # the rung diverged: the extreme is out, the best lies inside
    pilot[-2:] = [dict(p, status="nonfinite", test_loss=None) for p in pilot[-2:]]
    r = _decide(proto, _final("lr=1.0"), pilot)
    assert r["selection"]["lr"]["diverged"] == {rung1[0]: 2} and r["selection"]["lr"]["bracketed"]


def test_the_runner_climbs_the_ladder_until_interior(tmp_path, monkeypatch):
    proto = _proto(tmp_path, LR_GRID.replace("direction: lower}", "direction: lower,\n       ladder: {key: optim.lr, factor: 2, max_rungs: 5}}"))
    loss = {2.0: 0.15, 4.0: 0.1, 8.0: 0.3}  # the optimum is at lr 4: two rungs above the grid
    ran = []

    def fake_sweep(proto_, arms, seeds, out, measured, **kw):
        ran.append(arms[0])
        return [{"label": arms[0][0], "seed": s, "lr": arms[0][1]["optim.lr"]} for s in seeds]

    def fake_table(proto_, trials, measured):
        return [{"arm": t["label"], "seed": t["seed"], "status": "completed", "test_loss": loss[t["lr"]]}
                for t in trials]

    monkeypatch.setattr(studies, "_sweep", fake_sweep)
    monkeypatch.setattr(studies, "build_table", fake_table)
    pilot = _rows({"lr=0.01": 1.0, "lr=0.1": 0.5, "lr=1.0": 0.2}, [10, 11], metric="test_loss")
    added = studies._climb_ladders(proto, pilot, tmp_path, {}, jobs=1, progress=False, extra={})
    assert [a[1]["optim.lr"] for a in added] == [2.0, 4.0, 8.0]
    sel = verdicts.select_arms(proto, pilot)["lr"]
    assert sel["arm"] == "lr=1.0 [ladder lr=4]" and sel["bracketed"]


def test_a_diverged_pilot_arm_never_wins_and_verdicts_json_has_no_nan(tmp_path, monkeypatch):
    # select on test_loss without a worst value: a diverged trial's value is NaN, which max() kept
    proto = _proto(tmp_path, LR_GRID.replace("worst: {test_loss: 10.0}\n", ""))
    pilot = _rows({"lr=0.1": 0.5, "lr=1.0": 1.0}, [10, 11], metric="test_loss")
    pilot = [dict(arm="lr=0.01", seed=s, status="nonfinite", test_loss=None) for s in (10, 11)] + pilot
    sel = verdicts.select_arms(proto, pilot)["lr"]  # the diverged arm is the first candidate: max() kept it
    assert sel["arm"] == "lr=0.1" and math.isnan(sel["pilot_means"]["lr=0.01"])
    d = tmp_path / "results" / "g"
    d.mkdir(parents=True)
    (d / "protocol.yaml").write_text((tmp_path / "g.yaml").read_text())
    studies.write_table(_final("lr=0.1"), d / "trials.csv")
    studies.write_table(pilot, d / "pilot.csv")
    monkeypatch.chdir(tmp_path)
    assert main(["ledger", "--results", str(tmp_path / "results"), "--recompute"]) == 0
    text = (d / "verdicts.json").read_text()
    assert "NaN" not in text and json.loads(text)["selection"]["lr"]["pilot_means"]["lr=0.01"] is None


def test_a_predicted_value_is_what_the_verdict_is_about(tmp_path):
    proto = _proto(tmp_path, """\
        arms: [{label: a}, {label: b}]
        seeds: {final: [0, 1, 2, 3, 4, 5]}
        claims:
          - {id: p, text: "slope 1", metric: test_acc, treatment: a, baseline: b, direction: higher, sesoi: 0.25,
             predicted: 1.0}
        """)
    noise = np.array([-0.02, 0.01, 0.0, 0.02, -0.01, 0.0])

    def table(effect):
        return ([{"arm": "b", "seed": s, "status": "completed", "test_acc": 0.0} for s in range(6)]
                + [{"arm": "a", "seed": s, "status": "completed", "test_acc": effect + noise[s]} for s in range(6)])

    for effect, outcome in ((1.05, st.SUPPORTED), (0.1, st.CONTRADICTED), (0.75, st.INCONCLUSIVE)):
        c = _decide(proto, table(effect))["claims"][0]
        assert c["outcome"] == outcome, effect
        assert "sign test beside it: supported" in c["note"]
        # the p is the TOST p against the band [0.75, 1.25]
        v = np.asarray(c["values"])
        se = v.std(ddof=1) / math.sqrt(6)
        from scipy import stats as sps
        tost = max(sps.t.sf((v.mean() - 0.75) / se, 5), sps.t.sf((1.25 - v.mean()) / se, 5))
        assert c["p"] == pytest.approx(tost)
    # the old reading (slope 0.1 > 0: "supported") survives only as the sign test
    assert _decide(proto, table(0.1))["claims"][0]["verdict"] == "contradicted (prediction)"


def test_non_inferiority_uses_the_one_sided_p_against_the_margin(tmp_path):
    proto = _proto(tmp_path, """\
        arms: [{label: a}, {label: b}, {label: c}]
        seeds: {final: [0, 1, 2, 3, 4, 5, 6, 7]}
        claims:
          - {id: ni, text: "a keeps b's accuracy within 0.01", metric: test_acc, treatment: a, baseline: b,
             direction: higher, sesoi: 0.01, margin: 0.01}
          - {id: other, text: "c beats b", metric: test_acc, treatment: c, baseline: b, direction: higher, sesoi: 0.01}
        """)
    d = np.array([-0.0028, -0.004, -0.001, -0.002, -0.0035, -0.0025, -0.003, -0.0032])  # worse, but by < 0.01
    table = ([{"arm": "b", "seed": s, "status": "completed", "test_acc": 0.9} for s in range(8)]
             + [{"arm": "a", "seed": s, "status": "completed", "test_acc": 0.9 + d[s]} for s in range(8)]
             + [{"arm": "c", "seed": s, "status": "completed", "test_acc": 0.95 + d[s]} for s in range(8)])
    r = _decide(proto, table)
    ni = r["claims"][0]
    from scipy import stats as sps
    se = d.std(ddof=1) / math.sqrt(8)
    assert ni["p"] == pytest.approx(sps.t.sf((d.mean() + 0.01) / se, 7))  # one-sided against -margin
    assert ni["p_zero"] == pytest.approx(2 * sps.t.sf(abs(d.mean()) / se, 7))  # the old p: evidence of "worse"
    assert ni["p"] < 1e-6 and ni["p_zero"] > 1e-5
    assert ni["p_holm"] == pytest.approx(st.holm([ni["p"], r["claims"][1]["p"]])[0])
    assert ni["outcome"] == st.SUPPORTED


def test_unmatched_arms_refuse_to_decide(tmp_path):
    proto = _proto(tmp_path, """\
        arms: [{label: small}, {label: large}]
        seeds: {final: [0, 1, 2], pilot: [10, 11]}
        worst: {sharpness: 1.0e6}
        claims:
          - {id: flat, text: "small is flatter", metric: sharpness, log: true, treatment: small, baseline: large,
             direction: lower, sesoi: 0.223, matched: {metric: train_eval_loss, tolerance: 0.2}}
        """)
    def table(seeds, loss_large):
        return ([{"arm": "small", "seed": s, "status": "completed", "sharpness": 1.0 + 0.01 * s, "train_eval_loss": 0.057}
                 for s in seeds]
                + [{"arm": "large", "seed": s, "status": "completed", "sharpness": 3.0 + 0.02 * s,
                    "train_eval_loss": loss_large} for s in seeds])

    c = _decide(proto, table([0, 1, 2], 0.06), table([10, 11], 0.267))["claims"][0]
    assert c["verdict"] == "inconclusive (arms not matched)"
    assert c["matched"]["on"] == "pilot" and c["matched"]["difference"] == pytest.approx(math.log(0.057 / 0.267))
    c = _decide(proto, table([0, 1, 2], 0.06), table([10, 11], 0.06))["claims"][0]
    assert c["outcome"] == st.SUPPORTED and c["matched"]["ok"]


def test_a_metric_at_its_floor_is_flagged(tmp_path):
    proto = _proto(tmp_path, """\
        arms: [{label: uniform}, {label: importance}]
        seeds: {final: [0, 1, 2]}
        metrics:
          loss_50: {kind: at_fraction, of: train_eval_loss, fraction: 0.5, x: time}
          loss_100: {kind: at_fraction, of: train_eval_loss, fraction: 1.0, x: time}
        worst: {loss_50: 2.3, loss_100: 2.3}
        claims:
          - {id: end, text: "IS lowers the final loss", metric: loss_100, log: true, treatment: importance,
             baseline: uniform, direction: lower, sesoi: 0.0953}
        """)
    def table(uniform_end):
        return ([{"arm": "uniform", "seed": s, "status": "completed", "loss_50": 9.5e-4, "loss_100": uniform_end}
                 for s in range(3)]
                + [{"arm": "importance", "seed": s, "status": "completed", "loss_50": 0.1, "loss_100": 0.01 + 1e-4 * s}
                   for s in range(3)])

    c = _decide(proto, table(9.3e-4))["claims"][0]  # uniform stopped improving: a floor
    assert c["verdict"] == "contradicted (metric at a floor)" and c["floor"]["stopped"] == ["uniform"]
    assert "floor: uniform improved by less than 0.0953" in c["note"]
    c = _decide(proto, table(9.5e-5))["claims"][0]  # both still falling tenfold
    assert c["verdict"] == "contradicted" and not c["floor"]["flagged"]


def test_collapsed_trials_are_counted_beside_diverged_ones(tmp_path):
    proto = _proto(tmp_path, """\
        arms: [{label: a}, {label: b}]
        seeds: {final: [0, 1, 2]}
        claims:
          - {id: x, text: "a beats b", metric: test_acc, treatment: a, baseline: b, direction: higher, sesoi: 0.01}
        """)
    table = ([{"arm": "b", "seed": s, "status": "completed", "test_acc": [0.11, 0.9, 0.09][s]} for s in range(3)]
             + [{"arm": "a", "seed": 0, "status": "nonfinite", "test_acc": None}]
             + [{"arm": "a", "seed": s, "status": "completed", "test_acc": 0.95} for s in (1, 2)])
    c = _decide(proto, table)["claims"][0]
    assert (c["diverged"], c["collapsed"]) == (1, 2)
    assert "1 diverged trials counted at the worst value, 2 collapsed trials (at chance)" in c["text"]


def test_a_fitted_optimum_at_the_grid_edge_is_not_bracketed(tmp_path):
    proto = _proto(tmp_path, """\
        arms:
          - {label: "lr={lr} B={batch_size}", vary: {optim.lr: [0.01, 0.1], sampler.batch_size: [16, 32, 64, 128]}}
        seeds: {final: [0, 1, 2]}
        claims:
          - {id: s, text: "B* grows with lr", kind: optimum_slope, metric: test_acc, x: sampler.batch_size,
             factors: [optim.lr], slope_of: optim.lr, direction: higher, sesoi: 0.25}
        """)
    def table(best_low):
        rows = []
        for s in range(3):
            for lr, b_star in ((0.01, best_low), (0.1, 64)):
                for b in (16, 32, 64, 128):
                    acc = 0.9 - 0.01 * (math.log2(b) - math.log2(b_star) - 0.1 * s) ** 2
                    rows.append({"arm": f"lr={lr} B={b}", "seed": s, "status": "completed", "test_acc": acc})
        return rows

    c = _decide(proto, table(32))["claims"][0]
    assert c["edge_fits"] == 0 and c["fits"] == 6 and c["outcome"] == st.SUPPORTED
    c = _decide(proto, table(8))["claims"][0]  # the lr 0.01 optimum lies below the grid: the fit falls to B=16
    assert c["edge_fits"] == 3 and c["verdict"] == "inconclusive (optimum not bracketed)"
    assert "3 of 6 fitted optima lie at the grid's edge" in c["note"]


# ------------------------------------------------------------------------------------------------------
# artifacts on read (ledger --recompute)
# ------------------------------------------------------------------------------------------------------

AB = """\
arms: [{label: a}, {label: b}]
seeds: {final: [0, 1, 2]}
claims:
  - {id: x, text: "a beats b", metric: test_error, treatment: a, baseline: b, direction: lower, sesoi: 0.01}
"""


def _study(tmp_path, body=AB, rows=None, name="g"):
    _proto(tmp_path, body, name)
    d = tmp_path / "results" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "protocol.yaml").write_text((tmp_path / f"{name}.yaml").read_text())
    rows = rows or ([{"arm": "a", "seed": s, "status": "completed", "test_error": 0.1 + 0.01 * s} for s in range(3)]
                    + [{"arm": "b", "seed": s, "status": "completed", "test_error": 0.3 + 0.02 * s} for s in range(3)])
    studies.write_table(rows, d / "trials.csv")
    return d


def _recompute_fails(tmp_path, capsys, match):
    capsys.readouterr()
    assert main(["ledger", "--results", str(tmp_path / "results"), "--recompute"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert match in err, err
    return err


@pytest.mark.parametrize("edit,match", [
    (lambda t: t + t.splitlines()[-1] .replace("0.34", "0.9") + "\n", "trials.csv:8: arm 'b' seed 2 repeats line 7"),
    (lambda t: t + "a,3,completed,0.1\nb,3,completed,0.3\n", "trials.csv:8: seed 3 is not one of the protocol's seeds"),
    (lambda t: t.replace("0.1,", "-5,", 1).replace("a,0,completed,0.1\n", "a,0,completed,-5\n"),
     "trials.csv:2: test_error: -5 lies outside its range [0, 1]"),
    (lambda t: t.replace("a,1,completed,0.11", "a,1,completed,nan"), "trials.csv:3: test_error: nan is not finite"),
    (lambda t: t.replace("a,1,", "z,1,"), "trials.csv:3: arm 'z' is not an arm of protocol 'g'"),
], ids=["duplicate", "unregistered-seed", "out-of-range", "nan", "unknown-arm"])
def test_a_damaged_artifact_is_one_line_naming_file_and_row(tmp_path, capsys, edit, match):
    d = _study(tmp_path)
    assert main(["ledger", "--results", str(tmp_path / "results"), "--recompute"]) == 0
    (d / "trials.csv").write_text(edit((d / "trials.csv").read_text()))
    err = _recompute_fails(tmp_path, capsys, match)
    assert str(d / "trials.csv") in err


def test_a_study_without_its_protocol_is_an_error(tmp_path, capsys):
    _study(tmp_path)
    d2 = _study(tmp_path, name="h")
    (d2 / "protocol.yaml").unlink()
    _recompute_fails(tmp_path, capsys, f"{d2 / 'protocol.yaml'}: missing")
    assert main(["ledger", "--results", str(tmp_path / "results")]) == 2


def test_recompute_refuses_without_the_pilot_table(tmp_path, capsys):
    rows = (_rows({"base": 0.5, "lr=0.1": 0.6}, [0, 1, 2, 3]))
    d = _study(tmp_path, LR_GRID, rows)
    _recompute_fails(tmp_path, capsys, f"{d / 'pilot.csv'}: missing; g's selections (lr) are made on the pilot seeds")
    studies.write_table(_rows({"lr=0.01": 1.0, "lr=0.1": 0.2, "lr=1.0": 0.9}, [10, 11], metric="test_loss"),
                        d / "pilot.csv")
    assert main(["ledger", "--results", str(tmp_path / "results"), "--recompute"]) == 0
    pilot = (d / "pilot.csv").read_text()
    (d / "pilot.csv").write_text(pilot.replace("lr=0.1,10,", "lr=0.1,0,"))  # a final seed in the pilot table
    _recompute_fails(tmp_path, capsys, "pilot.csv:4: seed 0 is not one of the protocol's seeds")


def test_history_keeps_superseded_runs_and_the_ledger_counts_them(tmp_path, capsys):
    d = _study(tmp_path)
    root = tmp_path / "results"
    assert main(["ledger", "--results", str(root), "--recompute"]) == 0
    assert ledger.load(root)[0]["earlier_runs"] == 0
    path = ledger.archive(d, "rerun with more seeds", replaced_by="abc")
    assert path == d / "history" / "01.json"
    entry = json.loads(path.read_text())
    assert entry["replaced_because"] == "rerun with more seeds" and entry["verdicts"][0]["verdict"] == "supported"
    assert entry["protocol_sha256"] == protocol.load_protocol(d / "protocol.yaml")[2]
    assert ledger.archive(d, "again").name == "02.json"
    assert ledger.load(root)[0]["earlier_runs"] == 2
    capsys.readouterr()
    assert main(["ledger", "--results", str(root), "--markdown"]) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith("| supported | 2 |")
    assert main(["ledger", "--results", str(root), "--history"]) == 0
    out = capsys.readouterr().out
    assert "## g: 2 earlier runs" in out and "### run 1: protocol v1 (protocol hash" in out and "Replaced because: rerun with more seeds" in out
    (d / "history" / "03.json").write_text("{}")
    with pytest.raises(ConfigError, match="03.json: a history entry needs 'replaced_because'"):
        ledger.history(d)


def test_amendments_read_only_their_own_run_and_leave_with_it(tmp_path, capsys):
    d = _study(tmp_path)
    root = tmp_path / "results"
    sha = protocol.load_protocol(d / "protocol.yaml")[2]
    body = "reason: the check was misspecified\nclaims:\n  x: {misspecified: read in eval mode}\n"
    (d / "amendments.yaml").write_text(body)  # no hash: refused
    _recompute_fails(tmp_path, capsys, "protocol_sha256 must be the hash of the run it reads")
    (d / "amendments.yaml").write_text(f"protocol_sha256: {'0' * 64}\n" + body)  # another run's
    _recompute_fails(tmp_path, capsys, "amendments of an earlier run belong in history/")
    (d / "amendments.yaml").write_text(f"protocol_sha256: {sha}\n" + body)
    assert main(["ledger", "--results", str(root), "--recompute"]) == 0
    assert ledger.load(root)[0]["post_hoc"] == ["misspecified"]
    (d / "pilot.csv").write_text("arm,seed,status,test_error\n")
    path = ledger.archive(d, "a new design")
    assert not (d / "amendments.yaml").exists() and not (d / "pilot.csv").exists()
    assert json.loads(path.read_text())["amendments"] == "01-amendments.yaml"
    assert (d / "history" / "01-amendments.yaml").read_text().endswith(body)
    assert (d / "history" / "01-pilot.csv").is_file()
    assert main(["ledger", "--results", str(root), "--recompute"]) == 0
    assert "post_hoc" not in ledger.load(root)[0]
    capsys.readouterr()
    assert main(["ledger", "--results", str(root), "--history"]) == 0
    assert "post-hoc readings (`history/01-amendments.yaml`)" in capsys.readouterr().out


def test_a_revised_protocol_version_is_named(tmp_path):
    c = {"stale": True, "ran_version": 1, "shipped_version": 2}
    assert ledger._stale(c) == " (ran protocol v1; v2 not yet run)"
    assert ledger._stale({"stale": True}) == " (earlier protocol: rerun)" and ledger._stale({}) == ""


def test_the_ledger_no_longer_imports_the_runner():
    import ast
    from pathlib import Path

    for mod in (ledger, verdicts):
        tree = ast.parse(Path(mod.__file__).read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "studies" not in names, mod.__name__


def test_adaptive_sharpness_is_invariant_to_relu_rescaling():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    before = studies.adaptive_sharpness(net, (x, y), 0.05)
    with torch.no_grad():  # the same function: layer 1 (weights and bias) x 10, layer 2 / 10
        net[0].weight.mul_(10), net[0].bias.mul_(10), net[2].weight.div_(10)
    assert studies.adaptive_sharpness(net, (x, y), 0.05) == pytest.approx(before, rel=1e-4)
    assert before > 0
    # Keskar's box measure, by contrast, moves under the same rescaling
    from sgdlab import analysis
    import torch.nn.functional as F

    keskar = [float(analysis.model_sharpness(net, F.cross_entropy, (x, y), eps=1e-3, max_iter=5, seed=0))]
    with torch.no_grad():
        net[0].weight.div_(10), net[0].bias.div_(10), net[2].weight.mul_(10)
    keskar.append(float(analysis.model_sharpness(net, F.cross_entropy, (x, y), eps=1e-3, max_iter=5, seed=0)))
    assert keskar[0] != pytest.approx(keskar[1], rel=0.05)


def test_a_mean_metric_after_a_fraction_reads_only_the_end(tmp_path):
    proto = _proto(tmp_path, """\
        arms: [{label: a}, {label: b}]
        seeds: {final: [0, 1]}
        metrics:
          late: {kind: mean, of: train_loss, x: step, after: 0.9}
        worst: {late: 2.3}
        claims:
          - {id: x, text: "a", metric: late, treatment: a, baseline: b, direction: higher, sesoi: 0.1}
        """)
    rows = [{"step": s, "train_loss": 1.0 if s < 90 else 0.2} for s in range(0, 101, 10)]
    assert studies._derived(proto, {"rows": rows}, {})["late"] == pytest.approx(0.2)


MANIPULATION = """\
    arms: [{label: uniform}, {label: importance}]
    seeds: {final: [0, 1, 2, 3]}
    metrics:
      is_fraction: {kind: mean, of: is_active, missing: 0.0}
    worst: {is_fraction: 0.0, test_loss: 10.0}
    claims:
      - {id: loss, text: "IS lowers the test loss", metric: test_loss, treatment: importance, baseline: uniform,
         direction: lower, sesoi: 0.01, requires: switch}
      - {id: switch, text: "manipulation check: IS is on for a quarter of the steps more", metric: is_fraction,
         treatment: importance, baseline: uniform, direction: higher, sesoi: 0.25, primary: false}
"""


@pytest.mark.parametrize("on,verdict", [
    (lambda s: 0.9 + 0.01 * s, "supported"),                    # the switch was on: the claim is tested
    (lambda s: [0.0, 0.015, 0.0, 0.01][s], "supported (misspecified)"),  # it never turned on
])
def test_a_claim_that_requires_a_manipulation_check_is_misspecified_without_it(tmp_path, on, verdict):
    """``requires: <check>``: the registered check decides whether the claim tests what it says; an arm that
    never logs the manipulated quantity reads the metric's ``missing`` value (0 for uniform sampling)."""
    proto = _proto(tmp_path, MANIPULATION)
    assert studies._derived(proto, {"rows": [{"step": 1, "train_loss": 1.0}]}, {}) == {"is_fraction": 0.0}
    assert studies._derived(proto, {"rows": []}, {}) == {}  # nothing logged at all: undefined, not 0
    table = ([{"arm": "uniform", "seed": s, "status": "completed", "test_loss": 1.0 + 0.01 * s, "is_fraction": 0.0}
              for s in range(4)]
             + [{"arm": "importance", "seed": s, "status": "completed", "test_loss": 0.8 + 0.013 * s,
                 "is_fraction": on(s)} for s in range(4)])
    claims = {c["id"]: c for c in _decide(proto, table)["claims"]}
    assert claims["loss"]["verdict"] == verdict
    if "misspecified" in verdict:
        assert claims["switch"]["outcome"] != "supported"
        assert "manipulation check 'switch' is" in claims["loss"]["note"]


def test_requires_names_a_secondary_check_of_the_protocol(tmp_path):
    for bad in ("requires: nothing", "requires: loss"):
        with pytest.raises(ConfigError, match="requires names"):
            _proto(tmp_path, MANIPULATION.replace("requires: switch", bad))
    with pytest.raises(ConfigError, match="requires names"):
        _proto(tmp_path, MANIPULATION.replace("sesoi: 0.25, primary: false", "sesoi: 0.25"))
