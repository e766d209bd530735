"""``sgdlab check``: validate a config and instantiate its model and data pipeline without training."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import models, regularize, sampling
from ..errors import SgdlabError
from ..schedules import Schedule
from .config import load_config
from .engine import build_dataset

__all__ = ["check_config"]

# Training-set sizes of the datasets whose files may be missing on this machine.
_KNOWN_SIZES = {"cifar10": (50000, 10, (3, 32, 32)), "cifar100": (50000, 100, (3, 32, 32))}


def check_config(path, overrides: list[str] | None = None) -> tuple[bool, list[str]]:
    """Validate ``path`` and build its dataset, model (on the meta device), sampler and loss transforms.

    Missing data files are reported and the rest is still checked with the dataset's known sizes.
    Returns ``(ok, lines)``.
    """
    lines: list[str] = []
    try:
        cfg = load_config(Path(path), overrides)
    except SgdlabError as e:
        return False, [str(e)]
    try:
        try:
            ds = build_dataset(cfg)
            n, num_classes, shape = len(ds.train_y), ds.num_classes, tuple(ds.train_x.shape[1:])
            lines.append(f"data: {cfg.data.name}, {n} train / {len(ds.test_y)} test, shape {shape}")
        except SgdlabError as e:
            if cfg.data.name not in _KNOWN_SIZES:
                raise
            n, num_classes, shape = _KNOWN_SIZES[cfg.data.name]
            lines.append(f"data: files missing ({e}); checked the rest with {n} examples of shape {shape}")
        with torch.device("meta"):
            model = models.create(cfg.model.name, num_classes=num_classes, **cfg.model.extras())
        params = sum(p.numel() for p in model.parameters())
        expected = models.input_shape(cfg.model.name)
        if len(expected) == len(shape) and expected[0] != shape[0] and cfg.model.name not in ("lstm_pixel",):
            lines.append(f"warning: model {cfg.model.name} expects inputs {expected}, data has {shape}")
        lines.append(f"model: {cfg.model.name}, {params / 1e6:.2f}M parameters")
        ctx = sampling.SourceContext(num_samples=n, batch_size=cfg.sampler.batch_size, seed=cfg.seed, model=model,
                                     train_x=None, train_y=None, loss=cfg.loss.name)
        source = sampling.create(cfg.sampler.name, ctx, **cfg.sampler.extras())
        lines.append(f"sampler: {cfg.sampler.name}, batch {cfg.sampler.batch_size}, {len(source)} steps per epoch")
        for name, opts in cfg.loss.extras().items():
            if opts is not None:
                regularize.create_loss_transform(name, seed=cfg.seed, **opts)
                lines.append(f"loss transform: {name} {opts}")
        s = cfg.schedule
        d = cfg.duration
        steps_per_epoch = max(len(source), 1)
        total = {"fraction": 1.0, "seconds": d.value if d.unit == "seconds" else None}.get(s.unit)
        if d.unit != "seconds" and s.unit in ("steps", "epochs"):
            steps = d.value if d.unit == "steps" else d.value * steps_per_epoch
            total = steps if s.unit == "steps" else steps / steps_per_epoch
        Schedule(name=s.name, total=total, milestones=tuple(s.milestones), factor=s.factor, power=s.power,
                 period=s.period, low=s.low, warmup=s.warmup, warmup_from=s.warmup_from)
        lines.append(f"duration: {d}; schedule: {s.name} in {s.unit}")
    except (SgdlabError, ValueError, TypeError) as e:
        return False, lines + [f"{type(e).__name__}: {e}"]
    return True, lines
