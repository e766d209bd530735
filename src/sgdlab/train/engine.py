"""The training engine: a config in, a run directory out.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` and
``metrics.csv``, ``checkpoints/last.pt``, optional TensorBoard events, and ``summary.json``.

The loop only ever talks to the methods through their protocols: a
:class:`~sgdlab.sampling.BatchSource` chooses each mini-batch (and its weights), loss transforms
(:mod:`sgdlab.regularize`) reshape the per-example losses, models come from the registry, and
learning rates from a pure :class:`~sgdlab.schedules.Schedule`. Checkpoints are written
atomically and hold the model, optimizer, batch source, loss transforms and every RNG, so a
resumed run ends bit-identically where an uninterrupted one does (on CPU).

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on GPU); every rank draws the same global batch and keeps its slice; rank 0
evaluates and writes metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .. import data as data_lib
from .. import files, models, regularize, sampling
from ..data import cifar_augment
from ..errors import ConfigError, NonFiniteLossError, SgdlabError
from ..schedules import Schedule
from ..seeding import torch_seed
from . import guard
from .config import MAX_THREADS, Config, config_to_dict, load_config, resume_drift

__all__ = ["run", "resume", "load_run", "build_dataset", "build_model", "per_example_loss", "evaluate"]

CHECKPOINT = "checkpoints/last.pt"


# ------------------------------------------------------------------------------------------------
# Building blocks (usable on their own)
# ------------------------------------------------------------------------------------------------


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
        raise ConfigError(f"data ({cfg.data.name}, options {cfg.data.extras()}): {_first_line(e)}") from None
    return ds.normalized() if cfg.data.normalize else ds


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def step_error(cfg: Config, x: torch.Tensor, y: torch.Tensor, e: BaseException) -> ConfigError:
    """The one-line error of a first training step that fails (the model and the data disagree)."""
    return ConfigError(f"model {cfg.model.name} cannot train on {cfg.data.name} batches of shape {tuple(x.shape)} "
                       f"with labels up to {int(y.max()) if y.numel() else 0}: {_first_line(e)}")


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
        raise ConfigError(f"{where}: {_first_line(e)}") from None


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


def _rng_state(aug_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
        "augment": aug_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh temporary file, renamed: a full disk leaves the previous checkpoint as it was, and no link is followed
    with files.atomic_write(path, "wb", fsync=True) as f:
        torch.save(obj, f)


def _rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s own random stream, derived from the run's seed (stable across machines)."""
    return int(np.random.SeedSequence([seed & (2**63 - 1), rank]).generate_state(1, np.uint64)[0] >> 1)


def _atomic_write_text(path: Path, text: str) -> None:
    files.write_text(path, text)


def _load_weights(model: torch.nn.Module, source: str) -> tuple[int, int]:
    """Initialise ``model`` from a checkpoint file or run directory (fine-tuning); returns (loaded, skipped)."""
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


# ------------------------------------------------------------------------------------------------
# Distributed setup
# ------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        # a worker of torchrun: die with the launcher (even when it is SIGKILLed), never linger as an orphan
        # that keeps writing checkpoints; a SIGTERM that torchrun forwards still stops the run gracefully
        guard.die_with_parent(signal.SIGKILL)
    owned = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owned = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owned)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def _json_line(row: dict) -> str:
    """One strict-JSON line (non-finite numbers are written as null)."""
    return json.dumps(guard.finite_json(row), allow_nan=False) + "\n"


def _read_rows(lines, path) -> list[dict]:
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if line.endswith("\n"):
                raise ConfigError(f"{path}:{i}: not a JSON line ({e.msg})") from None
            break  # a last line cut by a kill: the rows after the checkpoint are rewritten anyway
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ConfigError(f"{path}:{i}: not a metrics row")
        rows.append(row)
    return rows


class _Metrics:
    """Appends rows to metrics.jsonl (flushed each row), mirrors them to CSV and TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, keep_until_step: int | None):
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        self.writer = None
        if not enabled:
            return
        if self.jsonl.exists():
            with open(self.jsonl) as f:
                self.rows = _read_rows(f, self.jsonl)
            if keep_until_step is not None:
                self.rows = [r for r in self.rows if r["step"] <= keep_until_step]
            _atomic_write_text(self.jsonl, "".join(_json_line(r) for r in self.rows))
        self.fh = files.open_append(self.jsonl)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("log.tensorboard: tensorboard is not installed (pip install 'sgdlab[tensorboard]'); skipped")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = guard.finite_json(row)
        self.rows.append(row)
        self.fh.write(_json_line(row))
        self.fh.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["step"])

    def write_csv(self) -> None:
        if not self.enabled:
            return
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with files.atomic_write(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.writer is not None:
                self.writer.close()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _progress(enabled: bool, total: float, unit: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn() if unit == "steps" else
            TextColumn("{task.completed:.0f}/{task.total:.0f} s"), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*cols, transient=False)


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


def run(config, out_dir=None, *, overrides: list[str] | None = None, resume: bool = False,
        quiet: bool = False, threads: int | None = None) -> dict:
    """Train as ``config`` says (a YAML path, dict or :class:`Config`) into ``out_dir``; return the summary.

    With ``resume=True`` an existing run directory continues from ``checkpoints/last.pt`` to its
    configured end (the directory's own ``config.yaml`` is used; ``overrides`` may change only the keys
    a resume may change, see :func:`~sgdlab.train.config.resume_drift`). ``threads`` (torch CPU threads)
    overrides the config's ``threads`` key for this call; the previous thread count is restored at the end.

    The folder is locked for the whole run (:class:`~sgdlab.train.guard.FolderLock`). SIGTERM, SIGINT and
    SIGUSR1 stop the run after the current step with a checkpoint and a summary of status ``interrupted``
    and raise :class:`~sgdlab.train.guard.RunInterrupted`. A run whose set-up fails leaves nothing behind
    that would block the next ``run`` into the same folder.
    """
    _check_threads(threads)
    if resume:
        run_dir = Path(out_dir)
        _require_run_dir(run_dir)
    else:
        cfg = load_config(config, overrides)
        run_dir = Path(out_dir) if out_dir is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: is a file, not a directory")
    dist = _setup_distributed(load_config(run_dir / "config.yaml").device if resume else cfg.device)
    created = not run_dir.exists()
    lock = None
    previous_threads = torch.get_num_threads()
    try:
        with guard.stop_signals():
            if dist.main:
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = guard.FolderLock(run_dir, "run").acquire()
            ckpt = None
            if resume:
                cfg, ckpt = _resume_config(run_dir, overrides)
            try:
                return _Run(cfg, run_dir, dist, resume=resume, quiet=quiet, threads=threads, ckpt=ckpt).train()
            except (NonFiniteLossError, guard.RunInterrupted) as e:
                if not resume and isinstance(e, guard.RunInterrupted) and e.summary is None:
                    _clean_failed_setup(run_dir, created)
                raise
            except BaseException:
                if not resume and dist.main:
                    _clean_failed_setup(run_dir, created)
                raise
    finally:
        torch.set_num_threads(previous_threads)
        if lock is not None:
            lock.release()
            if created and not run_dir.joinpath("config.yaml").exists():
                with contextlib.suppress(OSError):
                    (run_dir / guard.LOCK_NAME).unlink()
                    run_dir.rmdir()
        if dist.owned:
            torch.distributed.destroy_process_group()


def _require_run_dir(run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")


def _check_threads(threads) -> None:
    """The ``threads`` argument of :func:`run`/:func:`resume` (``--threads``): None or 1..MAX_THREADS."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise ConfigError(f"--threads: must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")


def _clean_failed_setup(run_dir: Path, created: bool) -> None:
    """Remove what a run that failed before its first metrics row or checkpoint wrote, so it blocks nothing."""
    jsonl = run_dir / "metrics.jsonl"
    if (run_dir / CHECKPOINT).exists() or (run_dir / "summary.json").exists() or \
            (jsonl.is_file() and jsonl.stat().st_size > 0):
        return
    for name in ("metrics.jsonl", "metrics.csv", "config.yaml"):
        with contextlib.suppress(OSError):
            (run_dir / name).unlink()
    with contextlib.suppress(OSError):
        (run_dir / "checkpoints").rmdir()


def _resume_config(run_dir: Path, overrides: list[str] | None) -> tuple[Config, dict | None]:
    """The config a resume continues with, and the checkpoint (None if the run died before writing one).

    ``config.yaml`` (plus ``overrides``) must match the config recorded in the checkpoint except for the
    keys a resume may change; otherwise ConfigError lists each changed key.
    """
    ckpt_path = run_dir / CHECKPOINT
    ckpt = guard.load_checkpoint(ckpt_path) if ckpt_path.exists() or ckpt_path.is_symlink() else None
    on_disk = load_config(run_dir / "config.yaml")
    cfg = load_config(on_disk, overrides) if overrides else on_disk
    if ckpt is not None and isinstance(ckpt.get("config"), dict):
        problems = resume_drift(ckpt["config"], config_to_dict(cfg))
        if problems:
            raise ConfigError(f"{run_dir}: {problems}")
    return cfg, ckpt


def resume(run_dir, *, overrides: list[str] | None = None, quiet: bool = False,
           threads: int | None = None) -> dict:
    """Continue the interrupted run in ``run_dir`` to its configured end; return the summary.

    ``overrides`` (``["duration=300 epochs"]``) may extend the duration or change ``eval.every``,
    ``checkpoint.every`` and ``log.*``; a completed run extended this way continues.
    """
    _check_threads(threads)
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if summary.is_file() and not overrides:
        try:
            done = json.loads(summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            done = {}
        if isinstance(done, dict) and done.get("status") == "completed":
            # nothing to train, but the folder must still be the run it claims to be: a config that loads,
            # a checkpoint that passes its checks and was written by that config
            _require_run_dir(run_dir)
            _resume_config(run_dir, None)
            return done
    return run(None, run_dir, overrides=overrides, resume=True, quiet=quiet, threads=threads)


def load_run(run_dir, *, checkpoint: str = CHECKPOINT, device="cpu"):
    """``(config, model, dataset)`` of a run directory, the model loaded from its last checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ds = build_dataset(cfg)
    model = build_model(cfg, ds.num_classes, ds.input_shape)
    state = guard.load_checkpoint(run_dir / checkpoint)
    _load_model_state(model, state["model"], run_dir / checkpoint)
    return cfg, model.to(device).eval(), ds


def _load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise guard.CheckpointError(f"{path}: not a checkpoint of this model ({_first_line(e)})") from None


class _Run:
    def __init__(self, cfg: Config, run_dir: Path, dist: _Dist, *, resume: bool, quiet: bool,
                 threads: int | None = None, ckpt: dict | None = None):
        self.cfg, self.run_dir, self.dist, self.quiet = cfg, run_dir, dist, quiet
        self.device = resolve_device(cfg.device, dist.local_rank)
        ckpt_path = run_dir / CHECKPOINT
        self.ckpt = ckpt
        jsonl = run_dir / "metrics.jsonl"
        if not resume and (ckpt_path.exists() or (run_dir / "summary.json").exists()
                           or (jsonl.exists() and (not jsonl.is_file() or jsonl.stat().st_size > 0))):
            raise ConfigError(f"{run_dir} already holds a run; use 'sgdlab resume {run_dir}' or another --out")
        if dist.main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            _atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

        # Seed everything before anything random is built.
        torch.manual_seed(torch_seed(cfg.seed))  # every bit of the seed counts (torch keeps 32)
        np.random.seed(torch_seed(cfg.seed))
        random.seed(cfg.seed)

        ds = build_dataset(cfg)
        self.ds = ds.to(self.device) if cfg.data.on_device else ds
        self.num_train = len(ds.train_y)
        data_device = self.ds.train_x.device
        self.aug_gen = torch.Generator(device=data_device).manual_seed(torch_seed(cfg.seed + 1))
        fill = None
        if cfg.data.augment:
            if ds.train_x.dim() != 4:
                raise ConfigError(f"data.augment: the CIFAR augmentation needs images (N, C, H, W); "
                                  f"{cfg.data.name} has shape {tuple(ds.train_x.shape)}")
            fill = (-ds.mean / ds.std) if ds.mean is not None else 0.0  # black, after normalisation
            fill = fill.to(data_device) if isinstance(fill, torch.Tensor) else fill
        self.fill = fill

        model = build_model(cfg, ds.num_classes, ds.input_shape)
        wanted = threads if threads is not None else cfg.threads
        self.threads = auto_threads(sum(p.numel() for p in model.parameters())) if wanted == "auto" else int(wanted)
        torch.set_num_threads(self.threads)
        if cfg.checkpoint.init_from and self.ckpt is None:
            loaded, skipped = _load_weights(model, cfg.checkpoint.init_from)
            self._say(f"initialised {loaded} tensors from {cfg.checkpoint.init_from} ({skipped} kept fresh)")
        if dist.enabled and dist.rank > 0:
            # Every rank built the same model from the same seed; from here on each rank needs its own
            # stream, or dropout masks, shake coefficients and crops would repeat across the ranks'
            # slices of the global batch. Rank 0 keeps the single-process stream.
            torch.manual_seed(_rank_seed(cfg.seed, dist.rank))
            self.aug_gen.manual_seed(_rank_seed(cfg.seed + 1, dist.rank))
        model.to(self.device)
        if cfg.fast.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt = build_optimizer(cfg, model)
        self.train_model = model
        if dist.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.fast.compile:
            self.train_model = torch.compile(self.train_model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.fast.autocast == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.fast.autocast or "")

        # the loss that score-driven samplers differentiate: the trained one, label smoothing included
        self.score_loss = (SmoothedCrossEntropy(cfg.loss.label_smoothing) if cfg.loss.label_smoothing > 0
                           else cfg.loss.name)
        ctx = sampling.SourceContext(
            num_samples=self.num_train, batch_size=cfg.sampler.batch_size, seed=cfg.seed,
            rank=dist.rank if dist.enabled else None, world_size=dist.world_size if dist.enabled else None,
            model=model, train_x=self.ds.train_x, train_y=self.ds.train_y, device=self.device, loss=self.score_loss)
        try:
            self.source = sampling.create(cfg.sampler.name, ctx, **cfg.sampler.extras())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sampler: {e}") from None
        self.transforms = []
        for i, (name, opts) in enumerate(sorted(cfg.loss.extras().items())):
            if opts is None:
                continue
            try:
                self.transforms.append(regularize.create_loss_transform(name, seed=cfg.seed + 1000 + i, **opts))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"loss.{name}: {e}") from None
        self.wants_scores = bool(getattr(self.source, "wants_scores", False))
        self.wants_losses = bool(getattr(self.source, "wants_losses", False))

        self.steps_per_epoch = max(len(self.source), 1)
        d = cfg.duration
        self.total_steps = None if d.unit == "seconds" else (
            int(d.value) if d.unit == "steps" else max(1, round(d.value * self.steps_per_epoch)))
        s = cfg.schedule
        try:
            self.schedule = Schedule(
                name=s.name, total=self._total_in(s.unit), milestones=tuple(s.milestones), factor=s.factor,
                power=s.power, period=s.period, low=s.low, warmup=s.warmup, warmup_from=s.warmup_from)
        except ValueError as e:
            raise ConfigError(f"schedule: {e}") from None

        self.step, self.elapsed = 0, 0.0
        self.acc_loss, self.acc_n = torch.zeros((), device=self.device), 0
        self.best = {"test_acc": None, "test_loss": None, "step": None}
        if self.ckpt is not None:
            self._restore(self.ckpt)
        self.metrics = _Metrics(run_dir, dist.main, cfg.log.tensorboard,
                                keep_until_step=self.step if resume else None)

    # -- helpers ------------------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self.dist.main and not self.quiet:
            print(msg, flush=True)

    def _total_in(self, unit: str) -> float | None:
        d = self.cfg.duration
        if unit == "fraction":
            return 1.0
        if d.unit == "seconds":
            return d.value if unit == "seconds" else None
        if unit == "steps":
            return float(self.total_steps)
        if unit == "epochs":
            return self.total_steps / self.steps_per_epoch
        return None  # seconds unit on a step-based run: no known total (constant-like schedules only)

    def _position(self, unit: str) -> float:
        if unit == "steps":
            return float(self.step)
        if unit == "epochs":
            return self.step / self.steps_per_epoch
        if unit == "seconds":
            return self.elapsed
        if self.total_steps is not None:
            return self.step / self.total_steps
        return self.elapsed / self.cfg.duration.value

    def _done(self) -> bool:
        if self.total_steps is not None:
            return self.step >= self.total_steps
        return self.elapsed >= self.cfg.duration.value

    def _state(self, rng: dict | None = None, rng_ranks: list | None = None) -> dict:
        state = {
            "step": self.step, "elapsed": self.elapsed, "best": dict(self.best),
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(), "source": self.source.state_dict(),
            "transforms": [t.state_dict() for t in self.transforms],
            "rng": rng if rng is not None else _rng_state(self.aug_gen),
            "world_size": self.dist.world_size, "threads": torch.get_num_threads(),
            "acc_loss": self.acc_loss.detach().cpu(), "acc_n": self.acc_n,
            "config": config_to_dict(self.cfg), "format": "sgdlab-run-checkpoint",
        }
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        return state

    def _restore(self, st: dict) -> None:
        saved_world = st.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise ConfigError(f"{self.run_dir} was trained with {saved_world} process(es); resume it with the "
                              f"same number, not {self.dist.world_size}")
        path = self.run_dir / CHECKPOINT
        _load_model_state(self.model, st["model"], path)
        try:
            self.opt.load_state_dict(st["optimizer"])
            self.scaler.load_state_dict(st["scaler"])
            self.source.load_state_dict(st["source"])
            if len(st["transforms"]) != len(self.transforms):
                raise ValueError("a different number of loss transforms")
            for t, s in zip(self.transforms, st["transforms"]):
                t.load_state_dict(s)
            ranks = st.get("rng_ranks")
            _set_rng_state(ranks[self.dist.rank] if ranks else st["rng"], self.aug_gen)
            self.step, self.elapsed, self.best = int(st["step"]), float(st["elapsed"]), dict(st["best"])
            if self.step < 0 or self.step != st["step"] or not self.elapsed >= 0:
                raise ValueError(f"step {st['step']!r} and elapsed {st['elapsed']!r} must be non-negative")
            self.acc_loss = st.get("acc_loss", torch.zeros(())).to(self.device)
            self.acc_n = int(st.get("acc_n", 0))
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise guard.CheckpointError(f"{path}: does not fit this run's optimizer, sampler or loss "
                                        f"transforms ({type(e).__name__}: {_first_line(e)})") from None
        self._say(f"resumed at step {self.step}")
        threads = st.get("threads")
        if threads is not None and threads != torch.get_num_threads():
            self._say(f"note: this run was trained on {threads} torch thread(s) and resumes on "
                      f"{torch.get_num_threads()}; CPU kernels sum in a thread-dependent order, so the numbers "
                      f"can differ in the last bits from an uninterrupted run (torch.set_num_threads({threads}) "
                      "or OMP_NUM_THREADS avoids it)")

    def _component_metrics(self) -> dict:
        out: dict = {}
        for c in [self.source, *self.transforms]:
            m = getattr(c, "metrics", None)
            if callable(m):
                out.update({k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                            for k, v in m().items()})
        return out

    def _evaluate(self) -> dict:
        c = self.cfg
        kw = dict(batch_size=c.eval.batch_size, loss=c.loss.name, device=self.device,
                  channels_last=c.fast.channels_last)
        row = {}
        with self._autocast():
            ev = evaluate(self.model, self.ds.test_x, self.ds.test_y, **kw)
            row.update(test_loss=ev["loss"], test_acc=ev["acc"])
            if c.eval.train:
                ev = evaluate(self.model, self.ds.train_x, self.ds.train_y, **kw)
                row.update(train_eval_loss=ev["loss"], train_eval_acc=ev["acc"])
        if self.best["test_acc"] is None or row["test_acc"] > self.best["test_acc"]:
            self.best.update(test_acc=row["test_acc"], step=self.step)
        if self.best["test_loss"] is None or row["test_loss"] < self.best["test_loss"]:
            self.best["test_loss"] = row["test_loss"]
        return row

    def _stop_nonfinite(self, train_loss: float, last_eval: dict | None) -> None:
        """Record the non-finite step, write the summary and raise NonFiniteLossError."""
        kept = (f"The last good checkpoint is kept in {self.run_dir / CHECKPOINT}"
                if (self.run_dir / CHECKPOINT).is_file() else "No checkpoint had been written yet")
        msg = f"non-finite training loss ({train_loss}) at step {self.step}; stopped. {kept}"
        self.metrics.write({"step": self.step, "epoch": self.step / self.steps_per_epoch, "time": self.elapsed,
                            "train_loss": train_loss})
        self.metrics.write_csv()
        self.metrics.close()
        self._summary("nonfinite", last_eval, msg)
        raise NonFiniteLossError(msg)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _save(self) -> None:
        rng = _rng_state(self.aug_gen)
        rng_ranks = None
        if self.dist.enabled:  # every rank's random streams, so a resumed run continues each of them
            rng_ranks = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rng_ranks, rng)
        if self.dist.main:
            _atomic_torch_save(self._state(rng, rng_ranks), self.run_dir / CHECKPOINT)
            self.metrics.write_csv()

    def _interrupt(self, last_eval: dict | None, saved: bool = True) -> None:
        """Save the state after the step just taken, write an ``interrupted`` summary, raise RunInterrupted."""
        signum = guard.stop_requested() or signal.SIGTERM
        name = guard.signal_name(signum)
        if self.step > 0 and saved:
            self._save()
        self.metrics.write_csv()
        self.metrics.close()
        if self.step == 0 or (not saved and not (self.run_dir / CHECKPOINT).exists()):
            raise guard.RunInterrupted(f"{name} during the set-up of {self.run_dir}, before the first step; "
                                       "nothing to resume, start it again", signum)
        msg = (f"{name} at step {self.step}: checkpoint and summary written; continue with "
               f"'sgdlab resume {self.run_dir}'")
        summary = self._summary("interrupted", last_eval, msg)
        self._say(msg)
        raise guard.RunInterrupted(msg, signum, summary)

    def _summary(self, status: str, last_eval: dict | None, message: str | None = None) -> dict:
        s = {
            "status": status, "steps": self.step, "epochs": self.step / self.steps_per_epoch,
            "wall_time": self.elapsed, "final": last_eval or {},
            "best": {"test_acc": self.best["test_acc"], "test_loss": self.best["test_loss"],
                     "step": self.best["step"]},
            "world_size": self.dist.world_size, "threads": self.threads,
        }
        if message:
            s["message"] = message
        s = guard.finite_json(s)
        if self.dist.main:
            _atomic_write_text(self.run_dir / "summary.json", json.dumps(s, indent=2, allow_nan=False))
        return s

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> dict:
        c, dist = self.cfg, self.dist
        x_all, y_all = self.ds.train_x, self.ds.train_y
        data_device = x_all.device
        model, opt, source, transforms = self.train_model, self.opt, self.source, self.transforms
        base_lrs = [c.optim.lr] * len(opt.param_groups)  # never the scheduled lr of a restored optimizer
        unit, log_every = c.schedule.unit, c.log.every
        eval_every, ckpt_every = c.eval.every, c.checkpoint.every
        by_time = self.total_steps is None
        channels_last = c.fast.channels_last
        loss_name, smoothing = c.loss.name, c.loss.label_smoothing
        clip = c.optim.grad_clip
        use_scaler = self.scaler.is_enabled()
        move_batch = data_device != self.device
        sync_clock = self.device.type == "cuda"
        autocast = self._autocast
        acc_loss = self.acc_loss
        last_eval: dict | None = None
        first_step = self.step
        if guard.stop_requested() is not None:  # a signal arrived during the set-up
            self._interrupt(last_eval, saved=False)
        self.model.train()
        progress_total = self.total_steps if not by_time else c.duration.value
        show = c.log.progress and dist.main and not self.quiet
        clock = time.perf_counter()
        with _progress(show, progress_total, "steps" if not by_time else "seconds") as bar:
            task = bar.add_task("train", total=progress_total, info="",
                                completed=self.step if not by_time else self.elapsed) if bar else None
            while not self._done():
                factor = self.schedule(self._position(unit))
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * factor
                try:
                    batch = source.next_batch()
                except FloatingPointError:
                    # a score-driven sampler scores with the model: a diverged model shows up here first
                    self._stop_nonfinite(float("nan"), last_eval)
                idx = batch.indices
                if data_device != idx.device:
                    idx = idx.to(data_device)
                x, y = x_all[idx], y_all[idx]
                if self.fill is not None:  # augmentation runs where the data lives
                    x = cifar_augment(x, fill=self.fill, generator=self.aug_gen)
                if move_batch:
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                try:
                    with autocast():
                        logits = model(x)
                    losses = per_example_loss(loss_name, logits.float(), y, smoothing)
                    raw_losses = losses
                    if batch.weights is not None:
                        losses = losses * batch.weights.to(losses.device, losses.dtype)
                    epoch = self.step / self.steps_per_epoch
                    for t in transforms:
                        losses = t(losses, step=self.step, epoch=epoch)
                    loss = losses.mean()
                    opt.zero_grad(set_to_none=True)
                    if use_scaler:
                        self.scaler.scale(loss).backward()
                        if clip is not None:
                            self.scaler.unscale_(opt)
                            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                        self.scaler.step(opt)
                        self.scaler.update()
                    else:
                        loss.backward()
                        if clip is not None:
                            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                        opt.step()
                except (RuntimeError, ValueError, IndexError, TypeError) as e:
                    if self.step != first_step or isinstance(e, SgdlabError):
                        raise
                    # the first step of a set-up that cannot train (model and data disagree): one line
                    raise step_error(c, x, y, e) from None
                diverged = False
                if self.wants_scores or self.wants_losses:
                    # Feedback from a diverged step would poison the sampler's state (and make it raise);
                    # stop with the usual non-finite report instead. These samplers synchronise every
                    # step anyway, so the check costs nothing extra.
                    ok = torch.isfinite(loss.detach()).float()
                    if dist.enabled:
                        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
                    diverged = not bool(ok.item())
                    if not diverged:
                        scores = None
                        if self.wants_scores:
                            from ..sampling.importance import upper_bound_scores

                            scores = upper_bound_scores(logits.detach().float(), y, loss=self.score_loss)
                        source.observe(batch.indices, losses=raw_losses.detach(), scores=scores)
                acc_loss += loss.detach()
                self.acc_n += 1
                self.step += 1
                now = time.perf_counter()
                self.elapsed += now - clock
                clock = now

                at_log = self.step % log_every == 0
                at_eval = eval_every > 0 and self.step % eval_every == 0
                at_ckpt = ckpt_every > 0 and self.step % ckpt_every == 0
                if by_time and dist.enabled and at_log:
                    flag = torch.tensor([1.0 if self._done() else 0.0], device=self.device)
                    torch.distributed.broadcast(flag, 0)
                    if flag.item() > 0:
                        self.elapsed = max(self.elapsed, c.duration.value)
                stopping = guard.stop_requested() is not None
                if dist.enabled:  # the ranks agree on the step they stop at (checked at log steps)
                    stopping = False
                    if at_log:
                        flag = torch.tensor([1.0 if guard.stop_requested() is not None else 0.0],
                                            device=self.device)
                        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                        stopping = flag.item() > 0
                end = self._done()
                if not (at_log or at_eval or at_ckpt or end or diverged):
                    if stopping:
                        self._interrupt(last_eval)
                    continue
                # ---- bookkeeping (not counted in the training clock) ----
                if sync_clock:  # queued GPU work belongs to the steps just taken
                    torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    self.elapsed += now - clock
                    clock = now
                mean_loss = acc_loss / max(self.acc_n, 1)
                if dist.enabled:
                    torch.distributed.all_reduce(mean_loss)
                    mean_loss = mean_loss / dist.world_size
                train_loss = float(mean_loss)
                acc_loss.zero_()
                self.acc_n = 0
                if diverged or not math.isfinite(train_loss):
                    self._stop_nonfinite(train_loss if not math.isfinite(train_loss) else float("nan"), last_eval)
                row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "time": self.elapsed,
                       "lr": opt.param_groups[0]["lr"], "train_loss": train_loss}
                row.update(self._component_metrics())
                if (at_eval or end) and dist.main:
                    last_eval = self._evaluate()
                    row.update(last_eval)
                self.metrics.write(row)
                if bar is not None:
                    info = f"loss {train_loss:.4f}" + (f"  test acc {last_eval['test_acc']:.4f}" if last_eval else "")
                    bar.update(task, completed=self.step if not by_time else min(self.elapsed, progress_total),
                               info=info)
                if at_ckpt or end:
                    self._save()
                if stopping and not end:
                    self._interrupt(last_eval)
                clock = time.perf_counter()
        if last_eval is None and dist.main and self.step > 0:
            # resumed at the end (killed after the last checkpoint, before the summary): evaluate the
            # final model so the summary carries the same results as an uninterrupted run
            last_eval = self._evaluate()
        self.metrics.close()
        summary = self._summary("completed", last_eval)
        if last_eval:
            self._say(f"done: {self.step} steps, {self.elapsed:.1f} s; test accuracy {last_eval['test_acc']:.4f}, "
                      f"test loss {last_eval['test_loss']:.4f}  ->  {self.run_dir}")
        return summary
