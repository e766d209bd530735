"""A release people can adopt: suggestions for keys other libraries name differently, quick-mode regimes,
the package's version and changelog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgdlab.cli import main
from sgdlab.experiments.protocol import load_protocol
from sgdlab.train import ConfigError, load_config


@pytest.mark.parametrize("override, hint", [
    ("optim.learning_rate=0.1", "unknown key 'optim.learning_rate' (did you mean 'optim.lr'?)"),
    ("sampler.batchsize=32", "unknown key 'sampler.batchsize' (did you mean 'sampler.batch_size'?)"),
    ("optim.wd=0.1", "unknown key 'optim.wd' (did you mean 'optim.weight_decay'?)"),
])
def test_keys_named_as_other_libraries_name_them_get_our_name(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config({}, [override])
    assert str(e.value) == hint


@pytest.mark.parametrize("override", ["data.name=digits", "model.name=resnet9000", "sampler.name=mine"])
def test_an_unknown_dataset_model_or_sampler_points_to_import(override):
    with pytest.raises(ConfigError, match=r"unknown .*--import MODULE or 'imports: \[MODULE\]' \(docs/custom.md\)"):
        load_config({}, [override])


def test_quick_mode_states_the_regime_that_ran():
    proto = load_protocol("srs")[0]
    assert proto.regime_that_ran() == " ".join(proto.regime.split()).rstrip(".")
    quick = proto.regime_that_ran(quick=True)
    assert quick.startswith("quick mode (duration=2 epochs; eval.every=0; seeds 100, 101; arms epoch late, "
                            "srs late), a pilot of the protocol's regime: mnist5k")
    assert "50 epochs" in quick  # the full regime is named as what the pilot shortens, not as what ran


def test_a_quick_study_says_so_in_every_verdict(tmp_path, monkeypatch):
    from test_studies import TINY

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert main(["study", str(tmp_path / "tiny.yaml"), "--quick", "--out", str(tmp_path / "q"), "--jobs", "1",
                 "--quiet"]) == 0
    verdicts = json.loads((tmp_path / "q" / "verdicts.json").read_text())["verdicts"]
    assert verdicts and all(v["text"].startswith("In regime quick mode (duration=15 steps; seeds 10, 11), a pilot "
                                                 "of the protocol's regime: MNIST-1D, mlp 16 hidden, 30 steps: ")
                            for v in verdicts)


ROOT = Path(__file__).resolve().parents[1]


def _changelog_latest() -> str:
    import re

    for line in (ROOT / "CHANGELOG.md").read_text().splitlines():
        m = re.match(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", line)
        if m:
            return m.group(1)
    raise AssertionError("CHANGELOG.md has no released entry '## [X.Y.Z] - YYYY-MM-DD'")


def test_version_is_written_once_and_matches_the_changelog(capsys):
    import tomllib

    import sgdlab

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sgdlab.__version__"}
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"sgdlab {sgdlab.__version__}" == f"sgdlab {_changelog_latest()}"
    assert (ROOT / "src" / "sgdlab" / "py.typed").is_file()
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["sgdlab"]


@pytest.mark.slow
def test_the_wheel_installs_outside_the_source_tree_and_runs_a_study(tmp_path):
    """Build the wheel, install it into a fresh venv in a temporary folder and run ``sgdlab --version``,
    ``sgdlab study srs --quick`` and ``sgdlab ledger`` there. The venv borrows the test interpreter's
    installed dependencies (torch and the rest: nothing is downloaded) through a path entry, which does not
    run that interpreter's own .pth files, so the only sgdlab it can import is the wheel's."""
    import os
    import subprocess
    import sys
    import sysconfig
    import zipfile

    # the test's own PYTHONPATH (a source tree) must not leak into the build, the install or the runs
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(ROOT)], check=True, timeout=600, env=env)
    (wheel,) = dist.glob("sgdlab-*.whl")
    assert wheel.name.startswith(f"sgdlab-{_changelog_latest()}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sgdlab/py.typed" in names and any(n.endswith("share/sgdlab/studies/srs.yaml") for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    bin_dir = venv / "bin"
    py = bin_dir / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (Path(site) / "_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, timeout=600, env=env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")

    def sgdlab(*args, timeout=1200):
        r = subprocess.run([bin_dir / "sgdlab", *args], cwd=work, env=env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"sgdlab {' '.join(args)}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    r = subprocess.run([py, "-c", "import sgdlab; print(sgdlab.__file__)"], cwd=work, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.startswith(str(venv)), r.stdout + r.stderr[-3000:]  # the wheel's copy
    assert sgdlab("--version").strip() == f"sgdlab {_changelog_latest()}"
    out = sgdlab("study", "srs", "--quick", "--jobs", "1", "--quiet")
    assert "srs" in out and (work / "runs" / "studies" / "srs-quick" / "verdicts.json").is_file()
    # the ledger of the quick study's results (a fresh install has no ./results of its own)
    assert "srs" in sgdlab("ledger", "--results", str(work / "runs" / "studies"))
