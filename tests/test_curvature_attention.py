"""Curvature of attention models: Hessian and GGN products through scaled_dot_product_attention, the
torch.nn attention fast path, Hugging Face ModelOutputs and dict batches, against dense float64
references and curvlinops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdlab.analysis import (
    GGNOperator,
    HessianOperator,
    causal_lm_loss,
    curvature_blocks,
    differentiable_attention,
    hessian_eigen,
    hessian_trace,
    hf_loss,
    model_sharpness,
)
from sgdlab.analysis.estimators import rademacher

transformers = pytest.importorskip("transformers")


class Encoder(nn.Module):
    """Embedding, one nn.TransformerEncoderLayer (sdpa inside nn.MultiheadAttention), mean pool, head."""

    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.layer(self.emb(x)).mean(1))


def encoder_case(n: int = 8):
    torch.manual_seed(0)
    model = Encoder().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 20, (n, 6), generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return model, x, y


def tiny_gpt2(impl: str = "sdpa"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=6, n_embd=8, n_layer=1, n_head=2, n_inner=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0, attn_implementation=impl)
    return transformers.GPT2LMHeadModel(cfg).double()


def lm_batch(n: int = 4):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (n, 6), generator=gen)
    labels = ids.clone()
    labels[0, 4:] = -100  # sequences with different numbers of counted tokens
    labels[2, 1] = -100
    return {"input_ids": ids, "labels": labels}


def dense_hessian(fn, model: nn.Module) -> torch.Tensor:
    """The float64 Hessian of ``fn(params_dict)`` by jacrev of grad (every column an exact product)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])

    def f(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            ps[n] = flat[i:i + k].view(s)
            i += k
        return fn(ps)

    return torch.func.jacrev(torch.func.grad(f))(flat0)


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def same_probe_hutchinson(h: torch.Tensor, m: int, seed: int = 0) -> float:
    """Hutchinson's estimate on the dense matrix with the probes our estimator draws for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return sum(float(z @ h @ z) for z in (rademacher(h.shape[0], gen) for _ in range(m))) / m


def gpt2_reference():
    model, batch = tiny_gpt2("sdpa").eval(), lm_batch()
    eager = tiny_gpt2("eager").eval()
    eager.load_state_dict(model.state_dict())
    inputs = {"input_ids": batch["input_ids"]}
    h = dense_hessian(lambda ps: causal_lm_loss(
        torch.func.functional_call(eager, ps, (), inputs).logits, batch["labels"]), eager)
    return model, batch, h


def encoder_reference():
    model, x, y = encoder_case()
    data = [(x[:5], y[:5]), (x[5:], y[5:])]

    def loss(ps):
        return sum(F.cross_entropy(torch.func.functional_call(model, ps, (xb,)), yb) * len(yb) / len(y)
                   for xb, yb in data)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        h = dense_hessian(loss, model.eval())
    return model, data, h


def test_gpt2_sdpa_hessian_top_eigenvalue_and_trace_equal_the_dense_hessian():
    """A tiny GPT2LMHeadModel with sdpa attention, a dict batch and the causal-LM loss: the Lanczos top
    eigenvalue equals that of the dense float64 Hessian of the same weights run with eager attention (an
    independent attention implementation) to 1e-6 relative, and Hutchinson's trace with our probes equals
    the dense matrix's with the same probes."""
    model, batch, h = gpt2_reference()
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(h, h.T, atol=1e-10)
    w = torch.linalg.eigvalsh(h)
    model.train()  # the diagnostics switch to eval mode and restore the mode
    res = hessian_eigen(model, causal_lm_loss, batch, tol=1e-8, max_iter=300)
    assert model.training
    assert res.converged.all()
    assert rel(res.values[0], w[-1]) < 1e-6
    tr = hessian_trace(model, causal_lm_loss, batch, num_samples=10, seed=5)
    assert rel(tr, same_probe_hutchinson(h, 10, seed=5)) < 1e-9
    # the same with hf_loss picking the loss, and with the batch split in two: an average over sequences
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    assert hf_loss(model) is causal_lm_loss
    v = torch.randn(h.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hv = HessianOperator(model, hf_loss(model), halves).matvec(v)
    assert torch.allclose(hv, h @ v, rtol=0, atol=1e-10 * float((h @ v).abs().max()))


def test_encoder_layer_hessian_top_eigenvalue_and_trace_equal_the_dense_hessian():
    """nn.TransformerEncoderLayer (nn.MultiheadAttention calls scaled_dot_product_attention), two batches of
    unequal size: the top eigenvalue equals the dense float64 Hessian's to 1e-6 relative, Hutchinson with
    our probes equals the dense matrix's, and a block's exact trace is the trace of its diagonal block."""
    model, data, h = encoder_reference()
    w = torch.linalg.eigvalsh(h)
    res = hessian_eigen(model, F.cross_entropy, data, tol=1e-8, max_iter=300)
    assert res.converged.all() and rel(res.values[0], w[-1]) < 1e-6
    tr = hessian_trace(model, F.cross_entropy, data, num_samples=6, seed=1)
    assert rel(tr, same_probe_hutchinson(h, 6, seed=1)) < 1e-9
    # curvature_blocks: the head block's trace (exact: 27 parameters) is the trace of its diagonal block
    names = [n for n, _ in model.named_parameters()]
    start = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head"))
    assert names[-2:] == ["head.weight", "head.bias"]
    table = curvature_blocks(model, F.cross_entropy, data, blocks={"head": "head"}, include_total=False)
    assert rel(table.rows[0].trace.value, h[start:, start:].trace()) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2", "encoder"])
def test_exact_trace_equals_the_dense_hessian(case):
    """The exact trace (one product per parameter) equals the dense float64 Hessian's to 1e-6 relative."""
    if case == "gpt2":
        model, data, h = gpt2_reference()
        loss = causal_lm_loss
    else:
        model, data, h = encoder_reference()
        loss = F.cross_entropy
    assert rel(hessian_trace(model, loss, data, method="exact"), h.trace()) < 1e-6


def test_fast_path_is_off_and_the_flags_are_restored(monkeypatch):
    """In eval mode with nothing upstream requiring grad, nn.TransformerEncoderLayer takes its fused fast
    path (torch._transformer_encoder_layer_fwd, no forward-mode or double derivative). Under the
    diagnostics it is never called, and the global attention flags are restored afterwards."""
    model, x, y = encoder_case()
    for p in [*model.emb.parameters(), *model.layer.parameters()]:
        p.requires_grad_(False)

    def fused(*args, **kwargs):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)
    model.eval()
    with pytest.raises(AssertionError, match="fast path taken"):
        model(x)  # the fast path is taken here
    flash = torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.mha.get_fastpath_enabled()
    op = HessianOperator(model, F.cross_entropy, (x, y))
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = op.matvec(v)
    assert torch.backends.mha.get_fastpath_enabled() and torch.backends.cuda.flash_sdp_enabled() == flash
    # the head is linear in its block and the loss is cross-entropy: H = GGN on the head
    assert torch.allclose(GGNOperator(model, F.cross_entropy, (x, y)).matvec(v), hv, atol=1e-12)
    with differentiable_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()


def test_multihead_attention_and_bert_products_run_and_are_symmetric():
    """nn.MultiheadAttention inside a model and a tiny BERT sequence classifier (sdpa) with a dict batch:
    Hessian and GGN products run (no "derivative ... not implemented") and are symmetric, u.Hv = v.Hu."""
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=8, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(cfg).double()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 20, (4, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    assert hf_loss(bert) is not causal_lm_loss
    for kind in (HessianOperator, GGNOperator):
        op = kind(bert, hf_loss(bert), batch)
        u, v = (torch.randn(op.dim, dtype=torch.float64, generator=gen) for _ in range(2))
        a, b = float(u @ op.matvec(v)), float(v @ op.matvec(u))
        assert abs(a - b) < 1e-10 * max(abs(a), 1.0)


def _agree_with_curvlinops(model, data, curvature: str) -> None:
    """Top eigenvalue (scipy eigsh on curvlinops' operator) and Hutchinson trace with our probe vectors:
    ours and curvlinops' agree to 1e-6 relative."""
    curvlinops = pytest.importorskip("curvlinops")
    from scipy.sparse.linalg import eigsh

    from sgdlab.analysis import estimate_trace

    ours = (GGNOperator if curvature == "ggn" else HessianOperator)(model, F.cross_entropy, data)
    params = [p for p in model.parameters()]
    kind = curvlinops.GGNLinearOperator if curvature == "ggn" else curvlinops.HessianLinearOperator
    with differentiable_attention():  # curvlinops needs the math kernel and the fast path off too
        theirs = kind(model.eval(), nn.CrossEntropyLoss(), params, data)
        top_theirs = float(eigsh(theirs.to_scipy(), k=1, which="LA", tol=1e-10)[0][0])
        gen = torch.Generator().manual_seed(0)
        probes = [rademacher(ours.dim, gen) for _ in range(8)]
        hutch_theirs = sum(float(z @ (theirs @ z)) for z in probes) / len(probes)
    res = hessian_eigen(model, F.cross_entropy, data, curvature=curvature, tol=1e-8, max_iter=300)
    assert rel(res.values[0], top_theirs) < 1e-6
    est = estimate_trace(ours, method="hutchinson", num_matvecs=8, seed=0)  # the same probes, same order
    assert rel(est.value, hutch_theirs) < 1e-6


def test_ggn_and_hutchinson_agree_with_curvlinops_on_the_encoder():
    """curvlinops' GGN on the same float64 transformer and data agrees with ours (top eigenvalue and
    Hutchinson trace with the same probes, 1e-6 relative)."""
    model, x, y = encoder_case()
    _agree_with_curvlinops(model, [(x[:5], y[:5]), (x[5:], y[5:])], "ggn")


def test_hessian_and_hutchinson_agree_with_curvlinops_on_an_encoder_without_norm_weights():
    """curvlinops' Hessian on a float64 transformer whose LayerNorms carry no weights agrees with ours (top
    eigenvalue and Hutchinson trace with the same probes, 1e-6 relative). With learned LayerNorm weights
    curvlinops' Hessian product (torch.func's jvp of jacrev) is not even symmetric, while ours equals the
    dense double-backward Hessian (the tests above), so that case is not a reference; see curvature.md."""
    model, x, y = encoder_case()
    model.layer.norm1 = nn.LayerNorm(8, elementwise_affine=False).double()
    model.layer.norm2 = nn.LayerNorm(8, elementwise_affine=False).double()
    _agree_with_curvlinops(model, [(x[:5], y[:5]), (x[5:], y[5:])], "hessian")


def test_causal_lm_loss_is_the_mean_over_sequences_of_counted_tokens():
    """causal_lm_loss by hand (shift, -100 not counted, per-sequence mean, then the mean over sequences);
    equal to Hugging Face's own loss when every sequence has the same number of counted tokens."""
    model, batch = tiny_gpt2().eval(), lm_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        per_seq = []
        for z, lab in zip(logits, batch["labels"]):
            terms = [F.cross_entropy(z[t], lab[t + 1]) for t in range(5) if lab[t + 1] != -100]
            per_seq.append(sum(terms) / len(terms))
        by_hand = torch.stack(per_seq).mean()
        assert torch.allclose(causal_lm_loss(logits, batch["labels"]), by_hand, atol=1e-12)
        full = batch["input_ids"]
        hf = model(input_ids=full, labels=full).loss  # Hugging Face computes it in float32
        assert float(causal_lm_loss(logits, full)) == pytest.approx(float(hf), rel=1e-6)
    with pytest.raises(ValueError, match="causal_lm_loss"):
        causal_lm_loss(logits[:, :, 0], batch["labels"])


def test_dict_batches_and_model_outputs_in_sharpness_and_errors():
    """A dict batch into model_sharpness gives the value of the same model called on tensors; a dict
    without labels and a model output without logits are refused with a one-line error."""
    model, batch = tiny_gpt2(), lm_batch()

    class Wrapped(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    a = model_sharpness(model, causal_lm_loss, batch, subspace_dim=3, max_iter=3)
    b = model_sharpness(Wrapped(model), causal_lm_loss, (batch["input_ids"], batch["labels"]),
                        subspace_dim=3, max_iter=3)
    assert a == pytest.approx(b, rel=1e-9) and a > 0
    with pytest.raises(ValueError, match="'labels'"):
        HessianOperator(model, causal_lm_loss, {"input_ids": batch["input_ids"]})

    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"hidden": self.lin(x)}

    with pytest.raises(ValueError, match="logits"):
        data = (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
        HessianOperator(NoLogits(), F.cross_entropy, data).matvec(torch.ones(8))
    with pytest.raises(ValueError, match="hf_loss"):
        hf_loss(nn.Linear(2, 2))


def test_benchmark_gpt2_case_builds_matching_products():
    """benchmarks/curvature.py's tiny GPT-2 case: our cached and uncached products agree, and the wrapper
    handed to curvlinops gives the model's logits and our loss."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "curvature.py"
    spec = importlib.util.spec_from_file_location("bench_curvature_gpt2", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, batch = bench.tiny_gpt2(2)
    assert (batch["labels"][0, -2:] == -100).all() and (batch["labels"][1] != -100).all()
    ops = bench.gpt2_ops(model, batch, {})
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0))
    a, b = ops["sgdlab"](v), ops["sgdlab (no graph cache)"](v)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    with torch.no_grad():
        logits = bench._LMLogits(model)(batch["input_ids"])
        assert torch.equal(logits, model(input_ids=batch["input_ids"]).logits)
        labels = batch["labels"]
        assert torch.equal(bench._CausalLMLoss()(logits, labels), causal_lm_loss(logits, labels))


def test_an_op_without_second_derivative_is_named_with_a_hint():
    """A model calling the fused CPU flash kernel directly (no math fallback possible): the error keeps
    autograd's message and says what to try."""

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            q = self.q(x).unsqueeze(1)
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0]
            return self.head(out.squeeze(1).mean(1))

    x, y = torch.randn(3, 5, 4), torch.tensor([0, 1, 0])
    op = HessianOperator(Fused(), F.cross_entropy, (x, y))
    with pytest.raises(RuntimeError, match="not implemented.*attn_implementation='eager'"):
        op.matvec(torch.ones(op.dim))


def test_attention_flags_are_held_until_the_last_block_closes_in_any_thread():
    """A background monitor's check and a foreground diagnostic may overlap: the flags are set while any
    block is open and restored only when the last one closes, whichever thread opened it first."""
    import threading

    fast = torch.backends.mha.get_fastpath_enabled()
    entered, release = threading.Event(), threading.Event()

    def other():
        with differentiable_attention():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with differentiable_attention():
        t.start()
        assert entered.wait(10)
    # this thread's block closed first; the other thread's is still open
    assert not torch.backends.mha.get_fastpath_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    release.set()
    t.join(10)
    assert torch.backends.mha.get_fastpath_enabled() == fast and torch.backends.cuda.math_sdp_enabled()
