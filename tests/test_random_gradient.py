"""Random Gradient (Wei, section 4): loss -> factor * loss, factor statistics, schedule, state."""

import io
import math

import pytest
import torch

from sgdlab.regularize import LossTransform, RandomGradient, create_loss_transform, loss_transform_names
from sgdlab.regularize.random_gradient import triangular_factor


def _factors(rg, calls, n=4):
    out = []
    for _ in range(calls):
        losses = torch.full((n,), 2.0)
        scaled = rg(losses)
        out.append(scaled / losses)
    return torch.stack(out)


def test_default_one_uniform_factor_per_batch():
    rg = RandomGradient()
    f = _factors(rg, 3000)
    # one factor per call: identical across the batch
    torch.testing.assert_close(f, f[:, :1].expand_as(f))
    u = f[:, 0].double()
    se = math.sqrt(1 / 12 / 3000)
    assert abs(u.mean().item() - 0.5) < 5 * se
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / 3000)  # Var of U(0,1) sample variance
    assert u.min() >= 0 and u.max() < 1
    assert u.min() < 0.01 and u.max() > 0.99


@pytest.mark.parametrize("low, high", [(0.5, 2.0), (0.0, 0.1)])
def test_range(low, high):
    f = _factors(RandomGradient(low, high, seed=1), 2000, n=1)[:, 0].double()
    width = high - low
    se = width * math.sqrt(1 / 12 / 2000)
    assert abs(f.mean().item() - (low + high) / 2) < 5 * se
    assert f.min() >= low - 1e-6 and f.max() <= high + 1e-6


def test_probability_p():
    p, n = 0.3, 4000
    f = _factors(RandomGradient(0.0, 0.5, p=p, seed=2), n, n=1)[:, 0].double()
    ones = (f == 1.0).double()
    assert abs(ones.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    drawn = f[f != 1.0]
    assert drawn.max() <= 0.5
    assert abs(drawn.mean().item() - 0.25) < 5 * 0.5 * math.sqrt(1 / 12 / drawn.numel())


def test_per_sample():
    rg = RandomGradient(per_sample=True, seed=3)
    losses = torch.ones(5000)
    f = rg(losses).double()
    assert f.unique().numel() == 5000
    assert abs(f.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 5000)
    torch.testing.assert_close(rg.last_factor, f)
    assert rg.metrics()["rg_factor"] == pytest.approx(f.mean().item())
    # p per example
    rg = RandomGradient(0.0, 0.5, p=0.5, per_sample=True, seed=3)
    f = rg(torch.ones(5000)).double()
    assert abs((f == 1).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / 5000)


def test_constant_factor_scales_gradient():
    rg = RandomGradient(3.0, 3.0)
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    losses = (x @ w) ** 2
    rg(losses).mean().backward()
    g_ref = torch.autograd.grad(((x @ w) ** 2).mean(), w)[0]
    torch.testing.assert_close(w.grad, 3 * g_ref)
    assert rg.metrics() == {"rg_factor": 3.0}
    # a scalar loss works too: ``loss = rg(loss)``
    assert RandomGradient(3.0, 3.0)(torch.tensor(2.0)).item() == 6.0


def test_triangular_formula_and_schedule():
    assert triangular_factor(0, 10, 0.0, 1.0) == 0.0
    assert triangular_factor(2.5, 10, 0.0, 1.0) == pytest.approx(0.5)
    assert triangular_factor(5, 10, 0.0, 1.0) == pytest.approx(1.0)
    assert triangular_factor(7.5, 10, 0.0, 1.0) == pytest.approx(0.5)
    assert triangular_factor(10, 10, 0.0, 1.0) == pytest.approx(0.0)
    assert triangular_factor(13, 10, 0.2, 0.6) == pytest.approx(0.2 + 0.4 * 0.6)
    counted = RandomGradient(0.2, 0.6, schedule="triangular", period=8)
    explicit = RandomGradient(0.2, 0.6, schedule="triangular", period=8)
    for step in range(20):
        x = step / 8 - math.floor(step / 8)
        expected = 0.2 + 0.4 * (1 - abs(2 * x - 1))
        assert counted(torch.ones(3)).tolist() == pytest.approx([expected] * 3)  # internal call counter
        assert explicit(torch.ones(1), step=3 * step).item() == pytest.approx(
            triangular_factor(3 * step, 8, 0.2, 0.6))  # explicit step
    rg = RandomGradient(0.0, 1.0, schedule="triangular", period=4, period_unit="epochs")
    assert rg(torch.ones(2), epoch=1.0).tolist() == pytest.approx([0.5, 0.5])
    assert rg(torch.ones(2), epoch=2.0).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="epoch"):
        rg(torch.ones(2))


def test_reproducible_per_seed_and_default_seed():
    a = _factors(RandomGradient(seed=7), 50)
    b = _factors(RandomGradient(seed=7), 50)
    c = _factors(RandomGradient(seed=8), 50)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # seed=None: each transform draws its seed from torch's global generator -> independent streams,
    # reproducible under torch.manual_seed
    torch.manual_seed(1)
    first, second = RandomGradient(), RandomGradient()
    assert first.seed != second.seed and not torch.equal(_factors(first, 20), _factors(second, 20))
    torch.manual_seed(1)
    again = RandomGradient()
    assert again.seed == first.seed
    torch.testing.assert_close(_factors(again, 20), _factors(RandomGradient(seed=first.seed), 20), rtol=0, atol=0)
    # independent of the global RNG
    torch.manual_seed(123)
    d = _factors(RandomGradient(seed=7), 50)
    torch.testing.assert_close(a, d, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"p": 0.5, "per_sample": True},
                                    {"schedule": "triangular", "period": 6, "p": 0.7}])
def test_state_dict_round_trip(kwargs):
    ref = RandomGradient(seed=11, **kwargs)
    expected = _factors(ref, 30)
    rg = RandomGradient(seed=11, **kwargs)
    first = _factors(rg, 13)
    buf = io.BytesIO()
    torch.save(rg.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = RandomGradient(seed=99, **kwargs)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.last_factor, rg.last_factor)
    rest = _factors(fresh, 17)
    torch.testing.assert_close(torch.cat([first, rest]), expected, rtol=0, atol=0)


def test_metrics_and_protocol_and_registry():
    rg = RandomGradient()
    assert rg.metrics() == {}
    assert rg.last_factor is None
    out = rg(torch.tensor([1.0, 3.0]))
    assert rg.metrics()["rg_factor"] == pytest.approx(float(out[0]))
    assert isinstance(rg, LossTransform)
    assert "random_gradient" in loss_transform_names()
    t = create_loss_transform("random_gradient", seed=5, low=0.0, high=1.0, p=0.5)
    assert isinstance(t, RandomGradient) and t.seed == 5 and t.p == 0.5
    torch.testing.assert_close(_factors(t, 10), _factors(RandomGradient(p=0.5, seed=5), 10))


@pytest.mark.parametrize("kwargs, name", [
    ({"low": 1.0, "high": 0.5}, "low"),
    ({"p": 1.5}, "p"),
    ({"p": -0.1}, "p"),
    ({"schedule": "cosine"}, "schedule"),
    ({"schedule": "triangular"}, "period"),
    ({"schedule": "triangular", "period": 0}, "period"),
    ({"period": 5}, "period"),
    ({"schedule": "triangular", "period": 5, "period_unit": "hours"}, "period_unit"),
    ({"low": float("nan")}, "low"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandomGradient(**kwargs)


def test_per_sample_needs_a_loss_vector():
    with pytest.raises(ValueError, match="per_sample=True needs the per-example loss vector"):
        RandomGradient(per_sample=True, seed=0)(torch.tensor(1.5))
