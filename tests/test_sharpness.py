import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _analysis_models import Quadratic, mean_output, quad_data, trained_mlp

from sgdlab.analysis import keskar_sharpness, model_sharpness, random_subspace


def sharp_1d(v):
    return 100 * (v**2).sum()


def flat_1d(v):
    return (v**8).sum()


def sharp_2d(v):
    return 100 * (v[0] ** 2 + v[1] ** 2)


def mixed_2d(v):
    return 100 * v[0] ** 2 + v[1] ** 8


# papers/004 Table 1, rows with A = identity (the random-A rows depend on the unpublished draw of A)
TABLE1_IDENTITY = [
    (sharp_1d, 1, 1e-3, 1.0e-02),
    (flat_1d, 1, 1e-3, 1.0e-22),
    (sharp_1d, 1, 5e-4, 2.5e-03),
    (flat_1d, 1, 5e-4, 3.90625e-25),  # Table 1: 3.9e-25
    (sharp_2d, 2, 1e-3, 2.0e-02),
    (mixed_2d, 2, 1e-3, 1.0e-02),
    (sharp_2d, 2, 5e-4, 5.0e-03),
    (mixed_2d, 2, 5e-4, 2.5e-03),
]


@pytest.mark.parametrize("f,n,eps,expected", TABLE1_IDENTITY)
def test_table1_identity_rows(f, n, eps, expected):
    phi = keskar_sharpness(f, torch.zeros(n), eps=eps)
    # the 2-D mixed function adds y^8 ~ 1e-24 to the 1e-2 of the x direction
    assert phi == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("eps", [1e-3, 5e-4])
def test_random_subspace_matches_closed_form(eps):
    # at x = 0, A^+ x = 0 and the box is |y_i| <= eps; max of 100 (a.y)^2 is 100 eps^2 ||a||_1^2
    A = random_subspace(1, 5, seed=2)
    a1 = A.abs().sum().item()
    assert keskar_sharpness(sharp_1d, [0.0], eps=eps, A=A) == pytest.approx(1e4 * eps**2 * a1**2, rel=1e-6)
    assert keskar_sharpness(flat_1d, [0.0], eps=eps, A=A) == pytest.approx(100 * (eps * a1) ** 8, rel=1e-6)


def test_box_scales_with_pseudoinverse_of_x():
    # f(v) = sum(v) is linear: the max over the box |y_i| <= eps(|x_i| + 1) is at y = +radius
    x = torch.tensor([2.0, -3.0])
    with pytest.raises(ValueError, match="1 \\+ f\\(x\\)"):
        keskar_sharpness(lambda v: v.sum(), x, eps=1e-2)  # f(x) = -1
    x = torch.tensor([2.0, 3.0])
    phi, info = keskar_sharpness(lambda v: v.sum(), x, eps=1e-2, return_info=True)
    assert info["radius"] == pytest.approx([0.03, 0.04])
    assert phi == pytest.approx((0.03 + 0.04) / (1 + 5.0) * 100, rel=1e-9)


def test_model_sharpness_of_quadratic_and_model_untouched():
    h = torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64)
    model = Quadratic(torch.diag(h))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    phi = model_sharpness(model, mean_output, quad_data(), eps=1e-3, max_iter=20)
    # w = 0, box |y_i| <= eps: max 0.5 sum h_i eps^2, f0 = 0
    assert phi == pytest.approx(100 * 0.5 * h.sum().item() * 1e-6, rel=1e-6)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_model_sharpness_network_float32_model_batchings_and_seed():
    model, (x, y) = trained_mlp(batchnorm=True, steps=100)
    dtype = next(model.parameters()).dtype
    a = model_sharpness(model, F.cross_entropy, (x, y), eps=1e-3, seed=1)
    b = model_sharpness(model, F.cross_entropy, [(x[:50], y[:50]), (x[50:], y[50:])], eps=1e-3, seed=1)
    assert a > 0 and a == pytest.approx(b, rel=1e-6)
    assert next(model.parameters()).dtype == dtype
    sub = model_sharpness(model, F.cross_entropy, (x, y), eps=1e-3, subspace_dim=10, seed=1)
    assert sub > 0 and sub == model_sharpness(
        model, F.cross_entropy, (x, y), eps=1e-3, subspace_dim=10, seed=1
    )
    # a larger box is sharper
    assert model_sharpness(model, F.cross_entropy, (x, y), eps=5e-3, seed=1) > a


class _MixedDtypes(nn.Module):
    """float32 trainable layer, a frozen float64 layer and a float64 buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2).double().requires_grad_(False)
        self.register_buffer("shift", torch.tensor([1.0 + 1e-12, 0.0, 0.0], dtype=torch.float64))

    def forward(self, x):
        return self.b(self.a(x).to(self.b.weight.dtype) + self.shift)


def test_model_sharpness_leaves_mixed_dtypes_and_values_untouched():
    torch.manual_seed(0)
    model = _MixedDtypes()
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    phi = model_sharpness(model, F.cross_entropy, (x, y), eps=1e-3, seed=0)
    assert phi > 0
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert model.b.weight.dtype == torch.float64 and model.shift[0].item() == 1.0 + 1e-12


def test_bad_inputs():
    with pytest.raises(ValueError, match="eps"):
        keskar_sharpness(sharp_1d, [0.0], eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        keskar_sharpness(sharp_1d, [0.0], eps=-1e-3)
    with pytest.raises(ValueError, match="eps"):
        keskar_sharpness(sharp_1d, [0.0], eps=float("inf"))
    with pytest.raises(ValueError, match="A must"):
        keskar_sharpness(sharp_1d, [0.0, 1.0], A=torch.ones(3, 2))
    model, data = trained_mlp(steps=1)
    with pytest.raises(ValueError, match="A must"):
        model_sharpness(model, F.cross_entropy, data, A=torch.ones(5, 2))
    with pytest.raises(ValueError, match="eps"):
        model_sharpness(model, F.cross_entropy, data, eps=0)
    with pytest.raises(ValueError, match="eps"):
        model_sharpness(model, F.cross_entropy, data, eps=float("nan"))
    with pytest.raises(ValueError, match="empty"):
        model_sharpness(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="no trainable parameters"):
        model_sharpness(nn.Identity(), F.cross_entropy, data)
