import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _analysis_models import Quadratic, mean_output, quad_data, sym_with_eigs, trained_mlp

from sgdlab.analysis import evaluate, interpolate, plot_interpolation


def test_quadratic_along_both_paths():
    H = sym_with_eigs([3.0, 1.0, 0.2])
    wa = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    wb = torch.tensor([0.5, 2.0, 0.3], dtype=torch.float64)
    a, b = Quadratic(H, wa), Quadratic(H, wb)
    alphas = np.linspace(-1, 2, 25)
    lin = interpolate(a, b, mean_output, quad_data(), alphas=alphas)
    sc = interpolate(a, b, mean_output, quad_data(), alphas=alphas, curve="sincos")
    for r_lin, r_sc, al in zip(lin, sc, alphas):
        w = al * wb + (1 - al) * wa  # papers/004: f(a x_l + (1-a) x_s)
        assert r_lin["alpha"] == pytest.approx(al)
        assert r_lin["loss"] == pytest.approx(float(0.5 * w @ H @ w), rel=1e-12)
        w = math.sin(al * math.pi / 2) * wb + math.cos(al * math.pi / 2) * wa
        assert r_sc["loss"] == pytest.approx(float(0.5 * w @ H @ w), rel=1e-12)
        assert r_lin["accuracy"] is None
    assert torch.equal(a.w.detach(), wa) and torch.equal(b.w.detach(), wb)


def test_one_shot_iterable_of_batches():
    H = sym_with_eigs([3.0, 1.0, 0.2])
    a = Quadratic(H, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    b = Quadratic(H, torch.tensor([0.5, 2.0, 0.3], dtype=torch.float64))
    x, y = quad_data(6)
    as_list = interpolate(a, b, mean_output, [(x[:2], y[:2]), (x[2:], y[2:])], alphas=[0.0, 0.5, 1.0])
    gen = ((x[i:i + 2], y[i:i + 2]) for i in (0, 2, 4))  # a generator can be read only once
    assert interpolate(a, b, mean_output, gen, alphas=[0.0, 0.5, 1.0]) == as_list


def test_batchnorm_buffers_interpolated():
    a, b = nn.BatchNorm1d(1), nn.BatchNorm1d(1)
    a.running_mean.fill_(0.0), a.running_var.fill_(1.0)
    b.running_mean.fill_(2.0), b.running_var.fill_(4.0)
    a.num_batches_tracked.fill_(7), b.num_batches_tracked.fill_(9)
    b.weight.data.fill_(3.0)
    a.train()
    x = torch.zeros(5, 1)
    res = interpolate(a, b, mean_output, (x, torch.zeros(5)), alphas=[0.0, 0.5, 1.0, -1.0])
    # eval-mode BN on x = 0: gamma * (0 - mean) / sqrt(var + eps) + beta
    for r in res:
        al = r["alpha"]
        mean, var, gamma = 2.0 * al, max(1.0 + 3.0 * al, 0.0), 1.0 + 2.0 * al
        assert r["loss"] == pytest.approx(gamma * (-mean) / math.sqrt(var + a.eps), rel=1e-5)
    assert a.training and int(a.num_batches_tracked) == 7 and float(a.running_mean) == 0.0


def test_network_endpoints_and_plot(tmp_path):
    model_a, (x, y) = trained_mlp(steps=200, seed=0)
    model_b, _ = trained_mlp(steps=30, seed=1)
    train = interpolate(model_a, model_b, F.cross_entropy, (x, y), alphas=[0.0, 0.5, 1.0])
    test = interpolate(
        model_a, model_b, F.cross_entropy, [(x[:77], y[:77]), (x[77:], y[77:])], alphas=[0.0, 0.5, 1.0]
    )
    for ra, rb in zip(train, test):  # batchings weighted by size give the same numbers
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6) and ra["accuracy"] == rb["accuracy"]
    ea, eb = evaluate(model_a, F.cross_entropy, (x, y)), evaluate(model_b, F.cross_entropy, (x, y))
    assert train[0]["loss"] == pytest.approx(ea["loss"], rel=1e-6) and train[0]["accuracy"] == ea["accuracy"]
    assert train[-1]["loss"] == pytest.approx(eb["loss"], rel=1e-6)
    default = interpolate(model_a, model_b, F.cross_entropy, (x, y))
    assert len(default) == 25 and default[0]["alpha"] == -1.0 and default[-1]["alpha"] == 2.0
    plot_interpolation(default, default, path=tmp_path / "interp.png")
    assert (tmp_path / "interp.png").stat().st_size > 1000


def test_bad_inputs():
    model, data = trained_mlp(steps=1)
    with pytest.raises(ValueError, match="curve must be 'linear' or 'sincos'"):
        interpolate(model, model, F.cross_entropy, data, alphas=[0.0], curve="cubic")
    with pytest.warns(DeprecationWarning, match="use curve="):  # the old name of curve= still works
        old = interpolate(model, model, F.cross_entropy, data, alphas=[0.0, 0.5], path="sincos")
    assert old == interpolate(model, model, F.cross_entropy, data, alphas=[0.0, 0.5], curve="sincos")
    with pytest.raises(ValueError, match="empty"):
        interpolate(model, model, F.cross_entropy, [], alphas=[0.0])
    with pytest.raises(ValueError, match="same architecture"):
        interpolate(model, nn.Linear(6, 3), F.cross_entropy, data, alphas=[0.0])
    with pytest.raises(ValueError, match="no parameters"):
        interpolate(nn.ReLU(), nn.ReLU(), F.cross_entropy, data, alphas=[0.0])
