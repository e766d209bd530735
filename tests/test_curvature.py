"""Curvature operators (Hessian, GGN, blocks, scipy) and estimators (Lanczos, Hutchinson, Hutch++, SLQ)."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _analysis_models import sym_with_eigs, trained_mlp
from scipy.sparse.linalg import eigsh

from sgdlab.analysis import (
    GGNOperator,
    HessianOperator,
    estimate_trace,
    hessian_eigen,
    hessian_eigenvalues,
    hessian_trace_estimate,
    slq,
    top_eigenvalues,
)


def dense_hessian(model, data):
    op = HessianOperator(model, F.cross_entropy, data)
    h = op.dense()
    return 0.5 * (h + h.T)


class MatrixOperator:
    """A fixed symmetric matrix with the operator interface the estimators use."""

    def __init__(self, a):
        self.a, self.dim, self.device, self.num_matvecs = a, a.shape[0], a.device, 0

    def matvec(self, v):
        self.num_matvecs += 1
        return self.a @ v


def test_to_scipy_eigsh_agrees_with_lanczos_and_dense():
    model, data = trained_mlp()
    op = HessianOperator(model, F.cross_entropy, data)
    lin = op.to_scipy()
    assert lin.shape == (op.dim, op.dim) and lin.dtype == np.float64
    assert op.dtype == torch.float32 and op.device == torch.device("cpu")
    vals = np.sort(eigsh(lin, k=3, which="LA", tol=1e-10)[0])[::-1]
    ours = hessian_eigenvalues(model, F.cross_entropy, data, k=3, tol=1e-8)
    dense = torch.linalg.eigvalsh(dense_hessian(model, data)).flip(0)[:3]
    assert np.allclose(vals, ours.numpy(), rtol=1e-4)
    assert np.allclose(vals, dense.numpy(), rtol=1e-4)
    # the matmat path (used by eigsh for blocks of vectors) matches column-wise products
    x = np.random.default_rng(0).standard_normal((op.dim, 2))
    assert np.allclose(lin @ x, np.stack([lin.matvec(x[:, 0]), lin.matvec(x[:, 1])], 1))


def test_ggn_equals_hessian_for_linear_model_with_squared_error():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=gen), torch.randn(40, 3, generator=gen)
    model = nn.Linear(5, 3)
    h = HessianOperator(model, F.mse_loss, (x, y)).dense()
    g = GGNOperator(model, F.mse_loss, [(x[:15], y[:15]), (x[15:], y[15:])]).dense()
    assert torch.allclose(g, h, atol=1e-6)
    # closed form: the MSE over 3 outputs is (1/3N) sum |W x + b - y|^2, so H = (2/3) E[xx^T] (x) I_3
    xa = torch.cat([x, torch.ones(40, 1)], 1).double()
    assert torch.trace(h).item() == pytest.approx(2 / 3 * 3 * float((xa**2).sum(1).mean()), rel=1e-5)


def test_ggn_of_mlp_matches_jacobian_form_and_is_psd():
    model, (x, y) = trained_mlp(steps=50)
    x, y = x[:30], y[:30]
    op = GGNOperator(model, F.cross_entropy, (x, y))
    g = op.dense()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def out_fn(flat):
        ps, i = {}, 0
        for n in names:
            k = params[n].numel()
            ps[n] = flat[i : i + k].view_as(params[n])
            i += k
        return torch.func.functional_call(model, ps, (x,))

    flat0 = torch.cat([p.reshape(-1) for p in params.values()])
    jac = torch.func.jacrev(out_fn)(flat0).reshape(30 * 3, -1).double()
    logits = model(x).detach()
    h_out = torch.func.hessian(lambda o: F.cross_entropy(o, y))(logits).reshape(90, 90).double()
    assert torch.allclose(g, jac.T @ h_out @ jac, atol=1e-6)
    ev = torch.linalg.eigvalsh(0.5 * (g + g.T))
    assert ev.min() > -1e-6 * ev.max()  # positive semi-definite up to float32 rounding


def test_blocks_are_submatrices_and_their_traces_sum_to_the_full_trace():
    model, data = trained_mlp(batchnorm=True, steps=50)
    full = dense_hessian(model, data)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    blocks = ["0", "1", "3"]  # Linear, BatchNorm, Linear of the Sequential
    total = 0.0
    for b in blocks:
        op = HessianOperator(model, F.cross_entropy, data, block=b)
        idx = [i for i, n in enumerate(names) if n.startswith(b + ".")]
        sel = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx])
        sub = full[sel][:, sel]
        assert torch.allclose(op.dense(), sub, atol=1e-6)
        total += estimate_trace(op, method="exact").value
    assert total == pytest.approx(torch.trace(full).item(), rel=1e-9)
    # a filter and a list of prefixes select the same block
    a = HessianOperator(model, F.cross_entropy, data, block=lambda n, p: n.startswith("3."))
    b = HessianOperator(model, F.cross_entropy, data, block=["3.weight", "3.bias"])
    assert a.names == b.names == ["3.weight", "3.bias"]
    with pytest.raises(ValueError, match="block 'conv' selects no trainable parameter"):
        HessianOperator(model, F.cross_entropy, data, block="conv")


def test_compiled_model_is_unwrapped():
    model, data = trained_mlp(steps=50)
    compiled = torch.compile(model)  # never run: the analysis evaluates the eager module underneath
    eager = hessian_eigen(model, F.cross_entropy, data, k=2, tol=1e-8)
    comp = hessian_eigen(compiled, F.cross_entropy, data, k=2, tol=1e-8)
    assert torch.equal(eager.values, comp.values)
    assert HessianOperator(compiled, F.cross_entropy, data, block="2").names == ["2.weight", "2.bias"]
    t1 = hessian_trace_estimate(model, F.cross_entropy, data, num_samples=6, method="hutch++")
    t2 = hessian_trace_estimate(compiled, F.cross_entropy, data, num_samples=6, method="hutch++")
    assert t1.value == t2.value


def test_lanczos_budget_and_power_on_generic_operator():
    eigs = [9.0, 5.0, 3.0] + list(np.linspace(0.01, 1.0, 37))
    op = MatrixOperator(sym_with_eigs(eigs, seed=2))
    res = top_eigenvalues(op, k=2, max_iter=25, tol=0)
    assert res.num_matvecs == 25 and res.iterations == 25
    assert res.values.tolist() == pytest.approx([9.0, 5.0], rel=1e-8)
    power = top_eigenvalues(MatrixOperator(op.a), k=1, method="power", tol=1e-10, max_iter=500)
    assert power.values[0].item() == pytest.approx(9.0, rel=1e-6)
    # a warm start on the top eigenvector: the first Ritz value is already exact
    vec = torch.linalg.eigh(op.a).eigenvectors[:, -1]
    warm = top_eigenvalues(MatrixOperator(op.a), k=1, max_iter=2, tol=0, v0=vec)
    assert warm.num_matvecs == 2 and warm.values[0].item() == pytest.approx(9.0, rel=1e-12)
    cold = top_eigenvalues(MatrixOperator(op.a), k=1, max_iter=2, tol=0)
    assert abs(cold.values[0].item() - 9.0) > 1e-3


def _coverage(make_estimate, truth, repeats):
    hits = 0
    for seed in range(repeats):
        lo, hi = make_estimate(seed).interval(0.95)
        hits += lo <= truth <= hi
    return hits / repeats


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_standard_errors_cover_truth_at_nominal_rate(method):
    # a spectrum like a network's Hessian: a few outliers over a wide bulk
    eigs = [40.0, 25.0, 12.0] + list(np.random.default_rng(0).uniform(-0.5, 2.0, 57))
    a = sym_with_eigs(eigs, seed=4)
    repeats = 400
    cov = _coverage(lambda s: estimate_trace(MatrixOperator(a), method=method, num_matvecs=30, seed=s),
                    sum(eigs), repeats)
    # nominal 95%: the observed rate is binomial with sd sqrt(.95 .05 / repeats); allow 3 sd
    assert abs(cov - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / repeats), cov


def test_hutchpp_beats_hutchinson_at_three_times_the_products_on_decaying_spectrum():
    eigs = [100.0 / (i + 1) ** 2 for i in range(60)]
    a = sym_with_eigs(eigs, seed=5)
    t = sum(eigs)
    err_pp = [abs(estimate_trace(MatrixOperator(a), method="hutch++", num_matvecs=15, seed=s).value - t)
              for s in range(100)]
    err_h = [abs(estimate_trace(MatrixOperator(a), method="hutchinson", num_matvecs=45, seed=s).value - t)
             for s in range(100)]
    assert np.mean(err_pp) < 0.5 * np.mean(err_h)


def test_trace_on_mlp_covers_dense_truth_and_counts_products():
    model, data = trained_mlp()
    truth = torch.trace(dense_hessian(model, data)).item()
    op = HessianOperator(model, F.cross_entropy, data)
    hits, repeats = 0, 40
    for seed in range(repeats):
        est = estimate_trace(op, method="hutch++", num_matvecs=12, seed=seed)
        assert est.num_matvecs == 12 and est.num_samples == 4
        lo, hi = est.interval(0.95)
        hits += lo <= truth <= hi
    # nominal 95% over 40 repeats: sd 0.034; allow 3 sd below
    assert hits / repeats >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / repeats)


def test_data_resamples_give_a_bootstrap_error_that_covers_the_population_value():
    # linear model with squared error: H = (2/out) E[x x^T] over the examples (with bias: x padded by 1),
    # so the population trace is 2 E|x|^2 + 2 = 2 d + 2 for standard Gaussian x
    d, n, repeats = 3, 60, 30
    hits = 0
    for seed in range(repeats):
        gen = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        model = nn.Linear(d, 1).double()
        est = hessian_trace_estimate(model, F.mse_loss, (x, torch.zeros(n, 1, dtype=torch.float64)),
                                     method="exact", data_resamples=20, seed=seed)
        assert est.stderr == 0 and est.data_stderr > 0
        lo, hi = est.interval(0.95)
        hits += lo <= 2 * d + 2 <= hi
    # the bootstrap interval is approximate at n = 60; allow 3 sd below nominal over 30 repeats
    assert hits / repeats >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / repeats)


def test_slq_density_has_pointwise_stderr_and_trace_estimate():
    eigs = list(np.linspace(0.1, 3.0, 30))
    a = sym_with_eigs(eigs, seed=6)
    sd = slq(MatrixOperator(a), num_vectors=6, num_steps=30, sigma=0.05)
    assert sd.density_stderr.shape == sd.density.shape and sd.density_stderr.max() > 0
    value, se = sd.trace_of_with_stderr(lambda t: t)
    assert abs(value - sum(eigs)) <= 4 * se
    assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, rel=1e-3)


def test_estimator_argument_errors():
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_trace(op, method="xtrace++")
    with pytest.raises(ValueError, match="num_matvecs"):
        estimate_trace(op, method="hutch++", num_matvecs=3)
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 6 for xtrace"):
        estimate_trace(op, method="xtrace", num_matvecs=5)
    with pytest.raises(ValueError, match="data_resamples"):
        estimate_trace(op, data_resamples=1)
    with pytest.raises(ValueError, match="resample"):
        estimate_trace(op, data_resamples=5)
    with pytest.raises(ValueError, match="k=5 exceeds"):
        top_eigenvalues(op, k=5)


def test_curvature_blocks_table_partitions_parameters_and_traces_sum():
    from sgdlab.analysis import block_partition, curvature_blocks

    model, data = trained_mlp(batchnorm=True, steps=50)
    assert block_partition(model, "layers") == {"0": ["0.weight", "0.bias"], "1": ["1.weight", "1.bias"],
                                                 "3": ["3.weight", "3.bias"]}
    # a budget of at least each block's size makes every block trace exact
    table = curvature_blocks(model, F.cross_entropy, data, num_matvecs=60, k=1, tol=1e-8, max_iter=60)
    full = dense_hessian(model, data)
    assert [r.label for r in table.rows] == ["0", "1", "3"]
    assert sum(r.num_params for r in table.rows) == full.shape[0]
    assert table.sum_of_traces == pytest.approx(torch.trace(full).item(), rel=1e-9)
    assert [r.trace.method for r in table.rows] == ["exact", "exact", "exact"]
    top = torch.linalg.eigvalsh(full)[-1].item()
    assert table.total.top.values[0].item() == pytest.approx(top, rel=1e-6)
    assert all(r.top.values[0].item() <= top * (1 + 1e-6) for r in table.rows)  # Cauchy interlacing
    assert "3" in table.format() and table.as_dict()["sum_of_block_traces"] == table.sum_of_traces
    stages = block_partition(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1)),
                             "stages")
    assert list(stages) == ["0", "1"] and len(stages["0"]) == 4


def test_krylov_deflated_trace_is_unbiased_covers_and_beats_hutchpp():
    eigs = [100.0 / (i + 1) ** 2 for i in range(60)]
    a = sym_with_eigs(eigs, seed=5)
    t = sum(eigs)
    kr = [estimate_trace(MatrixOperator(a), method="krylov", num_matvecs=15, seed=s) for s in range(200)]
    pp = [estimate_trace(MatrixOperator(a), method="hutch++", num_matvecs=15, seed=s) for s in range(200)]
    assert all(e.num_matvecs == 15 for e in kr)
    vals = np.array([e.value for e in kr])
    assert abs(vals.mean() - t) <= 4 * vals.std(ddof=1) / math.sqrt(len(vals))  # unbiased
    assert np.mean(np.abs(vals - t)) < 0.5 * np.mean([abs(e.value - t) for e in pp])
    cov = np.mean([lo <= t <= hi for lo, hi in (e.interval(0.95) for e in kr)])
    assert abs(cov - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / len(kr)), cov


def test_xtrace_is_unbiased_uses_its_budget_and_beats_hutchpp_on_a_decaying_spectrum():
    eigs = [100.0 / (i + 1) ** 2 for i in range(60)]
    a = sym_with_eigs(eigs, seed=5)
    t = sum(eigs)
    xt = [estimate_trace(MatrixOperator(a), method="xtrace", num_matvecs=30, seed=s) for s in range(200)]
    pp = [estimate_trace(MatrixOperator(a), method="hutch++", num_matvecs=30, seed=s) for s in range(200)]
    assert all(e.num_matvecs == 30 and e.num_samples == 15 for e in xt)
    vals = np.array([e.value for e in xt])
    assert abs(vals.mean() - t) <= 4 * vals.std(ddof=1) / math.sqrt(len(vals))  # unbiased
    assert np.mean(np.abs(vals - t)) < 0.8 * np.mean([abs(e.value - t) for e in pp])
    # a sketch as wide as the matrix is exact
    small = sym_with_eigs([3.0, -1.0, 2.0, 0.5], seed=1)
    full = estimate_trace(MatrixOperator(small), method="xtrace", num_matvecs=8, seed=0)
    assert full.value == pytest.approx(4.5, rel=1e-10) and full.stderr == 0.0


def test_trace_sketch_size_sets_the_split_validates_and_trades_deflation_for_probes():
    """``sketch``: the default split is the explicit one, a sketch spanning the space is exact, bad values
    name the argument, and the trade-off goes both ways: on a flat spectrum a small Krylov sketch (more
    probes) has the lower error, on a fast-decaying one the default (more deflation) does."""
    decaying = sym_with_eigs([100.0 / (i + 1) ** 2 for i in range(200)], seed=5)
    flat = sym_with_eigs(list(np.linspace(1.0, 2.0, 200)), seed=6)
    for method, default in (("hutch++", 40 // 3), ("krylov", 40 // 2)):
        a = estimate_trace(MatrixOperator(decaying), method=method, num_matvecs=40, seed=3)
        b = estimate_trace(MatrixOperator(decaying), method=method, num_matvecs=40, seed=3, sketch=default)
        assert a.value == b.value and a.num_matvecs == b.num_matvecs == 40
    small = sym_with_eigs([3.0, -1.0, 2.0, 0.5, 4.0], seed=1)
    full = estimate_trace(MatrixOperator(small), method="krylov", num_matvecs=8, seed=0, sketch=6)
    assert full.value == pytest.approx(8.5, rel=1e-10) and full.stderr == 0.0
    b = torch.randn(30, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    low = estimate_trace(MatrixOperator(b @ b.T), method="hutch++", num_matvecs=12, seed=0, sketch=3)
    assert low.value == pytest.approx(float(torch.sum(b * b)), rel=1e-9) and low.num_samples == 6
    for method, bad in (("krylov", 0), ("krylov", 39), ("hutch++", 20), ("krylov", 2.5), ("krylov", True),
                        ("xtrace", 5), ("hutchinson", 5)):
        with pytest.raises(ValueError, match="sketch"):
            estimate_trace(MatrixOperator(flat), method=method, num_matvecs=40, sketch=bad)

    def mean_error(a, truth, sketch):
        vals = np.array([estimate_trace(MatrixOperator(a), method="krylov", num_matvecs=40, seed=s,
                                        sketch=sketch).value for s in range(200)])
        err = np.abs(vals - truth)
        return vals, err.mean(), err.std(ddof=1) / math.sqrt(len(err))

    t_flat = float(torch.trace(flat))
    vals, few, se_few = mean_error(flat, t_flat, 4)
    _, dflt, se_dflt = mean_error(flat, t_flat, None)
    assert abs(vals.mean() - t_flat) <= 4 * vals.std(ddof=1) / math.sqrt(len(vals))  # unbiased
    # 36 probes against 20, and a smaller projection: projecting a near-multiple of the identity off a
    # k-dimensional subspace adds about c^2 k of off-diagonal mass, which Rademacher probes do see (~2x here)
    assert dflt - few > 3 * math.hypot(se_few, se_dflt)
    t_dec = float(torch.trace(decaying))
    _, few, se_few = mean_error(decaying, t_dec, 4)
    _, dflt, se_dflt = mean_error(decaying, t_dec, None)
    assert few - dflt > 3 * math.hypot(se_few, se_dflt)


def _bench_curvature():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "curvature.py"
    spec = importlib.util.spec_from_file_location("bench_curvature", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_deflation_floor_is_the_residual_probe_variance():
    """The benchmark's best case for deflated trace estimators: the Rademacher variance of ``z^T R_k z`` with
    ``R_k`` the matrix less its ``k`` largest-magnitude eigenpairs, checked directly and by sampling."""
    bench = _bench_curvature()
    rng = np.random.default_rng(0)
    n = 30
    b = rng.standard_normal((n, n))
    a = (b + b.T) / 2 + 8.0 * np.outer(np.ones(n), np.ones(n)) / n  # one outlier over a bulk
    w, u = np.linalg.eigh(a)
    floor = bench.deflation_floor(w, u, 5)
    order = np.argsort(-np.abs(w))
    for k in range(6):
        r = a - (u[:, order[:k]] * w[order[:k]]) @ u[:, order[:k]].T
        direct = 2 * (np.sum(r * r) - np.sum(np.diag(r) ** 2))
        assert floor[k] == pytest.approx(direct, rel=1e-10)
    # by sampling: the variance of z^T R_2 z over 20,000 Rademacher probes, within 4 standard errors
    r2 = a - (u[:, order[:2]] * w[order[:2]]) @ u[:, order[:2]].T
    z = rng.choice([-1.0, 1.0], size=(20000, n))
    q = np.einsum("si,ij,sj->s", z, r2, z)
    c = q - q.mean()
    se_var = math.sqrt((np.mean(c ** 4) - np.mean(c ** 2) ** 2) / len(q))  # standard error of a sample variance
    assert abs(q.var(ddof=1) - floor[2]) < 4 * se_var
    # Hutchinson is the k = 0 case, and deflating the outlier lowers the variance
    assert floor[1] < floor[0]
    # attainable(): with every probe spent on the residual after removing k eigenpairs, the ratio of
    # standard deviations against Hutchinson at 3m is sqrt(floor[k] / (m - k) / (floor[0] / (3m))), minimised
    best, k = bench.attainable(floor, 6)
    expect = min(math.sqrt(floor[j] / (6 - j) / (floor[0] / 18)) for j in range(6))
    assert best == pytest.approx(expect) and 0 <= k < 6


def test_benchmark_dense_trace_errors_exact_cases_and_ratio_interval():
    """The benchmark's dense harness on matrices with closed-form answers: Rademacher Hutchinson is exact on
    a diagonal matrix (``z^T D z = tr D``), Hutch++ is exact on a matrix of rank below its sketch width, and
    the ratio's interval is the delta method's ``r (1 +- 1.96 sqrt(cv_a^2 + cv_b^2))``."""
    bench = _bench_curvature()
    rng = np.random.default_rng(1)
    diag = np.diag(rng.uniform(0.5, 2.0, 40))
    e = bench.dense_trace_errors(diag, float(np.trace(diag)), 6, 5, {})
    assert set(e) == {"hutch++", "krylov", "xtrace", "hutchinson"}
    assert e["hutchinson"][0] < 1e-14 and e["hutchinson"][1] < 1e-14
    b = rng.standard_normal((40, 3))
    low = b @ b.T  # rank 3 < the sketch width 30 // 3 = 10
    e = bench.dense_trace_errors(low, float(np.trace(low)), 30, 4, {})
    assert e["hutch++"][0] < 1e-12 and e["hutchinson"][0] > 1e-3
    text = bench._ratio((2.0, 0.1), (4.0, 0.4))
    se = 0.5 * math.hypot(0.05, 0.1)
    assert text == f"0.50 [{0.5 - 1.96 * se:.2f}, {0.5 + 1.96 * se:.2f}]"


def test_benchmark_splits_at_the_default_share_reproduce_the_default_estimators():
    """``splits`` at Krylov's default share (1/2) and Hutch++'s (2/3) gives the ratios of the default
    estimators' mean errors to Hutchinson@3m's, as the crossover harness computes them."""
    bench = _bench_curvature()
    rng = np.random.default_rng(3)
    b = rng.standard_normal((60, 60))
    a = b @ b.T / 60 + np.diag(np.linspace(0.0, 3.0, 60))
    w, u = np.linalg.eigh(a)
    out = bench.splits(w, u, [12, 30], 6, [0.5, 0.67, 0.05])
    assert set(out) == {12} and set(out[12]) == {("krylov", 0.5), ("hutch++", 0.5), ("krylov", 0.67),
                                                 ("hutch++", 0.67), ("krylov", 0.05)}  # 30: 3m > 60; Hutch++ gets no sketch at 0.05
    e = bench.dense_trace_errors(a, float(w.sum()), 12, 6, {})
    assert out[12][("krylov", 0.5)][0] == pytest.approx(e["krylov"][0] / e["hutchinson"][0], rel=1e-9)
    assert out[12][("hutch++", 0.67)][0] == pytest.approx(e["hutch++"][0] / e["hutchinson"][0], rel=1e-9)
    assert all(se > 0 for _, se in out[12].values())
