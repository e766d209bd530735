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
