"""The documentation site: ``mkdocs build --strict`` passes, every public module has an API page generated
from its docstrings, every method has a card, and the built pages render with content in a browser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CARD_PARTS = ("**Paper.**", "**What it changes.**", "**Cost.**", "**Use it.**", "**Our verdict")


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for v in item.values():
                out.extend(_nav_pages(v) if isinstance(v, list) else [v])
    return out


def _config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use tags such as !!python/name:...; this test only reads the nav
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the site needs the docs extra: pip install 'sgdlab[docs]'")
    pytest.importorskip("mkdocstrings", reason="the site needs the docs extra: pip install 'sgdlab[docs]'")
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_the_site_builds_strict_and_renders_the_api_from_docstrings(site):
    from sgdlab.sampling import SequencedReplacementSampler

    page = (site / "api" / "sampling" / "index.html").read_text()
    assert "SequencedReplacementSampler" in page
    first = SequencedReplacementSampler.__doc__.strip().split("\n")[0].split("``")[0][:40]
    assert first and first in page  # the class's own docstring, not only its name
    for card in ("srs", "importance", "shake-shake"):
        html = (site / "methods" / card / "index.html").read_text()
        assert "Our verdict" in html and "Paper." in html


def test_every_public_module_has_an_api_page_and_every_page_is_in_the_nav():
    nav = _nav_pages(_config()["nav"])
    api_pages = sorted(p for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = {}
    for p in api_pages:
        assert f"api/{p.name}" in nav, f"{p.name} is not in mkdocs.yml's nav"
        for line in p.read_text().splitlines():
            if line.startswith("::: "):
                documented[line[4:].strip()] = p.name
    public = ["sgdlab.sampling", "sgdlab.regularize", "sgdlab.analysis", "sgdlab.data", "sgdlab.models",
              "sgdlab.schedules", "sgdlab.train", "sgdlab.errors", "sgdlab.train.build", "sgdlab.train.config",
              "sgdlab.train.state", "sgdlab.train.metrics", "sgdlab.train.distributed", "sgdlab.train.guard", "sgdlab.integrations.lightning",
              "sgdlab.integrations.accelerate", "sgdlab.integrations.transformers", "sgdlab.integrations.monitors_hf",
              "sgdlab.monitors", "sgdlab.keyed", "sgdlab.files", "sgdlab.seeding", "sgdlab.train.budget",
              "sgdlab.train.monitoring"]
    public += [f"sgdlab.experiments.{m}" for m in ("sweep", "report", "studies", "protocol", "stats", "ledger",
                                                    "aggregate", "analyze", "verdicts", "trials")]
    missing = [m for m in public if m not in documented]
    assert not missing, f"no API page for {missing}"
    packages = {p.parent.name for p in (ROOT / "src" / "sgdlab").glob("*/__init__.py")}
    assert packages <= {m.split(".")[1] for m in documented} | {"experiments", "integrations"}


def test_every_method_has_a_card_with_paper_change_cost_and_verdict():
    nav = _nav_pages(_config()["nav"])
    cards = sorted((ROOT / "docs" / "methods").glob("*.md"))
    assert len(cards) >= 8
    for card in cards:
        assert f"methods/{card.name}" in nav, f"{card.name} is not in mkdocs.yml's nav"
        if card.name == "index.md":
            continue
        text = card.read_text()
        positions = [text.find(part) for part in CARD_PARTS]
        assert -1 not in positions and positions == sorted(positions), f"{card.name}: {positions}"
    index = (ROOT / "docs" / "methods" / "index.md").read_text()
    assert all(f"]({c.name})" in index for c in cards if c.name != "index.md")


def test_the_built_site_renders_in_headless_chromium(site, tmp_path):
    browser = next((b for b in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                                shutil.which("google-chrome")) if b and Path(b).exists()), None)
    if browser is None:
        pytest.skip("no headless Chromium installed (CI installs it); the build test above checks the HTML")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-sync", "--disable-component-update", "--allow-file-access-from-files",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom"]

    def text_of(page: Path) -> str:
        r = subprocess.run([browser, *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    api = text_of(site / "api" / "sampling" / "index.html")
    assert "SequencedReplacementSampler" in api and "next_batch" in api
    card = text_of(site / "methods" / "srs" / "index.html")
    assert "Our verdict" in card and "no effect of the claimed size" in card and "Sequenced-replacement" in card
