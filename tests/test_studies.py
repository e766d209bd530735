import json

import numpy as np
import pytest

from sgdlab.errors import ConfigError
from sgdlab.experiments import studies
from sgdlab.experiments import sweep as sw
from sgdlab.experiments.verdict import SUPPORTED


@pytest.mark.parametrize("name", studies.names())
@pytest.mark.parametrize("quick", [True, False])
def test_every_study_config_validates(name, quick):
    s = studies.STUDIES[name]
    _, trials = sw.plan(s.base(quick), s.points(quick), s.seeds[0] if quick else s.seeds[1])
    labels = {t.label for t in trials}
    for c in s.claims(quick):
        assert c.treatment in labels and c.baseline in labels
    assert s.seeds[1] > s.seeds[0] >= 3  # the verdict rule needs at least 3 seeds per group


def test_a_study_end_to_end_computes_its_verdict(tmp_path, monkeypatch):
    tiny = studies.Study(
        "tiny", "a reasonable learning rate beats a tiny one", "test",
        lambda q: {"duration": "60 steps", "data": {"name": "mnist1d"}, "model": {"name": "mlp", "hidden": [16]},
                   "sampler": {"name": "epoch", "batch_size": 50}, "optim": {"lr": 0.1, "momentum": 0.9},
                   "eval": {"every": 20}, "checkpoint": {"every": 0}, "log": {"every": 10}},
        lambda q: [sw.Point({"optim.lr": 1e-5}, "tiny lr"), sw.Point({}, "lr 0.1")],
        (3, 3),
        lambda q: [studies.Claim("lr 0.1 lowers the test error", "test_error", "lr 0.1", "tiny lr", -1),
                   studies.Claim("lr 0.1 raises the test error", "test_error", "lr 0.1", "tiny lr", +1)],
        baseline="tiny lr")
    monkeypatch.setitem(studies.STUDIES, "tiny", tiny)
    res = studies.run_study("tiny", quick=True, out=tmp_path / "t", progress=False)
    assert [v.verdict for v in res["verdicts"]] == ["supported", "contradicted"]
    v = res["verdicts"][0]
    assert v.ci_high < 0 and v.n == 3
    saved = json.loads((tmp_path / "t" / "verdicts.json").read_text())
    assert saved["verdicts"][0]["verdict"] == "supported"
    md = (tmp_path / "t" / "report.md").read_text()
    assert "Claim and verdicts" in md and "supported" in md
    all_res = studies.run_all(quick=True, out=tmp_path / "all", only=["tiny"], progress=False)
    assert (tmp_path / "all" / "summary-quick.html").is_file()
    assert [v.verdict for v in all_res["verdicts"]] == ["supported", "contradicted"]
    with pytest.raises(ConfigError, match="unknown study"):
        studies.run_study("nope")


def test_optimal_batch_verdict_on_constructed_results(tmp_path):
    lrs, bs, ns = studies._ob_grid(True)
    rng = np.random.default_rng(0)
    trials = []
    for n in ns:
        for lr in lrs:
            best = bs[min(len(bs) - 1, lrs.index(lr) + ns.index(n))]  # B* grows with lr and with N
            for b in bs:
                for seed in range(4):
                    acc = 0.8 - 0.1 * abs(np.log2(b) - np.log2(best)) + rng.normal(0, 0.003)
                    trials.append({"label": studies._ob_label(lr, b, n), "seed": seed, "status": "completed",
                                   "summary": {"final": {"test_acc": acc}}, "rows": [], "overrides": {}})
    verdicts, sections = studies._ob_extra(studies.STUDIES["optimal_batch"], tmp_path, trials, True)
    assert [v.verdict for v in verdicts] == [SUPPORTED, SUPPORTED]
    assert verdicts[0].estimate == pytest.approx(2.0)  # log2(64/16)
    assert (tmp_path / "accuracy_vs_batch.png").is_file() and sections


def test_cli_study_rejects_unknown_names(capsys):
    from sgdlab.cli import main

    assert main(["study", "nope", "--quick"]) == 2
    assert "unknown study" in capsys.readouterr().err
