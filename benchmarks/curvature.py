"""Benchmark: curvature estimates per Hessian-vector product, sgdlab against curvlinops and hessian-eigenthings.

All in one process, on the same model, data (one batch, eval mode, float32 parameters) and budget of
Hessian-vector products (HVPs). The peers are optional benchmark-only dependencies
(``pip install curvlinops-for-pytorch hessian-eigenthings``); a peer that is not installed is skipped.

For each model (an MLP, a 2-D CNN with batch norm, and sgdlab's ``cnn1d``; ``mlp-mnist1d``, the same MLP
trained on MNIST-1D instead of Gaussian clusters, is a control for the data) it reports

- the time per HVP: medians over ``--repeats`` interleaved rounds (each round times ``--hvps`` products
  of every implementation in turn, so a load change on a shared machine hits all of them alike);
  ours with the cached gradient graph (the default for one batch) and without it;
- the relative error of the top eigenvalue after ``k`` HVPs (``--eig-budgets``): our Lanczos and
  hessian-eigenthings' Lanczos from the same start vector (so both span the same Krylov space and the
  difference is arithmetic: ours float64 with full reorthogonalisation), median over ``--seeds``; curvlinops has no eigensolver of its own, so
  scipy's ARPACK ``eigsh`` runs on its operator to ``tol=1e-6`` with its HVPs counted, and our Lanczos
  gets the same number of HVPs;
- the relative error of the trace after ``m`` HVPs (``--trace-budgets``): our Hutch++ and Krylov-deflated
  estimator at ``m``, our Hutchinson at ``3 m``, and the peers' Hutch++ at ``m``; mean over ``--seeds`` with
  its standard error. Each draws its own probes, so a comparison reads "ok" (ours is lower), "NOT met"
  (higher by more than twice the standard error of the difference) or "within noise" (the seeds cannot
  rank them: the peers' Hutch++ is the same algorithm as ours, so at equal means this is the usual case).
  Ours is set against each peer on its own, not against the lower of the two: the smaller of two equally
  noisy means is biased low;
- with ``--parts crossover``, the same trace comparison (peers included) on the dense float64 reference
  itself, where products are cheap enough for hundreds of seeds and budgets up to ``--crossover-budgets``,
  with each ratio "ours / theirs" and its 95% interval, and under every row the best case any deflated
  estimator could reach (``deflation_floor``);
- with ``--parts split``, our Hutch++ and Krylov variant on the same dense reference with other splits of the
  budget between sketch and probes (``--split-shares``), each against Hutchinson@3m.

``--models gpt2`` is a tiny Hugging Face ``GPT2LMHeadModel`` (sdpa attention, built from a config, no
download) on one dict batch of token sequences with the causal-LM loss (:func:`sgdlab.analysis.causal_lm_loss`):
it reports the time per HVP, ours / curvlinops (curvlinops run under the same math attention kernel, which
it needs too), and the relative difference of the two products (see docs/curvature.md, "Attention models
and Hugging Face").

References are dense: the float64 Hessian by ``torch.func.hessian`` where it has at most ``--dense-max``
parameters and no convolution, else assembled column by column from float64 HVPs of a float64 copy of the model; its top
eigenvalue and trace are the truth for every estimate. Eigenvalue errors are compared up to ``FLOOR``
(5e-7), the relative rounding of a float32 product, which converged runs of any method reach. Targets (issue "curvature diagnostics v2"): time
per HVP <= 1.0x the faster peer, top-eigenvalue error at k HVPs <= the peers', Hutch++ error at m <=
Hutchinson's at 3m and <= the peers' Hutch++.

    python benchmarks/curvature.py [--models mlp,cnn-bn,cnn1d] [--examples 256] [--seeds 8]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdlab.analysis import (
    HessianOperator,
    causal_lm_loss,
    differentiable_attention,
    estimate_trace,
    top_eigenvalues,
)

# Relative rounding of a float32 Hessian-vector product: below it, eigenvalue errors of converged runs
# differ by the order in which float32 sums were taken, not by the method.
FLOOR = 5e-7


def peers() -> dict:
    out = {}
    try:
        import curvlinops  # type: ignore[import-not-found]

        out["curvlinops"] = curvlinops
    except ImportError:
        print("curvlinops is not installed (pip install curvlinops-for-pytorch): skipped")
    try:
        import hessian_eigenthings  # type: ignore[import-not-found]

        out["eigenthings"] = hessian_eigenthings
    except ImportError:
        print("hessian-eigenthings is not installed (pip install hessian-eigenthings): skipped")
    return out


class CNNBN(nn.Module):
    """A small 2-D CNN with batch norm on 1 x 8 x 8 images."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        h = self.b1(self.c1(x)).relu()
        h = F.max_pool2d(self.b2(self.c2(h)).relu(), 2)
        return self.head(h.flatten(1))


def build(name: str, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    if name == "mlp":
        x = 0.4 * torch.randn(10, 40, generator=gen)[y] + torch.randn(n, 40, generator=gen)
        model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))
    elif name == "mlp-mnist1d":  # the same MLP and training on the first n MNIST-1D training examples
        from sgdlab.data import datasets

        data = datasets.mnist1d(num_train=n, cache=False)
        x, y = data.train_x, data.train_y
        x = (x - x.mean()) / x.std()
        model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))
    elif name == "cnn-bn":
        x = 0.4 * torch.randn(10, 1, 8, 8, generator=gen)[y] + torch.randn(n, 1, 8, 8, generator=gen)
        model = CNNBN()
    elif name == "cnn1d":
        from sgdlab.models import create

        x = 0.4 * torch.randn(10, 40, generator=gen)[y] + torch.randn(n, 40, generator=gen)
        model = create("cnn1d", num_classes=10)
    else:
        raise SystemExit(f"unknown model {name!r} (mlp, mlp-mnist1d, cnn-bn, cnn1d)")
    torch.manual_seed(seed)
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(200):
        idx = torch.randint(0, n, (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval(), x, y


def dense_reference(model: nn.Module, x, y, dense_max: int) -> tuple[np.ndarray, np.ndarray, str]:
    m64 = copy.deepcopy(model).double().eval()
    dim = sum(p.numel() for p in m64.parameters())
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in m64.modules())
    if dim <= dense_max and not convolutional:  # vmapped convolutions would need dim x batch memory
        names = [n for n, _ in m64.named_parameters()]
        shapes = [p.shape for p in m64.parameters()]
        buffers = dict(m64.named_buffers())
        flat0 = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])

        def f(flat):
            ps, i = {}, 0
            for n_, s in zip(names, shapes):
                k = math.prod(s)
                ps[n_] = flat[i : i + k].view(s)
                i += k
            return F.cross_entropy(torch.func.functional_call(m64, {**buffers, **ps}, (x.double(),)), y)

        h, how = torch.func.hessian(f)(flat0), "torch.func.hessian"
    else:
        h, how = HessianOperator(m64, F.cross_entropy, (x.double(), y)).dense(), "float64 HVP columns"
    w, u = torch.linalg.eigh(0.5 * (h + h.T))
    return w.numpy(), u.numpy(), how


def deflation_floor(w: np.ndarray, u: np.ndarray, kmax: int) -> np.ndarray:
    """``out[k]``: the variance of one Rademacher probe ``z^T R_k z`` of the residual ``R_k = A - U_k L_k U_k^T``
    after removing the ``k`` largest-magnitude eigenpairs exactly, ``2 (|R_k|_F^2 - sum_i R_k,ii^2)``, for
    ``k = 0 .. kmax`` (``out[0]`` is Hutchinson's variance).

    It is the best case for a deflated estimator that draws its probes apart from its sketch (Hutch++, the
    Krylov variant): it pays at least ``k`` products for a rank-``k`` subspace, whose residual is at best
    about that of the exact top-``k`` one (the subspace that removes the most Frobenius mass; the diagonal,
    which Rademacher probes do not see, makes this approximate), and then has at most ``m - k`` probes for
    the residual. So ``min_k out[k] / (m - k)`` bounds their variance at ``m`` products from below, to be set
    against Hutchinson's ``out[0] / (3 m)``. XTrace reuses its sketch vectors as probes, so for it the bound
    is a guide, not a proof.
    """
    order = np.argsort(-np.abs(w))
    w, u = w[order], u[:, order]
    kmax = min(kmax, len(w))
    sq = np.concatenate([[0.0], np.cumsum(w[:kmax] ** 2)])
    frob = float(np.sum(w ** 2)) - sq  # |R_k|_F^2
    diag = (u ** 2) @ w  # diag(A)
    diag_k = diag[:, None] - np.concatenate([np.zeros((len(w), 1)), np.cumsum((u[:, :kmax] ** 2) * w[:kmax], axis=1)],
                                            axis=1)
    return 2.0 * (frob - np.sum(diag_k ** 2, axis=0))


def attainable(floor: np.ndarray, m: int) -> tuple[float, int]:
    """The smallest error a deflated estimator with ``m`` products could have against Hutchinson with ``3 m``
    (a ratio of standard deviations; above 1 the target cannot be met at ``m``), and the best ``k``."""
    ks = np.arange(0, min(m, len(floor)))
    ratio = floor[ks] / (m - ks) / (floor[0] / (3 * m))
    best = int(np.argmin(ratio))
    return float(math.sqrt(max(ratio[best], 0.0))), int(ks[best])


class Counted:
    """Counts products of a callable operator."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, v):
        self.count += 1
        return self.fn(v)


def make_ops(model, x, y, have: dict) -> dict:
    """name -> (flat torch float32 vector -> flat product) for every implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    ops = {}
    ours = HessianOperator(model, F.cross_entropy, (x, y))
    ops["sgdlab"] = ours.matvec
    nocache = HessianOperator(model, F.cross_entropy, (x, y), cache_graph=False)
    ops["sgdlab (no graph cache)"] = nocache.matvec
    if "curvlinops" in have:
        a = have["curvlinops"].HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)],
                                                     check_deterministic=False)
        ops["curvlinops"] = lambda v, a=a: a @ v
        ops["_curvlinops_op"] = a
    if "eigenthings" in have:
        he = have["eigenthings"]
        op = he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy))
        ops["eigenthings"] = op.matvec
        ops["_eigenthings_op"] = op
    return ops


def time_hvps(ops: dict, dim: int, repeats: int, hvps: int) -> dict:
    names = [k for k in ops if not k.startswith("_")]
    v = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    for n in names:  # warm-up (builds cached graphs)
        ops[n](v)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            t0 = time.perf_counter()
            for _ in range(hvps):
                ops[n](v)
            times[n].append((time.perf_counter() - t0) / hvps)
    return {n: statistics.median(t) for n, t in times.items()}


def eig_errors(model, x, y, ops, top: float, k: int, seeds: int, have: dict) -> dict:
    errs: dict[str, list[float]] = {"sgdlab": [], "eigenthings": []}
    for seed in range(seeds):
        op = HessianOperator(model, F.cross_entropy, (x, y))
        # the start vector hessian-eigenthings draws for this seed, so both build the same Krylov space
        v0 = torch.randn(op.dim, dtype=torch.float32, generator=torch.Generator().manual_seed(seed))
        r = top_eigenvalues(op, k=1, max_iter=k, tol=0, seed=seed, v0=v0)
        assert r.num_matvecs == k
        errs["sgdlab"].append(abs(float(r.values[0]) - top) / abs(top))
        if "eigenthings" in have:
            res = have["eigenthings"].lanczos(ops["_eigenthings_op"], k=1, max_iter=k, which="LA", seed=seed)
            errs["eigenthings"].append(abs(float(res.eigenvalues[0]) - top) / abs(top))
    return {n: statistics.median(e) for n, e in errs.items() if e}


def eigsh_matched(model, x, y, ops, top: float, seeds: int) -> dict:
    """scipy's ARPACK eigsh on curvlinops' operator to tol 1e-6 (HVPs counted), and our Lanczos with the
    same number of HVPs: medians over seeds of both errors and of the count."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    lin = ops["_curvlinops_op"].to_scipy()
    e_cl, e_ours, counts = [], [], []
    for seed in range(seeds):
        counted = Counted(lin.matvec)
        wrapped = LinearOperator(lin.shape, matvec=counted, dtype=lin.dtype)
        v0 = np.random.default_rng(seed).standard_normal(lin.shape[0])
        val = eigsh(wrapped, k=1, which="LA", tol=1e-6, v0=v0, return_eigenvectors=False)[0]
        e_cl.append(abs(float(val) - top) / abs(top))
        counts.append(counted.count)
        r = top_eigenvalues(HessianOperator(model, F.cross_entropy, (x, y)), k=1, max_iter=counted.count,
                            tol=0, seed=seed, v0=torch.from_numpy(v0))
        e_ours.append(abs(float(r.values[0]) - top) / abs(top))
    return {"hvps": statistics.median(counts), "curvlinops+eigsh": statistics.median(e_cl),
            "sgdlab": statistics.median(e_ours)}


def trace_errors(model, x, y, ops, truth: float, m: int, seeds: int, have: dict) -> dict:
    """``_trace_errors`` on the model's Hessian (a fresh operator per seed), labelled for the HVP tables."""
    e = _trace_errors(lambda: HessianOperator(model, F.cross_entropy, (x, y)), ops.get("_curvlinops_op"),
                      ops.get("_eigenthings_op"), truth, m, seeds, have)
    def label(n: str) -> str:
        return f"{n} @{m}" if n in PEERS else f"sgdlab {n} @{3 * m if n == 'hutchinson' else m}"

    return {label(n): v for n, v in e.items()}


OURS = ("hutch++", "krylov", "xtrace")
PEERS = ("curvlinops hutch++", "eigenthings hutch++")


def _trace_errors(make_op, curvlinops_op, eigenthings_op, truth: float, m: int, seeds: int, have: dict) -> dict:
    """Mean relative trace error +- its standard error over ``seeds``: our estimators (``OURS``) at ``m``
    products on ``make_op()``, our Hutchinson at ``3 m``, and the peers' Hutch++ (``PEERS``) at ``m`` on their
    own operators, each peer that is installed and given one."""
    errs: dict[str, list[float]] = {}

    def add(name, value):
        errs.setdefault(name, []).append(abs(float(value) - truth) / abs(truth))

    for s in range(seeds):
        op = make_op()
        for method in OURS + ("hutchinson",):
            mm = 3 * m if method == "hutchinson" else m
            add(method, estimate_trace(op, method=method, num_matvecs=mm, seed=s).value)
        if "curvlinops" in have and curvlinops_op is not None and m % 3 == 0:
            torch.manual_seed(s)
            add(PEERS[0], have["curvlinops"].hutchpp_trace(curvlinops_op, m))
        if "eigenthings" in have and eigenthings_op is not None:
            add(PEERS[1], have["eigenthings"].hutch_plus_plus(eigenthings_op, num_matvecs=m, seed=s).estimate)
    return {n: (float(np.mean(e)), float(np.std(e, ddof=1) / math.sqrt(len(e))) if len(e) > 1 else math.inf)
            for n, e in errs.items()}


class Dense:
    """A dense float64 matrix as an operator for sgdlab's estimators (``matvec``, ``dim``, ``device``) and for
    hessian-eigenthings' (``size``, ``dtype``)."""

    def __init__(self, a: np.ndarray):
        self.a = torch.from_numpy(a)
        self.dim = self.size = a.shape[0]
        self.device, self.dtype = torch.device("cpu"), torch.float64

    def matvec(self, v):
        return self.a @ v.to(torch.float64)


def dense_trace_errors(a: np.ndarray, truth: float, m: int, seeds: int, have: dict) -> dict:
    """``_trace_errors`` on the dense matrix ``a``, for every estimator and peer (products are exact float64,
    so with many seeds the comparison is limited by the probes alone)."""
    op = Dense(a)
    return _trace_errors(lambda: op, op.a, op, truth, m, seeds, have)


def crossover(w: np.ndarray, u: np.ndarray, budgets: list[int], seeds: int, floor: np.ndarray,
              have: dict | None = None) -> None:
    """Our estimators at ``m`` products against Hutchinson at ``3 m`` and the peers' Hutch++ at ``m``, on the
    dense reference itself (float64, exact products), for budgets and seed counts beyond the HVP runs: where
    the targets start to hold, and how ours compare with the peers' when the probe noise is averaged down."""
    a = (u * w) @ u.T
    truth = float(w.sum())
    for m in budgets:
        if 3 * m > len(w):
            print(f"    m = {m}: 3m exceeds the dimension {len(w)}; skipped")
            continue
        row = dense_trace_errors(a, truth, m, seeds, have or {})
        h3 = row.pop("hutchinson")
        peer_rows = {k: row.pop(k) for k in PEERS if k in row}
        best, _ = attainable(floor, m)
        print(f"    m = {m}: hutchinson@{3 * m} {h3[0]:.2e} +- {h3[1]:.1e}; " + ", ".join(
            f"{k} {v:.2e} +- {se:.1e} ({_vs((v, se), h3)})" for k, (v, se) in row.items())
            + f"; best case {best:.2f}x", flush=True)
        for peer, pe in peer_rows.items():
            print(f"      {peer} {pe[0]:.2e} +- {pe[1]:.1e}; ours / theirs: " + ", ".join(
                f"{k} {_ratio(v, pe)} ({_vs(v, pe)})" for k, v in row.items()), flush=True)


def splits(w: np.ndarray, u: np.ndarray, budgets: list[int], seeds: int, shares: list[float],
           floor: np.ndarray | None = None) -> dict:
    """Our Hutch++ and Krylov variant on the dense reference with the budget split otherwise than by default:
    a share ``f`` of the ``m`` products goes to the low-rank part (Krylov: ``round(f m)`` Lanczos steps;
    Hutch++: ``round(f m / 2)`` sketch vectors, each costing two products) and the rest to probes. Prints, and
    returns as ``{m: {(method, share): (ratio, its standard error)}}``, each mean error over Hutchinson@3m's
    with the delta-method interval of :func:`_ratio`. Asks whether a split other than the default (Hutch++
    2/3, Krylov 1/2) would meet the first trace target where the default does not."""
    a = (u * w) @ u.T
    truth = float(w.sum())
    op = Dense(a)
    out: dict = {}
    for m in budgets:
        if 3 * m > len(w):
            print(f"    m = {m}: 3m exceeds the dimension {len(w)}; skipped")
            continue
        errs: dict = {}
        for s in range(seeds):
            errs.setdefault("h3", []).append(estimate_trace(op, method="hutchinson", num_matvecs=3 * m, seed=s).value)
            for f in shares:
                for method, k in (("krylov", round(f * m)), ("hutch++", round(f * m / 2))):
                    if 1 <= k <= {"krylov": m - 2, "hutch++": (m - 2) // 2}[method]:
                        v = estimate_trace(op, method=method, num_matvecs=m, seed=s, sketch=k).value
                        errs.setdefault((method, f), []).append(v)
        stats = {key: (float(np.mean(np.abs(np.subtract(v, truth)))) / abs(truth),
                       float(np.std(np.abs(np.subtract(v, truth)), ddof=1) / math.sqrt(len(v))) / abs(truth))
                 for key, v in errs.items()}
        h3 = stats.pop("h3")
        out[m] = {}
        for key, (mean, se) in stats.items():
            r = mean / h3[0]
            out[m][key] = (r, r * math.hypot(se / mean, h3[1] / h3[0]))
        best = f"; best case {attainable(floor, m)[0]:.2f}x" if floor is not None and len(floor) >= m else ""
        print(f"    m = {m}: hutchinson@{3 * m} {h3[0]:.2e} +- {h3[1]:.1e}{best}; error / Hutchinson@3m by the "
              "share of products on the sketch:", flush=True)
        for method in ("krylov", "hutch++"):
            print(f"      {method}: " + ", ".join(f"{f:g} {_ratio(stats[(mm, f)], h3)}" for mm, f in stats if mm == method),
                  flush=True)
    return out


def _ratio(ours: tuple[float, float], other: tuple[float, float]) -> str:
    """The ratio of two mean errors with a 95% interval (delta method on independent means)."""
    r = ours[0] / other[0]
    se = r * math.hypot(ours[1] / ours[0], other[1] / other[0])
    return f"{r:.2f} [{r - 1.96 * se:.2f}, {r + 1.96 * se:.2f}]"


def _vs(ours: tuple[float, float], other: tuple[float, float]) -> str:
    """'ok' when our mean error is at most the other's; 'NOT met' when it is larger by more than twice the
    standard error of the difference; 'within noise' otherwise (the seeds cannot rank the two)."""
    if ours[0] <= other[0]:
        return "ok"
    return "NOT met" if ours[0] - other[0] > 2 * math.hypot(ours[1], other[1]) else "within noise"


def tiny_gpt2(n: int, seed: int = 0):
    """A tiny GPT2LMHeadModel (2 layers, width 16, vocabulary 50, sdpa attention) and a dict batch of ``n``
    sequences of 8 tokens, the last two of every other sequence not counted (label -100)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[::2, -2:] = -100
    return model, {"input_ids": ids, "labels": labels}


class _LMLogits(nn.Module):
    """``input_ids -> logits`` around a Hugging Face causal LM (curvlinops calls ``model(X)``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


class _CausalLMLoss(nn.Module):
    reduction = "mean"  # curvlinops weights batches by their share of the examples, as we do

    def forward(self, logits, labels):
        return causal_lm_loss(logits, labels)


def gpt2_ops(model, batch, have: dict) -> dict:
    """Hessian products on the tiny GPT-2: ours on the model and dict batch as they are, curvlinops on a
    logits wrapper under the math attention kernel."""
    ops = {"sgdlab": HessianOperator(model, causal_lm_loss, batch).matvec,
           "sgdlab (no graph cache)": HessianOperator(model, causal_lm_loss, batch, cache_graph=False).matvec}
    if "curvlinops" in have:
        wrapped = _LMLogits(model)
        with differentiable_attention():
            a = have["curvlinops"].HessianLinearOperator(
                wrapped, _CausalLMLoss(), [p for p in wrapped.parameters()],
                [(batch["input_ids"], batch["labels"])], check_deterministic=False)

        def theirs(v, a=a):
            with differentiable_attention():
                return a @ v

        ops["curvlinops"] = theirs
    return ops


def gpt2_case(args, have: dict) -> None:
    model, batch = tiny_gpt2(min(args.examples, 64))
    dim = sum(p.numel() for p in model.parameters())
    print(f"\ngpt2 (tiny GPT2LMHeadModel, sdpa): {dim} parameters, {batch['input_ids'].shape[0]} sequences of 8 "
          "tokens, causal-LM loss")
    ops = gpt2_ops(model, batch, have)
    times = time_hvps(ops, dim, args.repeats, args.hvps)
    print("  time per HVP (median of interleaved rounds): " + ", ".join(
        f"{n} {1e3 * t:.2f} ms" for n, t in times.items()))
    if "curvlinops" in times:
        print(f"    ratio sgdlab / curvlinops: {times['sgdlab'] / times['curvlinops']:.2f} (cached graph), "
              f"{times['sgdlab (no graph cache)'] / times['curvlinops']:.2f} (no cache)")
        v = torch.randn(dim, generator=torch.Generator().manual_seed(2))
        ours, theirs = ops["sgdlab"](v).float(), ops["curvlinops"](v)
        print(f"    relative difference of the products |ours - curvlinops| / |ours|: "
              f"{float((ours - theirs).norm() / ours.norm()):.2e} (float32)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn-bn,cnn1d")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--hvps", type=int, default=5)
    p.add_argument("--eig-budgets", default="5,10")
    p.add_argument("--trace-budgets", default="30,90")
    p.add_argument("--dense-max", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", default="time,eig,trace",
                   help="which comparisons to run: time, eig, trace, and crossover (our trace estimators on the "
                        "dense reference at --crossover-budgets; needs a reference computed in this run), and "
                        "split (their error against the share of products spent on the sketch, --split-shares)")
    p.add_argument("--crossover-budgets", default="30,90,150,300,450")
    p.add_argument("--split-shares", default="0.1,0.2,0.3,0.4,0.5,0.67")
    p.add_argument("--reference-cache", help="file prefix to keep the dense reference spectra between runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    have = peers()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.examples} examples in one batch, float32 models, {args.threads} thread(s), load average "
          f"{load:.1f} at the start (figures taken under that load); errors relative to a dense reference")
    kmax = max(int(b) for b in args.trace_budgets.split(","))
    crossover_budgets = [int(b) for b in args.crossover_budgets.split(",")]
    parts = set(args.parts.split(","))
    for name in args.models.split(","):
        if name == "gpt2":
            gpt2_case(args, have)
            continue
        model, x, y = build(name, args.examples)
        dim = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        cache = f"{args.reference_cache}.{name}.{args.examples}.npy" if args.reference_cache else None
        if cache and os.path.exists(cache):
            ev, vecs, how = np.load(cache), None, f"cached in {cache}"
            floor = np.load(cache[:-4] + ".floor.npy") if os.path.exists(cache[:-4] + ".floor.npy") else None
        else:
            ev, vecs, how = dense_reference(model, x, y, args.dense_max)
            floor = deflation_floor(ev, vecs, max(kmax, *crossover_budgets))
            if cache:
                np.save(cache, ev)
                np.save(cache[:-4] + ".floor.npy", floor)
        top, tr = float(ev[-1]), float(ev.sum())
        print(f"\n{name}: {dim} parameters; reference ({how}, {time.perf_counter() - t0:.0f} s): "
              f"top eigenvalue {top:.6g}, trace {tr:.6g}")
        if "crossover" in parts:
            if vecs is None:
                print("  crossover: needs the dense reference computed in this run (not a cached one); skipped")
            else:
                print(f"  trace error on the dense reference (exact float64 products), mean +- standard error over "
                      f"{args.seeds} seeds, each against Hutchinson@3m:")
                crossover(ev, vecs, crossover_budgets, args.seeds, floor, have)
        if "split" in parts:
            if vecs is None:
                print("  split: needs the dense reference computed in this run (not a cached one); skipped")
            else:
                print(f"  trace error by sketch share on the dense reference, {args.seeds} seeds:")
                splits(ev, vecs, crossover_budgets, args.seeds, [float(f) for f in args.split_shares.split(",")],
                       floor)
        vecs = None
        if not parts & {"time", "eig", "trace"}:
            continue
        ops = make_ops(model, x, y, have)
        times = time_hvps(ops, dim, args.repeats, args.hvps) if "time" in parts else {}
        peer_times = [t for n, t in times.items() if n in ("curvlinops", "eigenthings")]
        fastest = min(peer_times) if peer_times else float("nan")
        if times:
            print("  time per HVP (median of interleaved rounds): " + ", ".join(
                f"{n} {1e3 * t:.2f} ms" for n, t in times.items()))
        if peer_times:
            print(f"    ratio sgdlab / faster peer: {times['sgdlab'] / fastest:.2f} (cached graph), "
                  f"{times['sgdlab (no graph cache)'] / fastest:.2f} (no cache)  [target <= 1.0]")
        for k in (int(b) for b in args.eig_budgets.split(",") if "eig" in parts):
            e = eig_errors(model, x, y, ops, top, k, args.seeds, have)
            extra = ""
            peers_e = [v for n, v in e.items() if n != "sgdlab"]
            verdict = "" if not peers_e else \
                f"  [{'ok' if e['sgdlab'] <= min(peers_e) + FLOOR else 'NOT met'}: ours <= peers' + {FLOOR:.0e}]"
            print(f"  top eigenvalue, median relative error at {k} HVPs: " + ", ".join(
                f"{n} {v:.2e}" for n, v in e.items()) + extra + verdict)
        if "curvlinops" in have and "eig" in parts:
            e = eigsh_matched(model, x, y, ops, top, args.seeds)
            print(f"  top eigenvalue at eigsh's own budget ({e['hvps']:.0f} HVPs to tol 1e-6): curvlinops+eigsh "
                  f"{e['curvlinops+eigsh']:.2e}, sgdlab {e['sgdlab']:.2e}  "
                  f"[{'ok' if e['sgdlab'] <= e['curvlinops+eigsh'] + FLOOR else 'NOT met'}: ours <= peer's + "
                  f"{FLOOR:.0e}]")
        for m in (int(b) for b in args.trace_budgets.split(",") if "trace" in parts):
            e = trace_errors(model, x, y, ops, tr, m, args.seeds, have)
            ours = {k: e[f"sgdlab {k} @{m}"] for k in ("hutch++", "xtrace", "krylov")}
            h3 = e[f"sgdlab hutchinson @{3 * m}"]
            checks = [f"{k} <= hutchinson@3m: {_vs(ours[k], h3)}" for k in ours]
            # each peer on its own: the smallest of several equally noisy means is biased low, so "ours <=
            # the best of two peers running the same algorithm" would fail two times in three by chance
            for peer in (n for n in e if "hutch++" in n and not n.startswith("sgdlab")):
                checks += [f"{k} <= {peer.split()[0]}: {_vs(ours[k], e[peer])}" for k in ours]
            print(f"  trace, mean relative error +- its standard error over {args.seeds} seeds: " + ", ".join(
                f"{n} {v:.2e} +- {se:.1e}" for n, (v, se) in e.items()) + "  [" + "; ".join(checks) + "]",
                flush=True)
            if floor is not None and len(floor) > m - 1:
                r, k = attainable(floor, m)
                beyond = "  (the target cannot be met at this budget in expectation; an ok above is seed noise)"
                print(f"    best case for any deflated estimator at {m} HVPs (exact top-{k} eigenvectors, "
                      f"{m - k} probes): {r:.2f}x Hutchinson@3m's standard deviation{beyond if r > 1 else ''}")


if __name__ == "__main__":
    main()
