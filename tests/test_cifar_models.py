"""The papers' CIFAR architectures (WRN, DenseNet-BC, ResNet, MobileNetV2, DenseNet-121) and the pixel LSTM.

Parameter counts are taken on the ``meta`` device (no memory, no sampling). Forward/backward passes of
the full-size presets run on 8x8 inputs (every network pools globally, so the weights are the same as
for 32x32, at 1/16 of the cost); the 32x32 path is exercised with reduced-width instances of the same
builders.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdlab import models
from sgdlab.models.densenet import DenseNet
from sgdlab.models.layers import he_init, num_parameters
from sgdlab.models.lstm import PixelLSTM
from sgdlab.models.wrn import BNAddUnit, PreActUnit, WideResNet

MINE = [
    "wrn", "wrn28_10", "wrn28_10_bnadd", "wrn70_10_bnadd", "wrn70_10_bnadd_proj3", "wrn28_2",
    "densenet_bc", "densenet_bc190_40", "densenet_bc100_12", "densenet121",
    "resnet18", "resnet34", "mobilenetv2", "lstm_pixel",
]


def count_meta(name: str, num_classes: int = 10, **kw) -> int:
    with torch.device("meta"):
        return num_parameters(models.create(name, num_classes=num_classes, **kw))


def bn_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


def wrn_closed_form(depth: int, k: int, num_classes: int, unit: str, projection: int = 1) -> int:
    """Parameter count of WRN-depth-k written out by hand (convs without bias, BN: 2 per channel)."""
    n = (depth - 4) // 6
    total = 27 * 16  # stem conv3x3, 3 -> 16
    c = 16
    units_out = 0
    for out in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            projects = i == 0 and (c != out or out != 16 * k)
            total += 9 * c * out + 9 * out * out + (projection ** 2 * c * out if projects else 0)
            total += 2 * (c + out) if unit == "preact" else 2 * 3 * out
            units_out += out
            c = out
    total += 2 * c if unit == "preact" else 2 * 16  # final BN (pre-act) or stem BN (bnadd)
    total += c * num_classes + num_classes
    return total


def test_all_registered():
    assert set(MINE) <= set(models.names())
    for name in MINE:
        assert models.input_shape(name) == ((784,) if name == "lstm_pixel" else (3, 32, 32))


# Paper parameter counts, to the precision printed (half a unit of the last digit).
@pytest.mark.parametrize(
    "name,classes,paper,tol",
    [
        ("wrn28_10", 10, 36.5e6, 0.05e6),        # SRS Table 2 / WRN paper Table 4
        ("wrn28_10", 100, 36.5e6, 0.05e6),
        ("wrn28_10_bnadd", 100, 36.5e6, 0.05e6),  # SRS "WRN": same count to 0.1M
        ("densenet_bc190_40", 10, 25.6e6, 0.05e6),  # Huang et al. Table 2, SRS Table 2
        ("densenet_bc190_40", 100, 25.6e6, 0.01 * 25.6e6),
        ("densenet_bc100_12", 10, 0.8e6, 0.05e6),
        ("resnet18", 10, 11.2e6, 0.05e6),
        ("resnet34", 10, 21.3e6, 0.05e6),
        ("densenet121", 10, 7.0e6, 0.05e6),
        ("mobilenetv2", 10, 2.25e6, 0.05e6),
    ],
)
def test_parameter_counts_match_papers(name, classes, paper, tol):
    assert abs(count_meta(name, classes) - paper) <= tol


def test_wrn70_10_counts():
    # WRN-70-10 (n = 11 units per group) has 104.33M parameters with 100 classes and 1x1 projections;
    # the SRS paper prints 106.4M, which the same net with 3x3 projections matches to the printed digit.
    got = count_meta("wrn70_10_bnadd", 100)
    assert got == wrn_closed_form(70, 10, 100, "bnadd") == 104_330_484
    assert 0.975 < got / 106.4e6 < 0.985
    got3 = count_meta("wrn70_10_bnadd_proj3", 100)
    assert got3 == wrn_closed_form(70, 10, 100, "bnadd", projection=3) == 106_398_964
    assert abs(got3 - 106.4e6) <= 0.05e6
    # the two presets differ only in the kernels of the three projections (16->160, 160->320, 320->640)
    assert got3 - got == 8 * (16 * 160 + 160 * 320 + 320 * 640)


def test_wrn_projection_bad_input():
    with pytest.raises(ValueError, match="projection must be 1 or 3"):
        WideResNet(16, 2, 10, projection=5)


@pytest.mark.parametrize("projection", [1, 3])
@pytest.mark.parametrize("depth,k,classes", [(28, 10, 100), (70, 10, 100), (16, 2, 10), (10, 1, 10), (28, 2, 10)])
def test_wrn_counts_closed_form_and_bnadd_difference(depth, k, classes, projection):
    with torch.device("meta"):
        pre = WideResNet(depth, k, classes, 0.3, "preact", projection=projection)
        add = WideResNet(depth, k, classes, 0.3, "bnadd", projection=projection)
    n_pre, n_add = num_parameters(pre), num_parameters(add)
    assert n_pre == wrn_closed_form(depth, k, classes, "preact", projection)
    assert n_add == wrn_closed_form(depth, k, classes, "bnadd", projection)
    # Everything but the batch norms is shared, shape for shape ...
    def non_bn_shapes(m):
        return sorted(
            tuple(p.shape) for mod in m.modules() if not isinstance(mod, nn.BatchNorm2d)
            for p in mod.parameters(recurse=False)
        )
    assert non_bn_shapes(pre) == non_bn_shapes(add)
    # ... so the difference is exactly the batch-norm difference: the bnadd net has BN(out) x3 per unit
    # plus a stem BN(16); the pre-act net has BN(in) + BN(out) per unit plus a final BN(64k). That
    # telescopes to one extra BN per unit: 2 * sum of the units' output channels.
    n = (depth - 4) // 6
    extra = 2 * n * (16 * k + 32 * k + 64 * k)
    assert n_add - n_pre == bn_params(add) - bn_params(pre) == extra
    assert extra == sum(2 * u.bn_add.num_features for u in add.units)


def test_meta_and_cpu_builds_agree():
    with torch.device("meta"):
        m = models.create("wrn28_2", num_classes=10)
    assert all(p.is_meta for p in m.parameters())
    assert num_parameters(m) == num_parameters(models.create("wrn28_2", num_classes=10))


def _forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int):
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(x.shape[0]) % num_classes).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    "builder",
    [
        lambda: models.create("wrn", num_classes=10, depth=10, width=1, dropout=0.3, unit="preact"),
        lambda: models.create("wrn", num_classes=100, depth=10, width=1, dropout=0.3, unit="bnadd"),
        lambda: models.create("densenet_bc", num_classes=10, depth=10, growth=4),
        lambda: DenseNet((1, 1, 1, 1), 4, 10),  # densenet121's layout (4 blocks), reduced
        lambda: models.create("resnet18", num_classes=10, width=4),
        lambda: models.create("resnet34", num_classes=10, width=4),
        lambda: models.create("mobilenetv2", num_classes=10),
    ],
    ids=["wrn10_1", "wrn10_1_bnadd", "densenet_bc10_4", "densenet4blocks", "resnet18_w4", "resnet34_w4",
         "mobilenetv2"],
)
def test_forward_backward_32x32_reduced(builder):
    """The 32x32 CIFAR path, with reduced-width/depth instances of the same builders."""
    torch.manual_seed(0)
    model = builder()
    _forward_backward(model, torch.randn(2, 3, 32, 32), model.fc.out_features)


def test_lstm_forward_backward_any_length():
    torch.manual_seed(0)
    model = models.create("lstm_pixel", num_classes=10)
    _forward_backward(model, torch.randn(2, 16), 10)
    # (B, 1, 28, 28) and (B, 784) are the same sequence
    model.eval()
    img = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(img), model(img.reshape(2, 784)))
    with pytest.raises(ValueError, match="input_size"):
        PixelLSTM(10, 8, input_size=3)(torch.randn(2, 7))


def test_lstm_matches_manual_recurrence():
    """The classifier reads the last hidden state of a standard LSTM (sigmoid gates, tanh)."""
    torch.manual_seed(1)
    m = PixelLSTM(num_classes=3, hidden=5)
    x = torch.randn(2, 6)
    W, U = m.lstm.weight_ih_l0, m.lstm.weight_hh_l0
    b = m.lstm.bias_ih_l0 + m.lstm.bias_hh_l0
    h = torch.zeros(2, 5)
    c = torch.zeros(2, 5)
    for t in range(6):
        z = x[:, t:t + 1] @ W.T + h @ U.T + b
        i, f, g, o = z.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.fc(h), rtol=1e-5, atol=1e-6)


def test_lstm_init_keras_style():
    torch.manual_seed(0)
    m = models.create("lstm_pixel", num_classes=10)
    H = 128
    assert m.lstm.hidden_size == H
    torch.testing.assert_close(m.lstm.bias_ih_l0[H:2 * H], torch.ones(H))
    assert m.lstm.bias_ih_l0[:H].abs().max() == 0 and m.lstm.bias_ih_l0[2 * H:].abs().max() == 0
    assert m.lstm.bias_hh_l0.abs().max() == 0
    for gate in m.lstm.weight_hh_l0.detach().chunk(4, 0):
        torch.testing.assert_close(gate @ gate.T, torch.eye(H), atol=1e-4, rtol=0)


def _check_normal_std(w: torch.Tensor, std: float):
    """Sample std within 5 standard errors (SE of a normal sample std: std / sqrt(2n)); mean near 0."""
    n = w.numel()
    assert abs(w.std().item() - std) < 5 * std / math.sqrt(2 * n)
    assert abs(w.mean().item()) < 5 * std / math.sqrt(n)


def test_he_init_fan_out():
    torch.manual_seed(0)
    m = models.create("wrn28_2", num_classes=10)
    # largest conv: 128 -> 128, 3x3 (147,456 weights)
    big = m.units[-1].conv2.weight.detach()
    assert big.shape == (128, 128, 3, 3)
    _check_normal_std(big, math.sqrt(2 / (9 * 128)))
    # a widening conv distinguishes fan-out (9 * 32) from fan-in (9 * 16): the stds differ by sqrt(2)
    widen = m.units[0].conv1.weight.detach()
    assert widen.shape == (32, 16, 3, 3)
    _check_normal_std(widen, math.sqrt(2 / (9 * 32)))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert (mod.weight == 1).all() and (mod.bias == 0).all()
        if isinstance(mod, nn.Conv2d):
            assert mod.bias is None
    assert (m.fc.bias == 0).all()


@pytest.mark.parametrize("name", ["densenet_bc100_12", "resnet18", "mobilenetv2"])
def test_he_init_other_families(name):
    torch.manual_seed(0)
    m = models.create(name, num_classes=10)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    big = max(convs, key=lambda c: c.weight.numel())
    fan_out = big.weight.shape[0] * big.weight.shape[2] * big.weight.shape[3]
    _check_normal_std(big.weight.detach(), math.sqrt(2 / fan_out))


def test_init_is_seeded():
    torch.manual_seed(3)
    a = models.create("wrn", num_classes=10, depth=10, width=1)
    torch.manual_seed(3)
    b = models.create("wrn", num_classes=10, depth=10, width=1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def _randomize_bn(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return module.eval()


def test_preact_unit_semantics():
    """Pre-act unit: BN-ReLU-conv-BN-ReLU-conv; the projection sees the pre-activated input."""
    torch.manual_seed(0)
    u = _randomize_bn(PreActUnit(4, 6, 2))
    x = torch.randn(2, 4, 8, 8)
    o = F.relu(u.bn1(x))
    want = u.conv2(F.relu(u.bn2(u.conv1(o)))) + u.shortcut(o)
    torch.testing.assert_close(u(x), want)
    same = _randomize_bn(PreActUnit(6, 6, 1))
    assert same.shortcut is None
    y = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(same(y), same.conv2(F.relu(same.bn2(same.conv1(F.relu(same.bn1(y)))))) + y)


def test_bnadd_unit_semantics():
    """BN after addition (He et al. 2016b, Fig. 4b): relu(BN(x + BN(conv(relu(BN(conv(x)))))))."""
    torch.manual_seed(0)
    u = _randomize_bn(BNAddUnit(4, 6, 2))
    x = torch.randn(2, 4, 8, 8)
    want = F.relu(u.bn_add(u.bn2(u.conv2(F.relu(u.bn1(u.conv1(x))))) + u.shortcut(x)))
    torch.testing.assert_close(u(x), want)
    same = _randomize_bn(BNAddUnit(6, 6, 1))
    y = torch.randn(2, 6, 8, 8)
    want = F.relu(same.bn_add(same.bn2(same.conv2(F.relu(same.bn1(same.conv1(y))))) + y))
    torch.testing.assert_close(same(y), want)


def test_dropout_between_convs():
    torch.manual_seed(0)
    m = models.create("wrn", num_classes=10, depth=10, width=1, dropout=0.5)
    drops = [mod for mod in m.modules() if isinstance(mod, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.5 for d in drops)
    x = torch.randn(4, 3, 8, 8)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))
        m.train()
        assert not torch.allclose(m(x), m(x))


def test_densenet_bc_structure():
    m = models.create("densenet_bc", num_classes=10, depth=100, growth=12)
    # 16 layers per block; channels 24 -> 216 -> 108 -> 300 -> 150 -> 342
    assert m.blocks == (16, 16, 16) and m.num_features == 342
    assert models.create("densenet121", num_classes=10).num_features == 1024
    with torch.device("meta"):
        assert models.create("densenet_bc190_40", num_classes=100).blocks == (31, 31, 31)


def test_mobilenetv2_residuals_and_strides():
    m = models.create("mobilenetv2", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert m.features.eval()(x).shape == (1, 1280, 4, 4)
    from sgdlab.models.mobilenet import InvertedResidual
    units = [u for u in m.modules() if isinstance(u, InvertedResidual)]
    assert len(units) == 17 and sum(u.residual for u in units) == 10


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        models.create("wrn", num_classes=10, depth=27)
    with pytest.raises(ValueError, match="unit"):
        models.create("wrn", num_classes=10, unit="postact")
    with pytest.raises(ValueError, match="width"):
        models.create("wrn", num_classes=10, width=0)
    with pytest.raises(ValueError, match="dropout"):
        models.create("wrn28_10", num_classes=10, dropout=1.0)
    with pytest.raises(ValueError, match="depth"):
        models.create("densenet_bc", num_classes=10, depth=101)
    with pytest.raises(ValueError, match="compression"):
        models.create("densenet_bc", num_classes=10, compression=0.0)
    with pytest.raises(ValueError, match="hidden"):
        models.create("lstm_pixel", num_classes=10, hidden=0)


def test_he_init_helper_on_plain_module():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 64, 3, bias=True)
    he_init(conv)
    assert (conv.bias == 0).all()
    _check_normal_std(conv.weight.detach(), math.sqrt(2 / (9 * 64)))


def _small_input(name: str) -> torch.Tensor:
    """A batch of 2 in the registered input shape; CIFAR images shrunk to 8x8 and the pixel LSTM's
    sequence to 16 steps (those networks pool globally or read their last state, so any size works)."""
    shape = models.input_shape(name)
    if shape == (3, 32, 32):
        shape = (3, 8, 8)
    elif name == "lstm_pixel":
        shape = (16,)
    return torch.randn(2, *shape)


@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_forward_backward(name):
    """Each name in the registry at full size (CIFAR presets on 8x8 images, global pooling), including
    ones registered after this file was written."""
    torch.manual_seed(0)
    classes = models.default_num_classes(name)
    model = models.create(name, num_classes=classes)
    _forward_backward(model, _small_input(name), classes)
