import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _analysis_models import trained_mlp

from sgdlab.analysis import gradient_noise_scale, gradient_noise_stats, sgd_noise_scale


def test_sgd_noise_scale_formula():
    # papers/004 eq. 24: g = lr (N/B - 1); with momentum m: lr / (1 - m) (N/B - 1)
    assert sgd_noise_scale(0.1, 50000, 128) == pytest.approx(0.1 * (50000 / 128 - 1))
    assert sgd_noise_scale(0.1, 50000, 128, momentum=0.9) == pytest.approx(1.0 * (50000 / 128 - 1))
    assert sgd_noise_scale(0.5, 1000, 1000) == 0.0
    for kwargs, word in [
        (dict(lr=0.0, num_samples=10, batch_size=2), "lr"),
        (dict(lr=0.1, num_samples=10, batch_size=20), "batch_size"),
        (dict(lr=0.1, num_samples=0, batch_size=1), "num_samples"),
        (dict(lr=0.1, num_samples=10, batch_size=2, momentum=1.0), "momentum"),
    ]:
        with pytest.raises(ValueError, match=word):
            sgd_noise_scale(**kwargs)


class Centre(nn.Module):
    """Per-example loss 0.5 |w - x_i|^2: per-example gradient w - x_i, enumerable by hand."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return self.w - x


def half_sq(out, y):
    return 0.5 * (out**2).sum(1).mean()


X = torch.tensor(
    [[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [3.0, 0.0, 0.0], [-2.0, 2.0, 1.0], [0.5, 0.5, 0.5]],
    dtype=torch.float64,
)
W = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)


def exact_components():
    g = W - X  # per-example gradients
    G = g.mean(0)
    return float(G @ G), float(((g - G) ** 2).sum(1).mean())


def test_exact_gradient_noise_scale_enumerated():
    g2, tr = exact_components()
    data = (X, torch.zeros(5))
    stats = gradient_noise_stats(Centre(W), half_sq, data)
    assert stats["grad_norm_sq"] == pytest.approx(g2, rel=1e-12)
    assert stats["trace_cov"] == pytest.approx(tr, rel=1e-12)
    assert stats["b_simple"] == pytest.approx(tr / g2, rel=1e-12)
    split = gradient_noise_scale(Centre(W), half_sq, [(X[:2], torch.zeros(2)), (X[2:], torch.zeros(3))])
    assert split == pytest.approx(tr / g2, rel=1e-12)


def test_two_batch_estimator_unbiased_components():
    g2, tr = exact_components()
    stats = gradient_noise_stats(
        Centre(W),
        half_sq,
        (X, torch.zeros(5)),
        method="two_batch",
        batch_sizes=(2, 8),
        num_pairs=2000,
        seed=0,
    )
    assert abs(stats["grad_norm_sq"] - g2) <= 4 * stats["grad_norm_sq_stderr"]
    assert abs(stats["trace_cov"] - tr) <= 4 * stats["trace_cov_stderr"]
    assert stats["b_simple"] == pytest.approx(tr / g2, rel=0.1)


def test_exact_per_example_matches_loop_on_batchnorm_network():
    model, (x, y) = trained_mlp(batchnorm=True, steps=20)
    model.train()
    stats = gradient_noise_stats(model, F.cross_entropy, (x[:40], y[:40]))
    assert model.training
    model.eval()
    grads = []
    for i in range(40):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    g = torch.stack(grads)
    G = g.mean(0)
    assert stats["grad_norm_sq"] == pytest.approx(float(G @ G), rel=1e-5)
    assert stats["trace_cov"] == pytest.approx(float(((g - G) ** 2).sum(1).mean()), rel=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        gradient_noise_scale(Centre(W), half_sq, (X, torch.zeros(5)), method="three_batch")
    with pytest.raises(ValueError, match="batch_sizes"):
        gradient_noise_scale(Centre(W), half_sq, (X, torch.zeros(5)), method="two_batch", batch_sizes=(8, 8))
    with pytest.raises(ValueError, match="empty"):
        gradient_noise_scale(Centre(W), half_sq, [])
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradient_noise_scale(nn.Identity(), half_sq, (X, torch.zeros(5)))


def test_two_batch_interval_covers_the_exact_value_at_the_nominal_rate():
    import math

    exact = gradient_noise_stats(Centre(W), half_sq, (X, torch.zeros(5)))["b_simple"]
    repeats, hits = 40, 0
    for seed in range(repeats):
        stats = gradient_noise_stats(Centre(W), half_sq, (X, torch.zeros(5)), method="two_batch",
                                     batch_sizes=(1, 4), num_pairs=60, seed=seed)
        lo, hi = stats["b_simple_interval"]
        assert lo <= stats["b_simple"] <= hi and stats["reliable"]
        hits += lo <= exact <= hi
    # nominal 95% (percentile bootstrap, approximate at 60 pairs): allow 3 binomial sd below
    assert hits / repeats >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / repeats)


def test_two_batch_interval_on_network_covers_per_example_value_and_flags_unresolved_gradient():
    model, (x, y) = trained_mlp(steps=10)  # early in training: |G|^2 is large against the noise
    exact = gradient_noise_stats(model, F.cross_entropy, (x, y), method="auto")
    assert exact["method"] == "exact"
    stats = gradient_noise_stats(model, F.cross_entropy, (x, y), method="two_batch", batch_sizes=(8, 64),
                                 num_pairs=100, seed=1)
    lo, hi = stats["b_simple_interval"]
    assert stats["reliable"] and lo <= exact["b_simple"] <= hi and math.isfinite(hi)
    # near a minimum B_simple (about 2000 here) far exceeds B_big: |G|^2 is within its noise of zero,
    # and the result says so instead of printing a confident number
    model, (x, y) = trained_mlp(steps=300)
    exact = gradient_noise_stats(model, F.cross_entropy, (x, y))["b_simple"]
    stats = gradient_noise_stats(model, F.cross_entropy, (x, y), method="two_batch", batch_sizes=(8, 64),
                                 num_pairs=100, seed=1)
    lo, hi = stats["b_simple_interval"]
    assert not stats["reliable"] and hi == math.inf and lo <= exact
