import pickle
import random

import numpy as np
import pytest
import torch

from sgdlab import data
from sgdlab.data import cifar_augment, random_crop, random_flip
from sgdlab.errors import DataError


def test_mnist1d_shapes_split_and_global_rng_untouched():
    np.random.seed(123)
    random.seed(7)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    ds = data.create("mnist1d")
    assert ds.train_x.shape == (4000, 40) and ds.test_x.shape == (1000, 40)
    assert ds.train_y.dtype == torch.int64 and set(ds.train_y.unique().tolist()) == set(range(10))
    assert (np.random.get_state()[1] == np_before).all() and random.getstate() == py_before
    again = data.create("mnist1d")  # from the cache: identical
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


def test_normalized_uses_train_statistics():
    ds = data.create("synthetic", num_samples=500, num_test=100, shape=(3, 4, 4), seed=1).normalized()
    m = ds.train_x.mean(dim=(0, 2, 3))
    s = ds.train_x.std(dim=(0, 2, 3))
    assert torch.allclose(m, torch.zeros(3), atol=1e-5) and torch.allclose(s, torch.ones(3), atol=1e-4)
    seq = data.create("synthetic", num_samples=300, shape=(40,), seed=2).normalized()
    assert abs(float(seq.train_x.mean())) < 1e-5 and abs(float(seq.train_x.std()) - 1) < 1e-4


def test_mnist5k_split_and_permuted_pixels():
    ds = data.create("mnist5k")
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    perm = data.create("mnist5k", permuted_pixels=True)
    assert torch.equal(perm.train_y, ds.train_y)
    # same multiset of pixel values per image, different arrangement
    a, b = ds.train_x[:5].flatten(1), perm.train_x[:5].flatten(1)
    assert torch.equal(a.sort(1).values, b.sort(1).values) and not torch.equal(a, b)
    p = np.random.default_rng(0).permutation(784)
    assert torch.equal(b, a[:, torch.as_tensor(p)])


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reads_python_format(tmp_path, name, classes):
    folder = data.write_synthetic_cifar(tmp_path / "c", name, train_per_file=7, test=5)
    ds = data.create(name, root=str(folder))
    n_train = 7 * (5 if name == "cifar10" else 1)
    assert ds.train_x.shape == (n_train, 3, 32, 32) and ds.test_x.shape == (5, 3, 32, 32)
    assert ds.num_classes == classes
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    with open(folder / ("data_batch_1" if name == "cifar10" else "train"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = torch.as_tensor(raw[b"data"][0], dtype=torch.float32).view(3, 32, 32) / 255
    assert torch.equal(ds.train_x[0], first) and ds.train_y[0] == raw[label_key][0]
    # parent folder works too; and the environment variable
    (tmp_path / "parent").mkdir()
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    data.write_synthetic_cifar(tmp_path / "parent" / sub, name, train_per_file=3, test=2)
    assert len(data.create(name, root=str(tmp_path / "parent")).test_y) == 2


def test_cifar_missing_folder_says_where(tmp_path, monkeypatch):
    monkeypatch.delenv("SGDLAB_CIFAR10", raising=False)
    monkeypatch.delenv("SGDLAB_DATA", raising=False)
    with pytest.raises(DataError, match="SGDLAB_CIFAR10") as e:
        data.create("cifar10", root=str(tmp_path / "nowhere"))
    assert "data.root" in str(e.value) and "data_batch_1" in str(e.value)


def test_cifar_env_variable(tmp_path, monkeypatch):
    folder = data.write_synthetic_cifar(tmp_path / "c", "cifar10", train_per_file=2, test=2)
    monkeypatch.setenv("SGDLAB_CIFAR10", str(folder))
    assert len(data.create("cifar10").train_y) == 10


def test_cifar_truncated_file_is_a_clear_error(tmp_path):
    folder = data.write_synthetic_cifar(tmp_path / "c", "cifar10", train_per_file=4, test=4)
    blob = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="data_batch_3.*truncated"):
        data.create("cifar10", root=str(folder))


def test_synthetic_deterministic_and_separable():
    a = data.create("synthetic", num_samples=200, shape=(5,), num_classes=3, seed=4, separation=5.0)
    b = data.create("synthetic", num_samples=200, shape=(5,), num_classes=3, seed=4, separation=5.0)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    # nearest class mean classifies well-separated clusters almost perfectly
    means = torch.stack([a.train_x[a.train_y == c].mean(0) for c in range(3)])
    pred = torch.cdist(a.test_x, means).argmin(1)
    assert (pred == a.test_y).float().mean() > 0.95


def test_unknown_dataset_suggests_name():
    with pytest.raises(DataError, match="mnist1d"):
        data.create("mnist1e")


def test_random_crop_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    fill = torch.tensor([0.5, -1.0, 2.0])
    out = random_crop(x, 2, fill=fill, generator=g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x - fill.view(1, 3, 1, 1), (2,) * 4) + fill.view(1, 3, 1, 1)
    offsets = set()
    for i in range(64):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], out[i])]
        assert found, f"example {i} is not a crop of its padded image"
        offsets.add(found[0])
    assert len(offsets) > 10  # offsets vary per example


def test_crop_offsets_uniform_and_flip_rate():
    g = torch.Generator().manual_seed(1)
    n = 20000
    # one-hot column marks where the image's left edge lands
    x = torch.zeros(n, 1, 1, 9)
    x[..., 0] = 1.0
    out = random_crop(x, 4, generator=g)
    # the single row survives only for row offset 4 (prob 1/9); the marker column then lands at
    # 4 - dx, visible for dx in 0..4 (prob 5/9): P(visible) = 5/81
    visible = out[:, 0, 0, :].sum(1) > 0
    p_visible, p = float(visible.float().mean()), 5 / 81
    assert abs(p_visible - p) < 4 * (p * (1 - p) / n) ** 0.5
    # given visible, the column index 4 - dx is uniform over 0..4
    cols = out[visible, 0, 0, :].argmax(1)
    counts = torch.bincount(cols, minlength=9)[:5].float()
    expected = counts.sum() / 5
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 99.9% quantile of chi-square with 4 degrees of freedom
    flips = random_flip(torch.arange(2.0).view(1, 1, 1, 2).expand(n, 1, 1, 2), generator=g)
    p = float((flips[..., 0] == 1).float().mean())
    assert abs(p - 0.5) < 4 * (0.25 / n) ** 0.5


def test_cifar_augment_shapes_and_determinism():
    x = torch.randn(16, 3, 32, 32)
    a = cifar_augment(x, generator=torch.Generator().manual_seed(3))
    b = cifar_augment(x, generator=torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    # augmentation keeps every value from the image or the fill (0)
    assert set(torch.unique(a).tolist()) <= set(torch.unique(x).tolist()) | {0.0}
