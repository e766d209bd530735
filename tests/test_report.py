import html.parser
import shutil
import subprocess
from pathlib import Path

import pytest

from sgdlab.errors import ConfigError
from sgdlab.experiments import sweep as sw
from sgdlab.experiments.report import write_report

TINY = {
    "duration": "60 steps", "data": {"name": "mnist1d"}, "model": {"name": "mlp", "hidden": [16]},
    "sampler": {"name": "epoch", "batch_size": 50}, "optim": {"lr": 0.05, "momentum": 0.9},
    "eval": {"every": 20, "train": True}, "checkpoint": {"every": 0}, "log": {"every": 10},
}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep") / "s"
    sw.run_sweep(TINY, sw.grid_points({"optim.lr": [0.1, 0.001]}), 3, d, jobs=1, progress=False)
    return d


class _Imgs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self.tables += tag == "table"


def test_report_has_figures_tables_and_baseline_differences(sweep_dir):
    paths = write_report(sweep_dir, baseline="optim.lr=0.1")
    md = Path(paths["markdown"]).read_text()
    assert "| optim.lr=0.001 |" in md and "Difference from the baseline 'optim.lr=0.1'" in md
    assert "test error" in md and "95% CI" in md
    p = _Imgs()
    p.feed(Path(paths["html"]).read_text())
    assert len(p.imgs) >= 4 and p.tables >= 3
    for src in p.imgs:
        assert not src.startswith("/") and (sweep_dir / src).is_file() and (sweep_dir / src).stat().st_size > 1000
    assert "curve_train_eval_loss_vs_time.png" in p.imgs and "curve_test_error_vs_epoch.png" in p.imgs
    for line in md.splitlines():
        if line.startswith("![") and "](" in line:
            assert (sweep_dir / line.split("](")[1].rstrip(")")).is_file()


def test_report_rejects_unknown_baseline(sweep_dir):
    with pytest.raises(ConfigError, match="no group"):
        write_report(sweep_dir, baseline="optim.lr=0.5")
    with pytest.raises(ConfigError, match="sweep.json"):
        write_report(sweep_dir / "nowhere")


def test_report_opens_in_headless_chromium(sweep_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium installed; the html.parser test above checks the images instead")
    paths = write_report(sweep_dir)
    probe = sweep_dir / "probe.html"
    probe.write_text(Path(paths["html"]).read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => { document.body.setAttribute('data-imgs', "
                   "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0).join(',')); });"
                   "</script></body>"))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], check=False, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert "<table>" in dom and "Learning curves" in dom
    flags = dom.split('data-imgs="')[1].split('"')[0].split(",")
    assert len(flags) >= 4 and all(f == "true" for f in flags), flags


def test_cli_report(sweep_dir, tmp_path, capsys):
    from sgdlab.cli import main

    assert main(["report", str(sweep_dir), "--baseline", "label=optim.lr=0.1", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file()
    assert main(["report", str(tmp_path / "empty")]) == 2


def _cut(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _one_line_error(capsys, f) -> str:
    err = capsys.readouterr().err
    assert err.startswith("sgdlab: error: ") and err.count("\n") == 1, err
    assert str(f) in err and "Traceback" not in err
    return err


@pytest.fixture
def run_copy(sweep_dir, tmp_path):
    """One trial of the sweep, copied: a single run folder (config.yaml, summary.json, metrics.jsonl)."""
    src = sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").is_file())[0]
    return Path(shutil.copytree(src, tmp_path / "run"))


@pytest.mark.parametrize("name,damage", [
    ("config.yaml", lambda b: b"seed: [\n"),
    ("config.yaml", lambda b: b"- a\n"),
    ("config.yaml", lambda b: b"\xff\xfe"),
    ("summary.json", _cut),
    ("summary.json", lambda b: b"[1,2]"),
    ("metrics.jsonl", lambda b: b + b"garbage\n"),
    ("metrics.jsonl", lambda b: b"garbage\n" + b),
], ids=["yaml-syntax", "yaml-list", "yaml-bytes", "summary-cut", "summary-list", "metrics-tail", "metrics-head"])
def test_report_on_a_damaged_run_is_one_line_naming_the_file(run_copy, name, damage, capsys):
    from sgdlab.cli import main

    f = run_copy / name
    f.write_bytes(damage(f.read_bytes()))
    assert main(["report", str(run_copy)]) == 2
    _one_line_error(capsys, f)


@pytest.mark.parametrize("where,damage", [
    ("sweep.json", _cut),
    ("sweep.json", lambda b: b"[]"),
    ("sweep.json", lambda b: b'{"trials": [1]}'),
    ("TRIAL/summary.json", _cut),
    ("TRIAL/metrics.jsonl", lambda b: b + b"garbage\n"),
], ids=["manifest-cut", "manifest-list", "manifest-trial", "summary-cut", "metrics-garbage"])
def test_report_on_a_damaged_sweep_is_one_line_naming_the_file(sweep_dir, tmp_path, where, damage, capsys):
    from sgdlab.cli import main

    d = Path(shutil.copytree(sweep_dir, tmp_path / "s"))
    trial = sorted(p.name for p in d.iterdir() if (p / "summary.json").is_file())[0]
    f = d / where.replace("TRIAL", trial)
    f.write_bytes(damage(f.read_bytes()))
    assert main(["report", str(d), "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, f)


def test_a_torn_last_metrics_line_is_dropped_in_a_run_and_in_a_sweep(sweep_dir, run_copy, tmp_path):
    """A run killed while writing its last row leaves it without a newline; resume drops it, so do reports."""
    from sgdlab.experiments import aggregate as agg
    from sgdlab.experiments.report import run_trial

    n = len(run_trial(run_copy)["rows"])
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "train_lo')
    assert len(run_trial(run_copy)["rows"]) == n
    d = Path(shutil.copytree(sweep_dir, tmp_path / "s"))
    before = {t["name"]: len(t["rows"]) for t in agg.load_trials(d)}
    with open(d / next(iter(before)) / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "train_lo')
    assert {t["name"]: len(t["rows"]) for t in agg.load_trials(d)} == before


def test_a_single_point_series_is_drawn_with_a_marker(tmp_path, monkeypatch):
    """A one-epoch run logs its test accuracy once: a line through one point would leave the panel blank."""
    import matplotlib.pyplot as plt

    from sgdlab.experiments.report import curves_figure

    closed = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (closed.append(fig), real_close(fig)))
    rows = [{"step": 10, "epoch": 0.5, "train_loss": 1.0}, {"step": 20, "epoch": 1.0, "train_loss": 0.8, "test_acc": 0.9}]
    trials = [{"status": "completed", "label": "one epoch", "config": {}, "rows": rows}]
    assert curves_figure(trials, "test_error", "epoch", tmp_path / "err.png")
    assert curves_figure(trials, "train_loss", "epoch", tmp_path / "loss.png")
    (single,), (two,) = (fig.axes[0].lines for fig in closed)
    assert list(single.get_xdata()) == [1.0] and single.get_marker() == "o"
    assert single.get_ydata()[0] == pytest.approx(0.1)
    assert len(two.get_xdata()) == 2 and two.get_marker() in ("None", None, "")
