"""Shake-Shake architectures (Gastaldi 2017, sections 2.1.1, 2.2, 5) and branch correlation (section 3)."""

import copy

import pytest
import torch
import torch.nn as nn

from sgdlab import models
from sgdlab.models.shake_resnet import ShakeBlock, ShakeResNet
from sgdlab.regularize import Shake, branch_correlation
from sgdlab.regularize.correlation import shake_blocks

SHAKE_MODELS = ["shake_resnet", "shake_resnet26_2x32d", "shake_resnet26_2x64d", "shake_resnet26_2x96d",
                "shake_resnet26_2x112d", "shake_resnext29_2x4x64d", "shake_resnet1d"]


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_registered():
    for name in SHAKE_MODELS:
        assert name in models.names()
    assert models.input_shape("shake_resnet26_2x32d") == (3, 32, 32)
    assert models.input_shape("shake_resnext29_2x4x64d") == (3, 32, 32)
    assert models.input_shape("shake_resnet1d") == (40,)


def test_parameter_counts():
    # paper (section 2.3, Table 3): 2.9M (26 2x32d), 26.2M (26 2x96d), 34.4M (ResNeXt-29 2x4x64d)
    assert round(_count(models.create("shake_resnet26_2x32d", num_classes=10)) / 1e6, 2) == 2.92
    assert round(_count(models.create("shake_resnet26_2x96d", num_classes=10)) / 1e6, 2) == 26.19
    n = _count(models.create("shake_resnext29_2x4x64d", num_classes=100))
    assert abs(n / 34.4e6 - 1) < 0.01


def test_structure_of_shake_resnet26():
    m = models.create("shake_resnet26_2x32d", num_classes=10)
    blocks = [b for b in m.modules() if isinstance(b, ShakeBlock)]
    assert len(blocks) == 12
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert m.stem[0].in_channels == 3 and m.stem[0].out_channels == 16
    assert isinstance(m.stem[1], nn.BatchNorm2d)
    # widths K, 2K, 4K; stride 2 on the first conv of the first block of stages 2 and 3
    assert [b.branch1[1].out_channels for b in blocks] == [32] * 4 + [64] * 4 + [128] * 4
    assert [b.branch1[1].stride[0] for b in blocks] == [1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    # branch: ReLU-Conv-BN-ReLU-Conv-BN
    kinds = [type(layer) for layer in blocks[0].branch1]
    assert kinds == [nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    # projection shortcuts exactly where channels change (block 1 of every stage)
    assert [not isinstance(b.shortcut, nn.Identity) for b in blocks] == [True, False, False, False] * 3
    assert m.fc.in_features == 128


def test_shift_concat_shortcut_matches_definition():
    torch.manual_seed(0)
    blk = ShakeBlock(4, 8, 2).eval()
    sc = blk.shortcut
    x = torch.randn(2, 4, 6, 6)
    r = x.relu()
    shifted = torch.zeros_like(r)
    shifted[:, :, 1:, 1:] = r[:, :, :-1, :-1]  # content moved one pixel right and down, zeros top/left
    assert shifted[:, :, 0, :].abs().sum() == 0 and shifted[:, :, :, 0].abs().sum() == 0
    p1 = nn.functional.conv2d(r[:, :, ::2, ::2], sc.conv1.weight)
    p2 = nn.functional.conv2d(shifted[:, :, ::2, ::2], sc.conv2.weight)
    expected = sc.bn(torch.cat([p1, p2], 1))
    torch.testing.assert_close(sc(x), expected)
    # block in eval: shortcut + average of the branches, no ReLU after the sum
    torch.testing.assert_close(blk(x), expected + 0.5 * (blk.branch1(x) + blk.branch2(x)))


def test_shift_concat_shortcut_1d_moves_the_signal_right():
    torch.manual_seed(0)
    sc = ShakeBlock(3, 6, 2, dims=1).eval().shortcut
    x = torch.randn(2, 3, 9)
    r = x.relu()
    shifted = torch.cat([torch.zeros(2, 3, 1), r[:, :, :-1]], dim=2)  # one step right, zero enters left
    p1 = nn.functional.conv1d(r[:, :, ::2], sc.conv1.weight)
    p2 = nn.functional.conv1d(shifted[:, :, ::2], sc.conv2.weight)
    torch.testing.assert_close(sc(x), sc.bn(torch.cat([p1, p2], 1)))


@pytest.mark.parametrize("name", SHAKE_MODELS)
def test_forward_backward_every_shake_model(name):
    torch.manual_seed(0)
    num_classes = models.default_num_classes(name)
    m = models.create(name, num_classes=num_classes)
    x = torch.randn(2, *models.input_shape(name))
    out = m(x)
    assert out.shape == (2, num_classes)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_shake_settings_are_passed_and_validated():
    m = models.create("shake_resnet26_2x32d", num_classes=10,
                      shake={"forward": "even", "backward": "even", "level": "batch"})
    shakes = [s for s in m.modules() if isinstance(s, Shake)]
    assert len(shakes) == 12
    assert all(s.forward_mode == "even" and s.backward_mode == "even" and s.level == "batch" for s in shakes)
    m = models.create("shake_resnet1d", num_classes=10, shake={"rule": "M2", "alpha_range": [0.4, 0.6]})
    assert all(s.rule == "M2" and s.alpha_range == (0.4, 0.6) for s in m.modules() if isinstance(s, Shake))
    with pytest.raises(ValueError, match="forwrd"):
        models.create("shake_resnet1d", num_classes=10, shake={"forwrd": "even"})
    with pytest.raises(ValueError, match="level"):
        models.create("shake_resnet1d", num_classes=10, shake={"level": "pixel"})
    with pytest.raises(ValueError, match="depth"):
        models.create("shake_resnet", num_classes=10, depth=25)


def test_train_mode_is_stochastic_eval_is_deterministic():
    torch.manual_seed(0)
    m = models.create("shake_resnet1d", num_classes=10)
    x = torch.randn(16, 40)
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(1)
    y1 = m(x)
    y2 = m(x)
    torch.manual_seed(1)
    y3 = m(x)
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y1, y3, rtol=0, atol=0)
    # E-E-B: training forward is deterministic given the batch
    eeb = models.create("shake_resnet1d", num_classes=10, shake={"forward": "even", "backward": "even",
                                                                 "level": "batch"})
    torch.testing.assert_close(eeb(x), eeb(x))


def test_section5_variants():
    a = models.create("shake_resnet", num_classes=10, depth=26, width=8, skip=False)
    assert all(b.shortcut is None for b in a.modules() if isinstance(b, ShakeBlock))
    blk = next(b for b in a.modules() if isinstance(b, ShakeBlock)).eval()
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(blk(x), 0.5 * (blk.branch1(x) + blk.branch2(x)))
    b = models.create("shake_resnet", num_classes=10, depth=26, width=8, skip=False, single_conv=True)
    blocks = [m for m in b.modules() if isinstance(m, ShakeBlock)]
    assert len(blocks) == 24
    assert [type(layer) for layer in blocks[0].branch1] == [nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    c = models.create("shake_resnet", num_classes=10, depth=14, width=8, skip=False, batchnorm=False,
                      shake={"forward": "shake", "backward": "even", "alpha_range": (0.4, 0.6)})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in c.modules())
    assert len([m for m in c.modules() if isinstance(m, ShakeBlock)]) == 6
    assert c(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_shake_resnet1d_learns():
    # a few full-batch steps on separable synthetic data must reduce the loss markedly
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 40, generator=g) * 2
    y = torch.arange(4).repeat(16)
    x = centers[y] + 0.5 * torch.randn(64, 40, generator=g)
    torch.manual_seed(0)
    m = models.create("shake_resnet1d", num_classes=4, depth=8, width=8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    loss0 = nn.functional.cross_entropy(m.eval()(x), y).item()
    m.train()
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    loss1 = nn.functional.cross_entropy(m.eval()(x), y).item()
    assert loss1 < 0.3 * loss0


# --- branch correlation (section 3, Figs. 3-4) -------------------------------------------------------


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _Toy(nn.Module):
    def __init__(self, f1, f2):
        super().__init__()
        self.branch1, self.branch2 = _Fn(f1), _Fn(f2)

    def forward(self, x):
        return x + 0.5 * (self.branch1(x) + self.branch2(x))


def _direct(y1, y2):
    """Element-centred correlation computed in one pass over all data (float64)."""
    y1 = y1.double().flatten(1)
    y2 = y2.double().flatten(1)
    d1, d2 = y1 - y1.mean(0), y2 - y2.mean(0)
    return (d1 * d2).sum() / torch.sqrt((d1 * d1).sum() * (d2 * d2).sum())


def test_identical_branches_correlation_one():
    torch.manual_seed(0)
    m = models.create("shake_resnet1d", num_classes=10, depth=8, width=8)
    for blk in shake_blocks(m):
        blk[1].branch2.load_state_dict(blk[1].branch1.state_dict())
    m.train()
    res = branch_correlation(m, (torch.randn(64, 40), torch.zeros(64, dtype=torch.long)), batch_size=10)
    assert m.training  # mode restored
    assert len(res.names) == 3 and res.num_examples == 64
    torch.testing.assert_close(res.correlation, torch.ones(3, dtype=torch.float64))
    diag = torch.diagonal(res.layerwise, dim1=1, dim2=2)
    torch.testing.assert_close(diag, torch.ones(3, 3, dtype=torch.float64))
    assert res.layerwise.shape == (3, 3, 3)
    assert set(res.table()[0]) >= {"block", "correlation", "L1R1", "L3R2"}


def test_negated_branch_and_streaming_matches_direct():
    x = torch.randn(57, 3, 5, generator=torch.Generator().manual_seed(1))
    neg = _Toy(lambda t: t, lambda t: -2 * t + 1)
    res = branch_correlation(neg, x, batch_size=8)
    torch.testing.assert_close(res.correlation, torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(res.layerwise[0].diagonal(), -torch.ones(3, dtype=torch.float64))

    def f2(t):
        return torch.tanh(t.roll(1, dims=1) + 0.3 * t) ** 2

    toy = _Toy(lambda t: t.relu(), f2)
    res = branch_correlation(toy, x, batch_size=8)
    y1, y2 = x.relu(), f2(x)
    torch.testing.assert_close(res.correlation[0], _direct(y1, y2))
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(res.layerwise[0, i, j], _direct(y1[:, i], y2[:, j]))
    assert abs(res.correlation[0].item()) < 0.99
    # batch size does not change the answer; global centring pools every item as one sample
    torch.testing.assert_close(branch_correlation(toy, [x[:20], x[20:]]).correlation, res.correlation)
    g = branch_correlation(toy, x, center="global")
    torch.testing.assert_close(g.correlation[0],
                               torch.corrcoef(torch.stack([y1.flatten(), y2.flatten()]).double())[0, 1])


def test_branch_correlation_bad_input_and_eval_mode():
    with pytest.raises(ValueError, match="branch1"):
        branch_correlation(nn.Linear(2, 2), torch.randn(4, 2))
    m = models.create("shake_resnet1d", num_classes=10, depth=8, width=8)
    with pytest.raises(ValueError, match="center"):
        branch_correlation(m, torch.randn(4, 40), center="pixel")
    # eval mode inside: two calls agree although the model is in training mode (shake + BN batch stats)
    m.train()
    x = torch.randn(32, 40)
    r1 = branch_correlation(m, x, batch_size=5)
    r2 = branch_correlation(m, x, batch_size=32)
    torch.testing.assert_close(r1.correlation, r2.correlation)
    m2 = copy.deepcopy(m).eval()
    torch.testing.assert_close(branch_correlation(m2, x).correlation, r1.correlation)
    assert not m2.training and m.training
    assert isinstance(m, ShakeResNet)
