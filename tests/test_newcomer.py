"""The way in: one CLI grammar, one default experiment, resolved configs, threads, reports, data footguns."""

import json

import matplotlib
import numpy as np
import pytest
import torch
import yaml

matplotlib.use("Agg")

from sgdlab import __version__, data
from sgdlab.cli import main
from sgdlab.errors import ConfigError, DataError
from sgdlab.train import engine
from sgdlab.train.config import Config, config_to_dict, dry_build, load_config

TINY = ["duration=6 steps", "eval.every=0", "checkpoint.every=0", "log.every=3", "model.name=mlp"]


def _yaml(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg) if cfg is not None else "")
    return str(p)


def _resolved(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())


# -- one default -------------------------------------------------------------------------------------


def test_empty_config_and_no_config_are_the_same_experiment(tmp_path, capsys):
    empty = _yaml(tmp_path, None, "empty.yaml")
    assert main(["run", *TINY, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["run", empty, *TINY, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert _resolved(tmp_path / "a") == _resolved(tmp_path / "b")
    assert config_to_dict(load_config(None)) == config_to_dict(load_config({})) == config_to_dict(load_config(empty))
    d = config_to_dict(Config())
    # the default experiment: SGD with momentum on cnn1d / MNIST-1D for 2000 steps
    assert (d["duration"], d["model"]["name"], d["optim"]["lr"], d["optim"]["momentum"]) == ("2000 steps", "cnn1d",
                                                                                            0.05, 0.9)


def test_resolved_config_lists_builder_defaults(tmp_path):
    cfg = config_to_dict(load_config({"sampler": {"name": "srs"}, "loss": {"random_gradient": {"p": 0.5}}}))
    assert cfg["data"]["num_samples"] == 5000 and cfg["data"]["seed"] == 42           # mnist1d builder
    assert cfg["model"] == {"name": "cnn1d", "channels": 25}                           # cnn1d builder
    # input-shape parameters are not pinned: the engine takes them from the data, so another dataset fits
    assert "in_features" not in config_to_dict(load_config({"data": {"name": "mnist5k"}, "model": {"name": "mlp"}}))["model"]
    assert cfg["sampler"] == {"name": "srs", "batch_size": 100, "order": "random"}     # via the SRS class
    assert cfg["loss"]["random_gradient"]["high"] == 1.0 and cfg["loss"]["random_gradient"]["p"] == 0.5
    assert config_to_dict(load_config({}))["sampler"]["drop_last"] is True
    # resolving is idempotent: the written config loads back to itself
    assert config_to_dict(load_config(cfg)) == cfg
    # and an option the builder does not take is still rejected by name
    with pytest.raises(ConfigError, match="unknown key 'sampler.ordr'"):
        load_config({"sampler": {"name": "srs", "ordr": "random"}})


def test_mapping_override_merges_into_its_section():
    base = {"sampler": {"name": "epoch", "batch_size": 50}, "optim": {"lr": 0.3}}
    cfg = load_config(base, ["sampler={name: srs}", "optim={momentum: 0.5}"])
    assert (cfg.sampler.name, cfg.sampler.batch_size) == ("srs", 50)
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.3, 0.5)
    assert load_config(base, ["sampler.batch_size=7"]).sampler.batch_size == 7


# -- messages ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (["optim.betas=[0.9]"], "invalid value for 'optim.betas': expected a list of 2 values, got [0.9]"),
    (["optim.betas=[0.9, 0.9, 0.9]"], "invalid value for 'optim.betas': expected a list of 2 values, got [0.9, 0.9, 0.9]"),
    (["duration=5 fortnights"], "invalid value for 'duration': expected "
                                "'<number> steps|epochs|effective epochs|s|min|fwd', got '5 fortnights'"),
    (["threads=0"], "invalid value for 'threads': threads must be 'auto' or a whole number >= 1, got 0"),
])
def test_messages_have_no_pydantic_prefix_and_print_the_value_once(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config({}, overrides)
    assert str(e.value) == message


def test_directory_as_config_says_so(tmp_path, capsys):
    _yaml(tmp_path, {}, "inside.yaml")
    assert main(["run", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert f"{tmp_path} is a directory, not a config file (it holds inside.yaml)" in capsys.readouterr().err


def test_missing_cifar_folder_names_the_settings(monkeypatch):
    for var in ("SGDLAB_CIFAR10", "SGDLAB_DATA"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DataError, match=r"cifar10: no folder given \(data.root, \$SGDLAB_CIFAR10 and \$SGDLAB_DATA "
                                        r"are all unset\)"):
        data.create("cifar10")


# -- CLI grammar -------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sgdlab {__version__}"


def test_run_overrides_before_and_after_options(tmp_path):
    cfg = _yaml(tmp_path, {"optim": {"lr": 0.3}})
    assert main(["run", cfg, "optim.lr=0.2", "--out", str(tmp_path / "r"), *TINY, "--quiet"]) == 0
    got = _resolved(tmp_path / "r")
    assert got["optim"]["lr"] == 0.2 and got["duration"] == "6 steps" and got["model"]["name"] == "mlp"
    assert main(["run", "--quiet", "--out", str(tmp_path / "s"), cfg, *TINY]) == 0
    assert _resolved(tmp_path / "s")["optim"]["lr"] == 0.3


def test_unknown_option_is_still_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--outt", str(tmp_path)])
    assert e.value.code == 2 and "unrecognized arguments: --outt" in capsys.readouterr().err


def test_check_takes_positional_overrides(tmp_path, capsys):
    cfg = _yaml(tmp_path, {"model": {"name": "mlp"}})
    assert main(["check", cfg, "optim.lr=-1"]) == 2
    out = capsys.readouterr().out
    assert "FAILED" in out and "'optim.lr'" in out and "config file not found" not in out
    assert main(["check", cfg, "--threads", "1", "optim.lr=0.5"]) == 0
    assert ": ok" in capsys.readouterr().out


def test_sweep_validates_option_values_up_front(tmp_path, capsys):
    cfg = _yaml(tmp_path, {"model": {"name": "mlp"}})
    out = tmp_path / "sw"
    code = main(["sweep", cfg, "--grid", "sampler.order=random,randm", "sampler.name=srs", "--out", str(out),
                 "--jobs", "1", "--quiet", *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "sampler (srs, options {'order': 'randm'}): order must be one of 'random', 'identity', got 'randm'" in err
    assert not out.exists() or not any(out.glob("*/config.yaml"))
    with pytest.raises(ConfigError, match="depth must be 6n"):
        dry_build(load_config({"model": {"name": "wrn", "depth": 27}}))


# -- threads -----------------------------------------------------------------------------------------


def test_auto_threads_rule():
    assert engine.auto_threads(5_210, cores=16) == 1
    assert engine.auto_threads(engine.AUTO_THREADS_MIN_PARAMS - 1, cores=16) == 1
    assert engine.auto_threads(engine.AUTO_THREADS_MIN_PARAMS, cores=4) == 4
    assert engine.auto_threads(10**8, cores=64) == engine.AUTO_THREADS_MAX


def test_threads_key_flag_and_record(tmp_path):
    before = torch.get_num_threads()
    assert main(["run", *TINY, "--threads", "2", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["threads"] == 2
    assert _resolved(tmp_path / "a")["threads"] == 2
    assert torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["threads"] == 2
    assert torch.get_num_threads() == before                       # restored after the run
    assert main(["run", *TINY, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["threads"] == 1   # auto, small model
    assert _resolved(tmp_path / "b")["threads"] == "auto"


# -- reports -----------------------------------------------------------------------------------------


def test_report_of_a_single_run_and_metric_names(tmp_path, capsys):
    run = tmp_path / "my-run"
    assert main(["run", *TINY, "eval.every=3", "name=tiny mlp", "--out", str(run), "--quiet"]) == 0
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert md.startswith("# Run report: tiny mlp") and "Held fixed" in md and "| model.name | mlp |" in md
    assert (run / "curve_test_error_vs_epoch.png").is_file()
    capsys.readouterr()
    assert main(["report", str(run), "--metrics", "test_error,tset_loss"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'tset_loss'; valid: test_error, test_acc, test_loss" in err
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a sweep directory" in capsys.readouterr().err


def test_epoch_axis_says_effective_epochs_for_srs():
    from sgdlab.experiments.report import epoch_label

    t = lambda name: {"config": {"sampler": {"name": name}}}
    assert epoch_label([t("epoch")]) == "epochs"
    assert epoch_label([t("srs"), t("replacement")]).startswith("effective epochs")
    assert epoch_label([t("epoch"), t("srs")]) == "epochs (effective epochs for srs)"


def test_held_fixed_lists_only_shared_settings():
    from sgdlab.experiments.report import held_fixed

    a = {"config": {"seed": 0, "optim": {"lr": 0.1, "momentum": 0.9}, "log": {"every": 5}}}
    b = {"config": {"seed": 1, "optim": {"lr": 0.2, "momentum": 0.9}, "log": {"every": 5}}}
    assert held_fixed([a, b]) == [("optim.momentum", 0.9)]


def test_log_axis_ticks_are_plain_numbers():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sgdlab.experiments.report import _log_axis

    fig = Figure()
    ax = fig.subplots()
    ys = [0.25, 0.4, 0.6]
    ax.plot([0, 1, 2], ys)
    _log_axis(ax, ys)
    FigureCanvasAgg(fig).draw()
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) + ax.get_yticklabels()]
    shown = [x for x in labels if x]
    assert shown and all("$" not in x and "10^" not in x for x in shown)
    assert {"0.3", "0.5"} <= set(shown)


def test_spectral_density_plot_leaves_out_the_floor():
    from types import SimpleNamespace

    from sgdlab.analysis import plot_spectral_density

    grid = np.linspace(-1, 1, 101)
    dens = np.exp(-grid**2 / 0.001)
    fig = plot_spectral_density(SimpleNamespace(grid=grid, density=dens, sigma=0.02))
    y = fig.axes[0].lines[0].get_ydata()
    kept = y[np.isfinite(y)]
    assert kept.min() >= 1e-6 * dens.max() and np.isnan(y).sum() == (dens < 1e-6 * dens.max()).sum() > 0


# -- data ----------------------------------------------------------------------------------------------


def test_dataset_repr_is_one_short_line():
    ds = data.create("synthetic", num_samples=64, num_test=16, shape=(3, 8, 8)).normalized()
    assert repr(ds) == "Dataset('synthetic', train 64, test 16, shape (3, 8, 8), 10 classes, normalized)"
    assert "Dataset('synthetic', train 64, test 16, shape (3, 8, 8), 10 classes)" == repr(
        data.create("synthetic", num_samples=64, num_test=16, shape=(3, 8, 8)))


def test_cifar_augment_rejects_channels_last():
    with pytest.raises(ValueError, match=r"looks channels-last \(N, H, W, C\): pass x.permute\(0, 3, 1, 2\)"):
        data.cifar_augment(torch.zeros(2, 32, 32, 3))
    x = torch.rand(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert data.cifar_augment(x, generator=g).shape == x.shape
    assert data.cifar_augment(torch.rand(2, 8, 4, 4), generator=g).shape == (2, 8, 4, 4)   # many channels, tiny
