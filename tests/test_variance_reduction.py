"""Section 4.1 ablation of the importance-sampling paper: variance reduction of each resampling scheme."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdlab.analysis import variance_reduction


def _problem(n=200, d=6, k=4, seed=0, unit=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if unit:
        x = x / x.norm(dim=1, keepdim=True)
    y = torch.randint(k, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(d, k, bias=False)
    with torch.no_grad():
        model.weight.mul_(4)
    return model, x, y


def test_upper_bound_is_exact_for_a_linear_model_on_unit_inputs():
    # per-example gradient of a bias-free linear layer: (softmax(z) - y) x^T, norm ||softmax(z) - y|| ||x||
    model, x, y = _problem(unit=True)
    out = variance_reduction(model, (x, y), presample=64, batch=16, repeats=3)
    assert out["correlation"]["upper_bound"]["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert out["correlation"]["upper_bound"]["spearman"] == pytest.approx(1.0, abs=1e-3)  # float32 near-ties
    assert out["correlation"]["gradnorm"]["pearson"] == pytest.approx(1.0)
    s = out["schemes"]
    assert s["upper_bound"]["expected_sq_distance"] == pytest.approx(s["gradnorm"]["expected_sq_distance"], rel=1e-6)


def test_gradnorm_is_optimal_and_uniform_matches_closed_form():
    model, x, y = _problem(seed=1)
    out = variance_reduction(model, [(x[:100], y[:100]), (x[100:], y[100:])], presample=50, batch=10,
                             repeats=2, chunk_size=16, seed=3)
    s = out["schemes"]
    for name in ("uniform", "loss", "upper_bound"):
        assert s["gradnorm"]["expected_sq_distance"] <= s[name]["expected_sq_distance"] * (1 + 1e-9)
        assert s[name]["tau"] >= 1.0
    assert s["uniform"]["tau"] == pytest.approx(1.0)
    # uniform: E||est - G||^2 = (mean ||g_i||^2 - ||G||^2) / b on the same presamples (same seed)
    gen = torch.Generator().manual_seed(3)
    vals = []
    for _ in range(2):
        pre = torch.randint(200, (50,), generator=gen)
        grads = []
        for i in pre:
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            grads.append(model.weight.grad.reshape(-1).double().clone())
        gr = torch.stack(grads)
        vals.append(float((gr.pow(2).sum(1).mean() - gr.mean(0).pow(2).sum()) / 10))
        # consume the generator as the function does (one draw of 10 slots per scheme)
        for _ in range(4):
            torch.multinomial(torch.ones(50), 10, replacement=True, generator=gen)
    assert s["uniform"]["expected_sq_distance"] == pytest.approx(sum(vals) / 2, rel=1e-6)


def test_empirical_distance_agrees_with_expected():
    model, x, y = _problem(seed=2)
    out = variance_reduction(model, (x, y), presample=40, batch=8, repeats=200, schemes=("uniform", "upper_bound"))
    for s in out["schemes"].values():
        # E[d] <= sqrt(E[d^2]) (Jensen), and for these distributions not far below it
        assert s["distance"] <= s["expected_sq_distance"] ** 0.5 + 3 * s["distance_se"]
        assert s["distance"] >= 0.5 * s["expected_sq_distance"] ** 0.5
    assert "gradnorm" not in out["schemes"] and "upper_bound" in out["correlation"]


def test_mode_restored_and_validation():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    _, x, y = _problem()
    model.train()
    variance_reduction(model, (x, y), presample=20, batch=5, repeats=1)
    assert model.training and model[1].training
    with pytest.raises(ValueError, match="schemes"):
        variance_reduction(model, (x, y), schemes=("random",))
    with pytest.raises(ValueError, match="presample"):
        variance_reduction(model, (x, y), presample=0)
    with pytest.raises(ValueError, match="loss"):
        variance_reduction(model, (x, y), loss="hinge")


def test_does_not_import_the_engine():
    code = ("import sys, sgdlab.analysis.variance_reduction, sgdlab.sampling.importance, sgdlab.sampling.history; "
            "sys.exit(1 if 'sgdlab.train' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
