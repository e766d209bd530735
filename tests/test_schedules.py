import math

import pytest

from sgdlab.schedules import Schedule, lr_for_batch, warmup_from_for_batch


def test_constant():
    s = Schedule("constant")
    assert all(s(t) == 1.0 for t in (0, 1, 1e6))


def test_multistep_matches_formula():
    s = Schedule("multistep", milestones=(60, 120, 160), factor=0.2)
    for t, expect in [(0, 1), (59.9, 1), (60, 0.2), (119, 0.2), (120, 0.04), (160, 0.008), (199, 0.008)]:
        assert s(t) == pytest.approx(expect, rel=1e-12)


def test_cosine_to_zero_without_restart():
    s = Schedule("cosine", total=1000)
    for t in (0, 1, 250, 500, 999, 1000, 1500):
        frac = min(t / 1000, 1)
        assert s(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * frac)), abs=1e-15)
    assert s(1000) == pytest.approx(0, abs=1e-15) and s(2000) == pytest.approx(0, abs=1e-15)


def test_poly_power():
    s = Schedule("poly", total=200, power=0.9)
    for t in (0, 50, 100, 199, 200):
        assert s(t) == pytest.approx((1 - t / 200) ** 0.9)


def test_triangular_cycles():
    s = Schedule("triangular", period=10, low=0.2)
    assert s(0) == pytest.approx(0.2) and s(5) == pytest.approx(1.0) and s(10) == pytest.approx(0.2)
    assert s(2.5) == pytest.approx(0.6) and s(7.5) == pytest.approx(0.6) and s(12.5) == pytest.approx(0.6)


def test_warmup_composes():
    s = Schedule("multistep", milestones=(30,), factor=0.1, warmup=5, warmup_from=0.25)
    assert s(0) == pytest.approx(0.25) and s(2.5) == pytest.approx(0.625) and s(5) == 1.0 and s(31) == 0.1
    c = Schedule("cosine", total=100, warmup=10)
    assert c(5) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.05)))


def test_linear_scaling_rule():
    assert lr_for_batch(0.1, 256, 8192) == pytest.approx(3.2)
    assert warmup_from_for_batch(256, 8192) == pytest.approx(1 / 32)
    with pytest.raises(ValueError):
        lr_for_batch(0.1, 0, 10)


@pytest.mark.parametrize("kw", [dict(name="nope"), dict(name="cosine"), dict(name="triangular"),
                                dict(name="multistep", milestones=(5, 2)), dict(name="constant", warmup=-1)])
def test_bad_schedules(kw):
    with pytest.raises(ValueError):
        Schedule(**kw)
