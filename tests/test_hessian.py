import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _analysis_models import Quadratic, mean_output, quad_data, sym_with_eigs, trained_mlp

from sgdlab.analysis import (
    hessian_eigen,
    hessian_eigenvalues,
    hessian_logdet,
    hessian_trace,
    hessian_trace_estimate,
    hvp,
    log_probability_ratio,
    plot_spectral_density,
    relative_minimum_probability,
    spectral_density,
)

EIGS = [7.0, 4.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05]


def dense_hessian(model: nn.Module, data) -> torch.Tensor:
    """Dense Hessian of the mean cross-entropy on the flat parameter vector, float64, eval mode."""
    x, y = data
    m = model.double().eval()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    buffers = dict(m.named_buffers())
    flat0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def f(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            ps[n] = flat[i : i + k].view(s)
            i += k
        return F.cross_entropy(torch.func.functional_call(m, {**buffers, **ps}, (x.double(),)), y)

    h = torch.func.hessian(f)(flat0)
    model.float()
    return h


def test_hvp_quadratic_flat_and_list():
    H = sym_with_eigs([3.0, -1.0, 0.5, 2.0])
    model = Quadratic(H, torch.tensor([0.3, -0.2, 1.0, 0.1], dtype=torch.float64))
    v = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    assert torch.allclose(hvp(model, mean_output, quad_data(), v), H @ v, atol=1e-12)
    (out,) = hvp(model, mean_output, quad_data(), [v])
    assert torch.allclose(out, H @ v, atol=1e-12)


def test_lanczos_top_eigenvalues_of_quadratic():
    H = sym_with_eigs(EIGS)
    model = Quadratic(H)
    res = hessian_eigen(model, mean_output, quad_data(), k=3, return_vectors=True)
    assert torch.allclose(res.values, torch.tensor(EIGS[:3], dtype=torch.float64), rtol=1e-9)
    assert bool(res.converged.all())
    for lam, v in zip(res.values, res.vectors):
        assert torch.allclose(H @ v, lam * v, atol=1e-6)
    vals = hessian_eigenvalues(model, mean_output, quad_data(), k=2, method="power", tol=1e-10, max_iter=2000)
    assert torch.allclose(vals, torch.tensor(EIGS[:2], dtype=torch.float64), rtol=1e-6)


def test_negative_eigenvalue_power_vs_lanczos():
    eigs = [1.0, 0.6, 0.3, 0.1, -10.0]
    model = Quadratic(sym_with_eigs(eigs, seed=3))
    power = hessian_eigen(model, mean_output, quad_data(), k=1, method="power", tol=1e-10, max_iter=500)
    assert power.values[0].item() == pytest.approx(-10.0, rel=1e-6)
    assert bool(power.converged[0])
    lanczos = hessian_eigenvalues(model, mean_output, quad_data(), k=1)
    assert lanczos[0].item() == pytest.approx(1.0, rel=1e-9)


def test_power_iteration_does_not_claim_convergence_between_opposite_eigenvalues():
    # +3 and -3 have the same magnitude: power iteration oscillates and never finds an eigenvector,
    # although its Rayleigh quotient can stall.
    model = Quadratic(torch.diag(torch.tensor([3.0, -3.0, 1.0, 0.5], dtype=torch.float64)))
    res = hessian_eigen(model, mean_output, quad_data(), k=1, method="power", max_iter=300)
    assert not bool(res.converged[0])
    assert res.residuals[0].item() > 1e-2 * abs(res.values[0].item())


def test_trace_of_quadratic_exact_for_diagonal_and_within_stderr():
    diag = torch.diag(torch.tensor(EIGS, dtype=torch.float64))
    # Rademacher z: z^T D z = tr(D) exactly for a diagonal matrix, so the standard error is zero
    est = hessian_trace_estimate(Quadratic(diag), mean_output, quad_data(), num_samples=5)
    assert est.value == pytest.approx(sum(EIGS), rel=1e-12) and est.stderr == pytest.approx(0.0, abs=1e-12)
    H = sym_with_eigs(EIGS, seed=1)
    value, se = hessian_trace(Quadratic(H), mean_output, quad_data(), num_samples=200, return_stderr=True)
    # the variance of z^T H z for Rademacher z is 2 * sum_{i != j} H_ij^2
    off = (H**2).sum() - (torch.diag(H) ** 2).sum()
    assert se == pytest.approx(math.sqrt(2 * off.item() / 200), rel=0.3)
    assert abs(value - sum(EIGS)) <= 3 * se


def test_logdet_and_spectral_density_of_quadratic(tmp_path):
    D = torch.diag(torch.tensor(EIGS, dtype=torch.float64))
    expected = float(np.sum(np.log(EIGS)))
    assert hessian_logdet(Quadratic(D), mean_output, quad_data(), method="dense") == pytest.approx(expected)
    # Lanczos over the whole space with Rademacher starts is exact for a diagonal matrix
    assert hessian_logdet(Quadratic(D), mean_output, quad_data(), method="slq", num_steps=8) == pytest.approx(
        expected
    )
    H = sym_with_eigs(EIGS)
    sd = spectral_density(Quadratic(H), mean_output, quad_data(), num_vectors=3, num_steps=8, sigma=0.02)
    assert np.allclose(np.sort(sd.nodes[0]), np.sort(EIGS), atol=1e-8)
    assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, rel=1e-3)
    # each run's quadrature gives z^T H z / |z|^2 exactly: their mean is Hutchinson's estimate
    hutch = [z @ H @ z for z in _rademacher(3, 8, sd_seed=0)]
    assert sd.trace_of(lambda t: t) == pytest.approx(float(np.mean(hutch)), rel=1e-9)
    plot_spectral_density(sd, path=tmp_path / "density.png")
    assert (tmp_path / "density.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="positive definite"):
        hessian_logdet(Quadratic(sym_with_eigs([1.0, -1.0])), mean_output, quad_data(), method="dense")


def _rademacher(num, dim, sd_seed):
    gen = torch.Generator().manual_seed(sd_seed)
    return [
        torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
        for _ in range(num)
    ]


def test_trained_mlp_against_dense_hessian():
    model, data = trained_mlp()
    model.train()
    res = hessian_eigen(model, F.cross_entropy, data, k=3)
    est = hessian_trace_estimate(model, F.cross_entropy, data, num_samples=100, seed=1)
    assert model.training  # mode restored
    dense = dense_hessian(model, data)
    ev = torch.linalg.eigvalsh(dense).flip(0)
    assert torch.allclose(res.values, ev[:3], rtol=1e-2)
    assert bool(res.converged.all())
    assert est.stderr > 0 and abs(est.value - torch.trace(dense).item()) <= 3 * est.stderr
    # power iteration: largest magnitude, which here is the top eigenvalue
    top = hessian_eigenvalues(model, F.cross_entropy, data, k=1, method="power", tol=1e-7, max_iter=1000)
    assert top[0].item() == pytest.approx(ev[0].item(), rel=1e-2)


def test_batchnorm_model_same_numbers_for_any_batching():
    model, (x, y) = trained_mlp(batchnorm=True, steps=50)
    chunks = [(x[:100], y[:100]), (x[100:117], y[100:117]), (x[117:], y[117:])]
    whole = hessian_eigenvalues(model, F.cross_entropy, (x, y), k=2)
    split = hessian_eigenvalues(model, F.cross_entropy, chunks, k=2)
    assert torch.allclose(whole, split, rtol=1e-4)
    t1 = hessian_trace(model, F.cross_entropy, (x, y), num_samples=10)
    t2 = hessian_trace(model, F.cross_entropy, iter(chunks), num_samples=10)
    assert t1 == pytest.approx(t2, rel=1e-4)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(
        hvp(model, F.cross_entropy, (x, y), v), hvp(model, F.cross_entropy, chunks, v), rtol=1e-4, atol=1e-6
    )
    assert model.training


def test_determinism_per_seed():
    model, data = trained_mlp(steps=20)
    a = hessian_trace(model, F.cross_entropy, data, num_samples=5, seed=3)
    b = hessian_trace(model, F.cross_entropy, data, num_samples=5, seed=3)
    assert a == b


def test_equilibrium_relative_probability():
    # P(A)/P(B) = sqrt(det H_B / det H_A) exp(-(L_A - L_B) / ((lr/B) s^2))   (papers/004 eq. 26)
    la, lb, da, db = 0.10, 0.12, 5.0, 9.0
    r = log_probability_ratio(la, da, lb, db, lr=0.1, batch_size=32)
    assert r == pytest.approx(-0.5 * (da - db) - (la - lb) / (0.1 / 32))
    p = relative_minimum_probability([la, lb], [da, db], lr=0.1, batch_size=32)
    assert p.sum() == pytest.approx(1.0) and math.log(p[0] / p[1]) == pytest.approx(r)
    # depends on lr / B only
    q = relative_minimum_probability([la, lb], [da, db], lr=0.4, batch_size=128)
    assert np.allclose(p, q)
    # stable in logs for huge log-determinants
    big = relative_minimum_probability([0.0, 0.0], [1e6, 1e6 + 2.0], lr=1.0, batch_size=1)
    assert big[0] == pytest.approx(math.e / (math.e + 1))


def test_bad_inputs():
    model, data = trained_mlp(steps=1)
    with pytest.raises(ValueError, match="empty"):
        hessian_eigenvalues(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="empty"):
        hessian_trace(model, F.cross_entropy, (data[0][:0], data[1][:0]))
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_eigenvalues(nn.ReLU(), F.cross_entropy, data)
    with pytest.raises(ValueError, match="k"):
        hessian_eigenvalues(model, F.cross_entropy, data, k=0)
    with pytest.raises(ValueError, match="method"):
        hessian_eigenvalues(model, F.cross_entropy, data, method="arnoldi")
    with pytest.raises(ValueError, match="lr"):
        relative_minimum_probability([0.0], [0.0], lr=0.0, batch_size=1)
