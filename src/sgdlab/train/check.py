"""``sgdlab check``: validate a config, build its data, model, sampler and optimizer, and take one step.

The step is the engine's first training step on the first examples (at most 8) of one real sampled
batch (forward, loss, backward, optimizer step, on the CPU), so ``check`` passes exactly the configs that can start a run; a config that cannot
fails with the same one-line message ``run`` would give.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .. import models, regularize, sampling
from ..errors import SgdlabError
from ..schedules import Schedule
from .build import (build_dataset, build_model, build_optimizer, load_weights, per_example_loss, resolve_device,
                    step_error)
from .config import load_config

__all__ = ["check_config"]

# The step ``check`` takes uses this many examples of the sampled batch (big models stay quick on a CPU).
_STEP_EXAMPLES = 8

# Training-set sizes of the datasets whose files may be missing on this machine.
_KNOWN_SIZES = {"cifar10": (50000, 10, (3, 32, 32)), "cifar100": (50000, 100, (3, 32, 32))}


def check_config(path, overrides: list[str] | None = None, *, step: bool = True) -> tuple[bool, list[str]]:
    """Validate ``path``, build its dataset, model, sampler, loss transforms and optimizer, take one step.

    Missing data files are reported and the rest is still checked with the dataset's known sizes (the
    step then runs on a random batch of the right shape). ``step=False`` builds the model on the meta
    device and skips the step (validation only, instant for any model size). Returns ``(ok, lines)``;
    every failure is one line.
    """
    lines: list[str] = []
    try:
        cfg = load_config(Path(path), overrides)
    except SgdlabError as e:
        return False, [str(e)]
    try:
        resolve_device(cfg.device)
        ds = None
        try:
            ds = build_dataset(cfg)
            n, num_classes, shape = len(ds.train_y), ds.num_classes, tuple(ds.train_x.shape[1:])
            lines.append(f"data: {cfg.data.name}, {n} train / {len(ds.test_y)} test, shape {shape}")
        except SgdlabError as e:
            if cfg.data.name not in _KNOWN_SIZES:
                raise
            n, num_classes, shape = _KNOWN_SIZES[cfg.data.name]
            lines.append(f"data: files missing ({e}); checked the rest with {n} examples of shape {shape}")
        torch.manual_seed(cfg.seed)
        with torch.device("meta") if not step else contextlib.nullcontext():
            model = build_model(cfg, num_classes, shape)
        params = sum(p.numel() for p in model.parameters())
        expected = models.input_shape(cfg.model.name)
        if len(expected) == len(shape) and expected[0] != shape[0] and cfg.model.name not in ("lstm_pixel",):
            lines.append(f"warning: model {cfg.model.name} expects inputs {expected}, data has {shape}")
        lines.append(f"model: {cfg.model.name}, {params / 1e6:.2f}M parameters")
        if cfg.checkpoint.init_from and step:  # a meta-device model has no storage to load into
            loaded, kept = load_weights(model, cfg.checkpoint.init_from)
            lines.append(f"init_from: {loaded} tensors from {cfg.checkpoint.init_from} ({kept} kept fresh)")
        if ds is not None:
            train_x, train_y = ds.train_x, ds.train_y
        else:
            g = torch.Generator().manual_seed(0)
            m = min(n, 4 * cfg.sampler.batch_size, 10_000)
            train_x, train_y = torch.randn((m, *shape), generator=g), torch.randint(num_classes, (m,), generator=g)
        ctx = sampling.SourceContext(num_samples=len(train_y), batch_size=cfg.sampler.batch_size, seed=cfg.seed,
                                     model=model, train_x=train_x, train_y=train_y, device=torch.device("cpu"),
                                     loss=cfg.loss.name)
        try:
            source = sampling.create(cfg.sampler.name, ctx, **cfg.sampler.extras())
        except SgdlabError:
            raise
        except (TypeError, ValueError) as e:
            raise SgdlabError(f"sampler: {e}") from None
        steps = len(source) if ds is not None else -(-n // cfg.sampler.batch_size)
        lines.append(f"sampler: {cfg.sampler.name}, batch {cfg.sampler.batch_size}, {steps} steps per epoch")
        transforms = []
        for name, opts in sorted(cfg.loss.extras().items()):
            if opts is not None:
                try:
                    transforms.append(regularize.create_loss_transform(name, seed=cfg.seed, **opts))
                except (TypeError, ValueError) as e:
                    raise SgdlabError(f"loss.{name}: {e}") from None
                lines.append(f"loss transform: {name} {opts}")
        opt = build_optimizer(cfg, model)
        if not step:
            return True, [*lines, "step: skipped"]
        batch = source.next_batch()
        keep = slice(0, _STEP_EXAMPLES)  # the batch's first examples: the same shapes, a fraction of the cost
        x, y = train_x[batch.indices[keep]], train_y[batch.indices[keep]]
        try:
            losses = per_example_loss(cfg.loss.name, model(x).float(), y, cfg.loss.label_smoothing)
            if batch.weights is not None:
                losses = losses * batch.weights[keep].to(losses.dtype)
            for t in transforms:
                losses = t(losses, step=0, epoch=0.0)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            opt.step()
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            if isinstance(e, SgdlabError):
                raise
            raise step_error(cfg, x, y, e) from None
        lines.append(f"step: one training step on a batch of shape {tuple(x.shape)}: loss {float(losses.detach().mean()):.4f}")
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
    except SgdlabError as e:
        return False, lines + [" ".join(str(e).split())]
    except (ValueError, TypeError, RuntimeError, IndexError, OverflowError, MemoryError, ZeroDivisionError) as e:
        return False, lines + [f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"]
    return True, lines
