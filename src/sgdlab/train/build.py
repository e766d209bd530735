"""Building blocks of a run, usable on their own: device, dataset, model, optimizer, loss, evaluation.

:func:`sgdlab.train.run` assembles a run from these; ``sgdlab check`` takes one training step with them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import data as data_lib
from .. import models
from ..errors import ConfigError, SgdlabError
from . import guard
from .config import Config
from .state import CHECKPOINT

__all__ = ["resolve_device", "build_dataset", "build_model", "build_optimizer", "per_example_loss",
           "SmoothedCrossEntropy", "evaluate", "step_error", "auto_threads", "AUTO_THREADS_MIN_PARAMS",
           "AUTO_THREADS_MAX"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU if CUDA is available, else the CPU; otherwise the named device.

    Raises ConfigError for a name torch does not know or a CUDA device on a machine without CUDA.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        return torch.device("cpu")
    try:
        dev = torch.device(f"cuda:{local_rank}" if name == "cuda" and local_rank else name)
    except RuntimeError as e:
        raise ConfigError(f"device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device: 'mps' was asked for but MPS (Apple GPU) is not available here; use 'cpu' or "
                          "'auto'")
    return dev


def build_dataset(cfg: Config) -> data_lib.Dataset:
    """The configured dataset, normalised per channel if ``data.normalize``."""
    kwargs = cfg.data.extras()
    if cfg.data.name in ("cifar10", "cifar100"):
        kwargs["root"] = cfg.data.root
    try:
        ds = data_lib.create(cfg.data.name, **kwargs)
    except SgdlabError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError, IndexError) as e:
        raise ConfigError(f"data ({cfg.data.name}, options {cfg.data.extras()}): {first_line(e)}") from None
    return ds.normalized() if cfg.data.normalize else ds


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), at most 300 characters."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def step_error(cfg: Config, x: torch.Tensor, y: torch.Tensor, e: BaseException) -> ConfigError:
    """The one-line error of a first training step that fails (the model and the data disagree)."""
    return ConfigError(f"model {cfg.model.name} cannot train on {cfg.data.name} batches of shape {tuple(x.shape)} "
                       f"with labels up to {int(y.max()) if y.numel() else 0}: {first_line(e)}")


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s trainable parameters (ConfigError naming ``optim``)."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay)
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def build_model(cfg: Config, num_classes: int, input_shape: tuple[int, ...] | None = None) -> torch.nn.Module:
    """The configured model from the registry (ConfigError naming ``model`` if its options are invalid).

    ``input_shape`` (the dataset's per-example shape) fills the builder's input parameters the config leaves
    unset (``in_features``, ``in_channels``, ...; see :func:`sgdlab.models.shape_kwargs`).
    The model is first built on the meta device, so options that would need more memory than the machine
    has (``channels: 100000000``) are refused before anything is allocated.
    """
    where = f"model ({cfg.model.name}, options {cfg.model.extras()})"
    try:
        with torch.device("meta"):
            probe = models.create(cfg.model.name, num_classes=num_classes, input_shape=input_shape,
                                  **cfg.model.extras())
        need = sum(p.numel() * p.element_size() for p in probe.parameters())
        have = _physical_memory()
        if have is not None and need > have:
            raise ConfigError(f"{where}: its parameters alone need {need / 2**30:.1f} GiB, more than this "
                              f"machine's {have / 2**30:.1f} GiB")
        del probe
        return models.create(cfg.model.name, num_classes=num_classes, input_shape=input_shape,
                                  **cfg.model.extras())
    except SgdlabError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError, IndexError, ZeroDivisionError) as e:
        raise ConfigError(f"{where}: {first_line(e)}") from None


def load_weights(model: torch.nn.Module, source: str) -> tuple[int, int]:
    """Initialise ``model`` from a checkpoint file or run directory (fine-tuning); returns (loaded, skipped).

    Tensors are matched by name and shape; a checkpoint with none of the model's tensors is refused.
    """
    path = Path(source)
    if path.is_dir() and (path / CHECKPOINT).exists():
        path = path / CHECKPOINT
    try:
        state = guard.load_checkpoint(path, require_run=False)
    except guard.CheckpointError as e:
        raise ConfigError(f"checkpoint.init_from: {e}") from None
    state = state.get("model", state)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if own and not matched:  # a checkpoint of another architecture: fine-tuning from it would be a fresh start
        raise ConfigError(f"checkpoint.init_from: {path} has none of this model's {len(own)} tensors (by name "
                          "and shape); it holds another architecture")
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own) - len(matched)


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """``model.load_state_dict(state)``; a CheckpointError naming ``path`` if the state is of another model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise guard.CheckpointError(f"{path}: not a checkpoint of this model ({first_line(e)})") from None


class SmoothedCrossEntropy:
    """Per-example label-smoothed cross-entropy ``loss(logits, y)``.

    Given to score-driven samplers as their loss, so that the importance scores (Katharopoulos & Fleuret
    2018, eq. 19: the norm of the loss gradient w.r.t. the logits) differentiate the loss that
    is actually trained (``||softmax(z) - ((1 - eps) onehot(y) + eps / K)||``), not the unsmoothed one.
    """

    def __init__(self, label_smoothing: float):
        self.label_smoothing = float(label_smoothing)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example_loss("cross_entropy", logits, y, self.label_smoothing)

    def __repr__(self) -> str:
        return f"SmoothedCrossEntropy({self.label_smoothing})"


def per_example_loss(name: str, logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-example data loss: cross-entropy (optionally label-smoothed) or squared error to one-hot."""
    if name == "cross_entropy":
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    target = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return 0.5 * (logits - target).pow(2).sum(-1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
             loss: str = "cross_entropy", device=None, channels_last: bool = False) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in eval mode (mode restored), batches weighted by size."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total_loss, correct, n = 0.0, 0, 0
    try:
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)
            yb = y[i:i + batch_size].to(device, non_blocking=True)
            if channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            logits = model(xb).float()
            total_loss += float(per_example_loss(loss, logits, yb).sum())
            correct += int((logits.argmax(-1) == yb).sum())
            n += len(yb)
    finally:
        model.train(was_training)
    return {"loss": total_loss / max(n, 1), "acc": correct / max(n, 1)}


# Models below this many parameters train fastest, and at a stable speed, on one CPU thread: their
# kernels are too small to split, and on a shared machine extra threads wait for busy cores
# (docs/engine.md, "CPU threads"; measured with benchmarks/threads.py).
AUTO_THREADS_MIN_PARAMS = 2_000_000
AUTO_THREADS_MAX = 8


def auto_threads(num_params: int, cores: int | None = None) -> int:
    """The torch thread count of ``threads: auto``: 1 below :data:`AUTO_THREADS_MIN_PARAMS` parameters,
    else ``min(cores, AUTO_THREADS_MAX)``."""
    if num_params < AUTO_THREADS_MIN_PARAMS:
        return 1
    return max(1, min(cores or os.cpu_count() or 1, AUTO_THREADS_MAX))
