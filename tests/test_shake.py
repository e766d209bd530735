"""Shake-Shake op (Gastaldi 2017, eq. 2, section 2.1.2, Table 4): exact forward/backward semantics."""

import math

import pytest
import torch

from sgdlab.regularize import Shake, shake
from sgdlab.regularize.shake import draw_coefficients

N = 256  # enough examples that a < 0.5 and a >= 0.5 both occur (prob. of failure ~ 2**-255)


def _run(forward="shake", backward="shake", level="image", rule=None, alpha_range=(0.0, 1.0), seed=0,
         shape=(N, 3, 4)):
    """Return (a, b) recovered from the forward value and the gradients, per element (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_()
    x2 = (torch.randn(shape, dtype=torch.float64, generator=gen) + 5.0).requires_grad_()  # x1 - x2 far from 0
    g = torch.randn(shape, dtype=torch.float64, generator=gen)
    out = shake(x1, x2, forward=forward, backward=backward, level=level, rule=rule, alpha_range=alpha_range,
                training=True, generator=gen)
    out.backward(g)
    a = ((out - x2) / (x1 - x2)).detach()
    b1 = x1.grad / g
    b2 = 1.0 - x2.grad / g
    torch.testing.assert_close(b1, b2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x1.grad + x2.grad, g, rtol=1e-12, atol=1e-12)
    return a, b1


def _per_example(t, level):
    """Check the coefficient is constant within each example (image) or overall (batch); return it."""
    flat = t.reshape(t.shape[0], -1)
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat), rtol=1e-9, atol=1e-9)
    c = flat[:, 0]
    if level == "batch":
        torch.testing.assert_close(c, c[:1].expand_as(c), rtol=1e-9, atol=1e-9)
    return c


@pytest.mark.parametrize("level", ["image", "batch"])
@pytest.mark.parametrize("forward", ["shake", "even"])
@pytest.mark.parametrize("backward", ["shake", "even", "keep"])
def test_modes_forward_value_and_gradients(forward, backward, level):
    a, b = _run(forward, backward, level)
    a, b = _per_example(a, level), _per_example(b, level)
    assert ((a >= 0) & (a <= 1)).all() and ((b >= 0) & (b <= 1)).all()
    if forward == "even":
        torch.testing.assert_close(a, torch.full_like(a, 0.5))
    elif level == "image":
        assert a.unique().numel() == N  # one fresh coefficient per example
    if backward == "even":
        torch.testing.assert_close(b, torch.full_like(b, 0.5))
    elif backward == "keep":
        torch.testing.assert_close(b, a)
    elif level == "image":
        assert b.unique().numel() == N
        if forward == "shake":
            assert (a - b).abs().max() > 0.1  # independent draws


def test_image_level_coefficient_statistics():
    # a ~ U(0,1), b ~ U(0,1) independent: mean 1/2 (SE = sqrt(1/12/n)), corr ~ 0 (SE = 1/sqrt(n))
    a, b = _run("shake", "shake", "image", shape=(4000, 2))
    a, b = a[:, 0], b[:, 0]
    se = math.sqrt(1 / 12 / 4000)
    assert abs(a.mean().item() - 0.5) < 5 * se
    assert abs(b.mean().item() - 0.5) < 5 * se
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(4000)


def test_alpha_range_is_respected():
    lo, hi = 0.4, 0.6
    a, b = _run("shake", "shake", "image", alpha_range=(lo, hi), shape=(2000, 2))
    a, b = a[:, 0], b[:, 0]
    assert a.min() >= lo - 1e-12 and a.max() <= hi + 1e-12
    assert b.min() >= lo - 1e-12 and b.max() <= hi + 1e-12
    assert a.min() < lo + 0.01 and a.max() > hi - 0.01  # fills the range
    # degenerate range: constant coefficient
    a, b = _run("shake", "shake", "image", alpha_range=(0.3, 0.3))
    torch.testing.assert_close(a, torch.full_like(a, 0.3))
    torch.testing.assert_close(b, torch.full_like(b, 0.3))


RULE_BOUNDS = {  # Table 4: (low, high) of b given a, for a < 0.5 and a >= 0.5
    "M2": (lambda a: (0 * a, a), lambda a: (a, 1 + 0 * a)),
    "M3": (lambda a: (a, 0.5 + 0 * a), lambda a: (0.5 + 0 * a, a)),
    "M4": (lambda a: (0.5 + 0 * a, 1 - a), lambda a: (1 - a, 0.5 + 0 * a)),
    "M5": (lambda a: (1 - a, 1 + 0 * a), lambda a: (0 * a, 1 - a)),
}


@pytest.mark.parametrize("level", ["image", "batch"])
@pytest.mark.parametrize("rule", ["M1", "M2", "M3", "M4", "M5"])
def test_table4_rules(rule, level):
    seeds = range(1) if level == "image" else range(40)  # batch level: one a per draw, repeat
    seen_low = seen_high = False
    for seed in seeds:
        a, b = _run("shake", "shake", level, rule=rule, seed=seed)
        a, b = _per_example(a, level), _per_example(b, level)
        if rule == "M1":
            torch.testing.assert_close(b, 1 - a)
            seen_low |= bool((a < 0.5).any())
            seen_high |= bool((a >= 0.5).any())
            continue
        low = a < 0.5
        for mask, bounds in ((low, RULE_BOUNDS[rule][0]), (~low, RULE_BOUNDS[rule][1])):
            if mask.any():
                lo, hi = bounds(a[mask])
                assert (b[mask] >= lo - 1e-9).all() and (b[mask] <= hi + 1e-9).all()
        seen_low |= bool(low.any())
        seen_high |= bool((~low).any())
        if level == "image":
            # b fills its interval: u = (b - lo) / (hi - lo) ~ U(0, 1), mean 1/2
            lo_l, hi_l = RULE_BOUNDS[rule][0](a)
            lo_h, hi_h = RULE_BOUNDS[rule][1](a)
            lo_all = torch.where(low, lo_l, lo_h)
            hi_all = torch.where(low, hi_l, hi_h)
            u = (b - lo_all) / (hi_all - lo_all)
            assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / N)
    assert seen_low and seen_high


def test_rule_overrides_backward():
    a, b = _run("shake", "even", "image", rule="M1")
    torch.testing.assert_close(b, 1 - a)


def test_eval_averages_and_module_form():
    x1 = torch.randn(8, 5, requires_grad=True)
    x2 = torch.randn(8, 5, requires_grad=True)
    out = shake(x1, x2, training=False)
    torch.testing.assert_close(out, 0.5 * (x1 + x2))
    out.sum().backward()
    torch.testing.assert_close(x1.grad, torch.full_like(x1, 0.5))
    torch.testing.assert_close(x2.grad, torch.full_like(x2, 0.5))
    m = Shake()
    m.eval()
    torch.testing.assert_close(m(x1, x2), 0.5 * (x1 + x2))
    m.train()
    y = m(x1, x2)
    assert not torch.allclose(y, 0.5 * (x1 + x2))
    a = ((y - x2) / (x1 - x2)).detach()
    assert ((a > -1e-4) & (a < 1 + 1e-4)).all()


def test_generator_reproducible_and_global_rng():
    x1, x2 = torch.randn(16, 4), torch.randn(16, 4)
    y1 = shake(x1, x2, training=True, generator=torch.Generator().manual_seed(3))
    y2 = shake(x1, x2, training=True, generator=torch.Generator().manual_seed(3))
    y3 = shake(x1, x2, training=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.allclose(y1, y3)
    torch.manual_seed(5)
    z1 = shake(x1, x2, training=True)
    torch.manual_seed(5)
    z2 = shake(x1, x2, training=True)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


def test_gradcheck_style_jacobians_float64():
    # With backward="keep" the op is an ordinary differentiable function: gradcheck must pass.
    x1 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def keep(u, v):
        return shake(u, v, backward="keep", training=True, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(keep, (x1, x2))
    assert torch.autograd.gradgradcheck(keep, (x1, x2))

    # With backward="shake" the analytical Jacobian is b*I / (1-b)*I and the numerical one (of the
    # forward value) a*I / (1-a)*I, with a, b the coefficients the same generator state draws.
    def ss(u, v):
        return shake(u, v, training=True, generator=torch.Generator().manual_seed(0))

    a, b = draw_coefficients(x1, generator=torch.Generator().manual_seed(0))
    a, b = a.reshape(-1), b.reshape(-1)
    j1, j2 = torch.autograd.functional.jacobian(ss, (x1, x2))
    eye = torch.eye(6, dtype=torch.float64).reshape(3, 2, 3, 2)
    rows = torch.arange(3).repeat_interleave(2)
    torch.testing.assert_close(j1, eye * b[rows].reshape(3, 2, 1, 1))
    torch.testing.assert_close(j2, eye * (1 - b[rows]).reshape(3, 2, 1, 1))
    eps = 1e-6
    for i in range(3):
        d = torch.zeros_like(x1)
        d[i] = eps
        num = (ss(x1 + d, x2) - ss(x1 - d, x2)) / (2 * eps)
        torch.testing.assert_close(num[i], torch.full((2,), a[i].item(), dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    x = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h1, h2 = lin1(x), lin2(x)
        assert h1.dtype == torch.bfloat16
        out = shake(h1, h2, training=True, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.isfinite(lin1.weight.grad).all() and lin1.weight.grad.abs().sum() > 0
    a, _ = draw_coefficients(h1, generator=torch.Generator().manual_seed(1))
    ref = a * h1.float() + (1 - a) * h2.float()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    # direct low-precision inputs
    y = shake(torch.randn(4, 3, dtype=torch.bfloat16), torch.randn(4, 3, dtype=torch.bfloat16), training=True)
    assert y.dtype == torch.bfloat16


def test_torch_compile_traces_shake():
    torch._dynamo.reset()

    def f(u, v):
        return shake(u, v, level="image", training=True).square().sum()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    x1 = torch.randn(6, 3, requires_grad=True)
    x2 = torch.randn(6, 3, requires_grad=True)
    cf(x1, x2).backward()
    assert torch.isfinite(x1.grad).all() and x1.grad.abs().sum() > 0
    # gradients still split g between the inputs
    x1.grad = x2.grad = None
    out_c = torch.compile(lambda u, v: shake(u, v, training=True), backend="aot_eager")(x1, x2)
    g = torch.randn_like(out_c)
    out_c.backward(g)
    torch.testing.assert_close(x1.grad + x2.grad, g)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    cf = torch.compile(lambda u, v: shake(u, v, rule="M3", training=True))
    x1 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    x2 = (torch.randn(6, 3, dtype=torch.float64) + 4).requires_grad_()
    out = cf(x1, x2)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x1.grad + x2.grad, g)
    b = x1.grad / g
    a = ((out - x2) / (x1 - x2)).detach()
    low = a < 0.5
    assert (torch.where(low, b >= a - 1e-9, b >= 0.5 - 1e-9)).all()


@pytest.mark.parametrize("kwargs, name", [
    ({"forward": "shaky"}, "forward"),
    ({"backward": "random"}, "backward"),
    ({"level": "pixel"}, "level"),
    ({"rule": "M6"}, "rule"),
    ({"alpha_range": (-0.1, 0.5)}, "alpha_range"),
    ({"alpha_range": (0.2, 1.5)}, "alpha_range"),
    ({"alpha_range": (0.7, 0.3)}, "alpha_range"),
    ({"alpha_range": 0.5}, "alpha_range"),
])
def test_bad_arguments(kwargs, name):
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=name):
        shake(x, x, **kwargs)
    with pytest.raises(ValueError, match=name):
        Shake(**kwargs)


def test_training_must_be_given():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="training=self.training"):
        shake(x, x)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="x1 and x2"):
        shake(torch.randn(4, 2), torch.randn(4, 3), training=True)
