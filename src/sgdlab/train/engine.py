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
evaluates and writes metrics and checkpoints. The per-example draws (augmentation, Shake-Shake
coefficients, Random Gradient factors) are keyed by (seed, step, example index) through
:mod:`sgdlab.keyed`, so a run is the same stochastic process at any world size, and a checkpoint
written by W processes resumes on any number that divides its global batch (docs/engine.md,
"Elastic runs").

Layout: the building blocks (dataset, model, optimizer, loss, evaluation) are in
:mod:`sgdlab.train.build`, RNG state and atomic files in :mod:`sgdlab.train.state`, metric rows and
the progress bar in :mod:`sgdlab.train.metrics`, the process group in :mod:`sgdlab.train.distributed`.
This module holds :func:`run`, :func:`resume`, :func:`load_run` and ``_Run``, whose ``train()`` is the
loop: read it top to bottom.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import keyed, regularize, sampling
from ..data import cifar_augment
from ..errors import ConfigError, NonFiniteLossError, SgdlabError
from ..schedules import Schedule
from ..seeding import torch_seed
from . import guard
from .budget import ForwardEquivalents, measure_cost_ratio
from .build import (AUTO_THREADS_MAX, AUTO_THREADS_MIN_PARAMS, SmoothedCrossEntropy, auto_threads,  # noqa: F401
                    build_dataset, build_model, build_optimizer, evaluate, first_line, load_model_state,
                    load_weights, per_example_loss, resolve_device, step_error)
from .config import MAX_THREADS, Config, config_to_dict, load_config, resume_drift, resume_imports
from .distributed import Dist, convert_sync_batchnorm, setup_distributed
from .metrics import MetricsLog, progress_bar, read_rows
from .monitoring import DataLoss, build_monitors, mlflow_logger
from .state import CHECKPOINT, atomic_torch_save, atomic_write_text, rank_seed, rng_state, set_rng_state

__all__ = ["run", "resume", "load_run", "build_dataset", "build_model", "per_example_loss", "evaluate"]

# Names kept importable from here (sgdlab.train.engine.X) for code written before the split.
_Metrics, _read_rows, _load_weights = MetricsLog, read_rows, load_weights


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
    dist = setup_distributed(load_config(run_dir / "config.yaml").device if resume else cfg.device)
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
    if (run_dir / CHECKPOINT).is_file() and (run_dir / "config.yaml").is_file():
        resume_imports(run_dir, overrides, guard.checkpoint_config(run_dir / CHECKPOINT))  # before any import
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
    load_model_state(model, state["model"], run_dir / checkpoint)
    return cfg, model.to(device).eval(), ds


class _Run:
    """One training run: ``__init__`` builds it (or restores it from a checkpoint), ``train()`` runs the loop.

    ``train()`` reads like a minimal PyTorch loop; everything else is in small helpers below it:
    set-up (``_build_*``), the step's pieces (``_set_lr`` ... ``_count``), and the bookkeeping of log,
    evaluation and checkpoint steps (``_after_step``).
    """

    def __init__(self, cfg: Config, run_dir: Path, dist: Dist, *, resume: bool, quiet: bool,
                 threads: int | None = None, ckpt: dict | None = None):
        self.cfg, self.run_dir, self.dist, self.quiet = cfg, run_dir, dist, quiet
        self.device = resolve_device(cfg.device, dist.local_rank)
        self.ckpt = ckpt
        if dist.enabled and cfg.eval.seconds:
            raise ConfigError("eval.seconds: the ranks' clocks differ, so they would not agree on when to "
                              "evaluate; use eval.every (steps) under torchrun")
        self._claim_run_dir(resume)
        # Seed everything before anything random is built; the order of the builds below is the order in
        # which they draw random numbers, so it is part of the run's determinism.
        torch.manual_seed(torch_seed(cfg.seed))  # every bit of the seed counts (torch keeps 32)
        np.random.seed(torch_seed(cfg.seed))
        random.seed(cfg.seed)
        ds = self._build_data()
        self._build_model(ds, threads)
        self._build_source()
        self._build_schedule()
        self._build_monitors()

        self.step, self.elapsed = 0, 0.0
        self.acc_loss, self.acc_n = torch.zeros((), device=self.device), 0
        self.best = {"test_acc": None, "test_loss": None, "step": None}
        self.last_eval: dict | None = None
        if self.ckpt is not None:
            self._restore(self.ckpt)
        self.metrics = MetricsLog(run_dir, dist.main, cfg.log.tensorboard,
                                  keep_until_step=self.step if resume else None)
        if dist.main and cfg.log.mlflow is not False:
            self.metrics.sinks.append(mlflow_logger(cfg, run_dir, resume=resume))

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> dict:
        """Train to the configured end; return the summary (also written to ``summary.json``)."""
        model = self.train_model
        loss_name, smoothing = self.cfg.loss.name, self.cfg.loss.label_smoothing
        self._begin()
        with self._progress() as bar:
            while not self._done():
                self._set_lr()
                if self.monitors is not None:
                    self.monitors.before_step(self.model, self.step)
                batch = self._next_batch()
                keys = keyed.Keys(self.cfg.seed, self.step, batch.indices)  # per-example draws, any world size
                x, y = self._inputs(batch, keys)
                try:
                    if self.selectors:  # Composer-style selective backprop: train on the kept examples only
                        with keyed.use(keys):
                            batch, x, y = self._select(batch, x, y)
                        keys = keyed.Keys(self.cfg.seed, self.step, batch.indices)
                    with keyed.use(keys):
                        with self._autocast():
                            logits = model(x)
                        losses = per_example_loss(loss_name, logits.float(), y, smoothing)
                        loss = self._batch_loss(losses, batch.weights)
                    self._zero_grad()
                    self._backward_and_step(loss)
                except (RuntimeError, ValueError, IndexError, TypeError) as e:
                    if self.step != self._first_step or isinstance(e, SgdlabError):
                        raise
                    # the first step of a set-up that cannot train (model and data disagree): one line
                    raise step_error(self.cfg, x, y, e) from None
                diverged = self._feed_back(batch, logits, y, losses, loss)
                self.budget.add_step(len(y), len(y))
                self._count(loss)
                if self.monitors is not None:
                    self._monitor(x, y, loss, diverged)
                self._after_step(diverged, bar)
        return self._finish()

    # -- the step's pieces ----------------------------------------------------------------------

    def _begin(self) -> None:
        """Stop now if a signal came during the set-up; otherwise train mode and start the clock.

        The config values the step reads are copied into plain attributes here: the loop runs a few
        thousand steps a second on small models, where every attribute lookup shows in the throughput.
        """
        if guard.stop_requested() is not None:
            self._interrupt(saved=False)
        self.model.train()
        c = self.cfg
        self._unit = c.schedule.unit
        self._factor = None
        self._log_every, self._eval_every, self._ckpt_every = c.log.every, c.eval.every, c.checkpoint.every
        self._eval_seconds = float(c.eval.seconds)
        self._next_eval_time = self._eval_clock()
        self._channels_last = c.fast.channels_last
        self._clip = c.optim.grad_clip
        self._feedback = self.wants_scores or self.wants_losses
        self._params = [p for g in self.opt.param_groups for p in g["params"]]
        self._first_step = self.step
        self._clock = time.perf_counter()

    def _set_lr(self) -> None:
        """The schedule's factor at the current position times the configured lr, in every param group
        (and the run's progress to a source that plans by it, InfoBatch's full-data tail)."""
        if self._set_progress is not None:
            self._set_progress(self._progress_fraction())
        factor = self.schedule(self._position(self._unit))
        if factor != self._factor:
            self._factor = factor
            for g, lr in zip(self.opt.param_groups, self._base_lrs):
                g["lr"] = lr * factor

    def _next_batch(self) -> sampling.Batch:
        """The batch source's next batch; a score-driven source that meets a diverged model stops the run."""
        try:
            return self.source.next_batch()
        except FloatingPointError:
            # a score-driven sampler scores with the model: a diverged model shows up here first
            self._stop_nonfinite(float("nan"))

    def _inputs(self, batch: sampling.Batch, keys: keyed.Keys) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's examples: gathered where the data lives, augmented there (crops and flips keyed by
        the examples' indices), moved to the device."""
        idx = batch.indices
        if idx.device != self._data_device:
            idx = idx.to(self._data_device)
        x, y = self.ds.train_x[idx], self.ds.train_y[idx]
        if self.fill is not None:  # augmentation runs where the data lives
            x = cifar_augment(x, fill=self.fill, keys=keys)
        if self._move_batch:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _select(self, batch: sampling.Batch, x: torch.Tensor, y: torch.Tensor):
        """The part of the batch a selecting loss transform keeps (its own scoring forward, no gradients)."""
        progress = self._progress_fraction()
        c = self.cfg
        for t in self.selectors:
            with self._autocast():
                keep = t.select(self.model, x, y, lambda z, u: per_example_loss(c.loss.name, z, u,
                                                                                c.loss.label_smoothing),
                                step=self.step, progress=progress)
            if keep is not None:
                x, y = x[keep.to(x.device)], y[keep.to(y.device)]
                w = batch.weights
                batch = sampling.Batch(batch.indices[keep.to(batch.indices.device)],
                                       None if w is None else w[keep.to(w.device)])
        return batch, x, y

    def _batch_loss(self, losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The trained loss: per-example losses times the source's weights, through the loss transforms, mean."""
        if weights is not None:
            losses = losses * weights.to(losses.device, losses.dtype)
        if self.transforms:
            epoch = self.step / self.steps_per_epoch
            for t in self.transforms:
                if getattr(t, "wants_progress", False):
                    losses = t(losses, step=self.step, epoch=epoch, progress=self._progress_fraction())
                else:
                    losses = t(losses, step=self.step, epoch=epoch)
        return losses.mean()

    def _zero_grad(self) -> None:
        """``opt.zero_grad(set_to_none=True)`` without its profiler range (one fewer per step)."""
        for p in self._params:
            p.grad = None

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward, optional gradient clipping, optimizer step (through the fp16 gradient scaler if on)."""
        clip = self._clip
        if self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            if clip is not None:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.opt.step()

    def _feed_back(self, batch: sampling.Batch, logits: torch.Tensor, y: torch.Tensor, losses: torch.Tensor,
                   loss: torch.Tensor) -> bool:
        """Give a score-driven source the step's per-example losses (and scores); True if the step diverged.

        Feedback from a diverged step would poison the sampler's state (and make it raise); the caller
        stops with the usual non-finite report instead. These samplers synchronise every step anyway, so
        the check costs nothing extra. Blind sources get nothing and never report divergence here.
        """
        if not self._feedback:
            return False
        ok = torch.isfinite(loss.detach()).float()
        if self.dist.enabled:
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if not bool(ok.item()):
            return True
        scores = None
        if self.wants_scores:
            from ..sampling.importance import upper_bound_scores

            scores = upper_bound_scores(logits.detach().float(), y, loss=self.score_loss)
        self.source.observe(batch.indices, losses=losses.detach(), scores=scores)
        return False

    def _count(self, loss: torch.Tensor) -> None:
        """Add the step's loss to the running mean, advance the step and the training clock."""
        self.acc_loss += loss.detach()
        self.acc_n += 1
        self.step += 1
        now = time.perf_counter()
        self.elapsed += now - self._clock
        self._clock = now

    def _monitor(self, x: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, diverged: bool) -> None:
        """Run the monitors due after this step (off the training clock); their scalars join the next row."""
        if diverged or not self.monitors.due(self.step) or not bool(torch.isfinite(loss.detach())):
            return
        self._sync_clock()
        self._monitor_row.update(self.monitors.after_step(self.model, x, y, self.opt, self.step))
        self.model.train()
        self._clock = time.perf_counter()

    # -- bookkeeping after a step ---------------------------------------------------------------

    def _after_step(self, diverged: bool, update_bar) -> None:
        """Log, evaluate, checkpoint and stop as the config and signals ask; none of it is on the training clock.

        Per-step work that must see every step (not only log steps) belongs here, before the early return.
        """
        step = self.step
        at_log = step % self._log_every == 0
        at_eval = self._eval_every > 0 and step % self._eval_every == 0
        if self._eval_seconds and self.elapsed >= self._next_eval_time:  # the time grid (eval.seconds)
            at_eval, self._next_eval_time = True, self._eval_clock()
        at_ckpt = self._ckpt_every > 0 and step % self._ckpt_every == 0
        if at_log and self.cfg.duration.unit == "seconds" and self.dist.enabled \
                and self.dist.from_main(self._done(), self.device):
            # a time budget ends on rank 0's clock: the ranks stop at the same step
            self.elapsed = max(self.elapsed, self.cfg.duration.value)
        stopping = self._stopping(at_log)
        end = self._done()
        # background monitor checks: collected when due again, and all of them before a checkpoint or a stop
        flush = at_ckpt or end or stopping or diverged
        late = self.monitors is not None and self.monitors.has_readings(wait=flush)
        at_monitor = bool(self._monitor_row) or late
        if not (at_log or at_eval or at_ckpt or end or diverged or at_monitor):
            if stopping:
                self._interrupt()
            return
        self._sync_clock()
        if late:  # rows of their own, at the steps they measured
            for at, scalars in self.monitors.pop_readings(wait=flush):
                self.metrics.write({"step": at, "epoch": at / self.steps_per_epoch, **scalars})
        train_loss = self._take_mean_loss()
        if diverged or not math.isfinite(train_loss):
            self._stop_nonfinite(train_loss if not math.isfinite(train_loss) else float("nan"))
        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "time": self.elapsed,
               "fwd": self.fwd_used(), "lr": self.opt.param_groups[0]["lr"], "train_loss": train_loss}
        row.update(self._component_metrics())
        row.update(self._monitor_row)
        self._monitor_row = {}
        if (at_eval or end) and self.dist.main:
            self.last_eval = self._evaluate()
            row.update(self.last_eval)
        self.metrics.write(row)
        if update_bar is not None:
            self._show(update_bar, train_loss)
        if at_ckpt or end:
            self._save()
        if stopping and not end:
            self._interrupt()
        self._clock = time.perf_counter()

    def _stopping(self, at_log: bool) -> bool:
        """Whether a stop signal asks to stop after this step (under DDP the ranks agree, at log steps)."""
        if not self.dist.enabled:
            return guard.stop_requested() is not None
        return at_log and self.dist.any(guard.stop_requested() is not None, self.device)

    def _eval_clock(self) -> float:
        """The training time of the next evaluation on the ``eval.seconds`` grid (inf without one)."""
        s = self._eval_seconds
        return (math.floor(self.elapsed / s) + 1) * s if s else math.inf

    def _sync_clock(self) -> None:
        """On a GPU, wait for the queued work: it belongs to the steps just taken, on the training clock."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.elapsed += now - self._clock
            self._clock = now

    def _take_mean_loss(self) -> float:
        """The mean training loss since the previous row (over all ranks); resets the running sum."""
        mean_loss = self.acc_loss / max(self.acc_n, 1)
        if self.dist.enabled:
            torch.distributed.all_reduce(mean_loss)
            mean_loss = mean_loss / self.dist.world_size
        self.acc_loss.zero_()
        self.acc_n = 0
        return float(mean_loss)

    def _show(self, update_bar, train_loss: float) -> None:
        info = f"loss {train_loss:.4f}" + (f"  test acc {self.last_eval['test_acc']:.4f}" if self.last_eval else "")
        total = self.total_steps if self.total_steps is not None else self.cfg.duration.value
        update_bar(completed=min(self._bar_position(), total), info=info)

    def _progress(self):
        steps = self.total_steps is not None
        show = self.cfg.log.progress and self.dist.main and not self.quiet
        return progress_bar(show, self.total_steps if steps else self.cfg.duration.value,
                            "steps" if steps else self.cfg.duration.unit, self._bar_position())

    def _bar_position(self) -> float:
        if self.total_steps is not None:
            return self.step
        if self.cfg.duration.unit == "fwd":
            return self.fwd_used()
        return self.source.epochs_done if self.own_epochs else self.elapsed

    def _close_outputs(self) -> None:
        """Close the metrics files and trackers, and stop the monitors' worker (if one was started)."""
        self.metrics.close()
        if self.monitors is not None:
            self.monitors.close()

    def _finish(self) -> dict:
        """Close the metrics and write the ``completed`` summary."""
        if self.last_eval is None and self.dist.main and self.step > 0:
            # resumed at the end (killed after the last checkpoint, before the summary): evaluate the
            # final model so the summary carries the same results as an uninterrupted run
            self.last_eval = self._evaluate()
        self._close_outputs()
        summary = self._summary("completed")
        if self.last_eval:
            self._say(f"done: {self.step} steps, {self.elapsed:.1f} s, {self.fwd_used():.4g} forward-equivalents; "
                      "test accuracy "
                      f"{self.last_eval['test_acc']:.4f}, test loss {self.last_eval['test_loss']:.4f}  ->  "
                      f"{self.run_dir}")
        return summary

    # -- set-up ---------------------------------------------------------------------------------

    def _claim_run_dir(self, resume: bool) -> None:
        """Refuse a folder that already holds a run (unless resuming); write ``config.yaml``."""
        run_dir = self.run_dir
        jsonl = run_dir / "metrics.jsonl"
        if not resume and ((run_dir / CHECKPOINT).exists() or (run_dir / "summary.json").exists()
                           or (jsonl.exists() and (not jsonl.is_file() or jsonl.stat().st_size > 0))):
            raise ConfigError(f"{run_dir} already holds a run; use 'sgdlab resume {run_dir}' or another --out")
        if self.dist.main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    def _build_data(self):
        """The dataset (on the device with ``data.on_device``) and the augmentation's fill value; returns the
        dataset as built (on the CPU)."""
        cfg = self.cfg
        ds = build_dataset(cfg)
        self.ds = ds.to(self.device) if cfg.data.on_device else ds
        self.num_train = len(ds.train_y)
        self._data_device = self.ds.train_x.device
        self._move_batch = self._data_device != self.device
        fill = None
        if cfg.data.augment:
            if ds.train_x.dim() != 4:
                raise ConfigError(f"data.augment: the CIFAR augmentation needs images (N, C, H, W); "
                                  f"{cfg.data.name} has shape {tuple(ds.train_x.shape)}")
            fill = (-ds.mean / ds.std) if ds.mean is not None else 0.0  # black, after normalisation
            fill = fill.to(self._data_device) if isinstance(fill, torch.Tensor) else fill
        self.fill = fill
        return ds

    def _build_model(self, ds, threads: int | None) -> None:
        """Model, thread count, fine-tuning weights, per-rank torch streams, SyncBatchNorm, optimizer,
        DDP/compile, AMP."""
        cfg, dist = self.cfg, self.dist
        model = build_model(cfg, ds.num_classes, ds.input_shape)
        wanted = threads if threads is not None else cfg.threads
        self.threads = auto_threads(sum(p.numel() for p in model.parameters())) if wanted == "auto" else int(wanted)
        torch.set_num_threads(self.threads)
        if cfg.checkpoint.init_from and self.ckpt is None:
            loaded, skipped = load_weights(model, cfg.checkpoint.init_from)
            self._say(f"initialised {loaded} tensors from {cfg.checkpoint.init_from} ({skipped} kept fresh)")
        if dist.enabled and dist.rank > 0:
            # Every rank built the same model from the same seed. sgdlab's own per-example draws are keyed
            # by example (sgdlab.keyed), but what draws from torch's global generator (dropout) needs a
            # stream per rank, or its masks would repeat across the ranks' slices. Rank 0 keeps the
            # single-process stream.
            torch.manual_seed(rank_seed(cfg.seed, dist.rank))
        if cfg.sync_bn and dist.enabled:  # BatchNorm statistics of the global batch, at any world size
            model = convert_sync_batchnorm(model, self.device)
        model.to(self.device)
        if cfg.fast.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt = build_optimizer(cfg, model)
        self._base_lrs = [cfg.optim.lr] * len(self.opt.param_groups)  # never a restored optimizer's scheduled lr
        self.train_model = model
        if dist.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.fast.compile:
            self.train_model = torch.compile(self.train_model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.fast.autocast == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.fast.autocast or "")

    def _build_source(self) -> None:
        """The batch source (sampler) and the loss transforms."""
        cfg, dist = self.cfg, self.dist
        # the loss that score-driven samplers differentiate: the trained one, label smoothing included
        self.score_loss = (SmoothedCrossEntropy(cfg.loss.label_smoothing) if cfg.loss.label_smoothing > 0
                           else cfg.loss.name)
        self.cost_ratio = self._cost_ratio()
        d = cfg.duration
        self.global_batch = self._global_batch()
        try:
            batch_size = sampling.rank_batch_size(self.global_batch, dist.world_size)
        except ValueError:
            raise ConfigError(f"{self.run_dir} trains a global batch of {self.global_batch} examples, which "
                              f"{dist.world_size} processes cannot share equally; resume it on a number of "
                              f"processes that divides {self.global_batch}") from None
        ctx = sampling.SourceContext(
            num_samples=self.num_train, batch_size=batch_size, seed=cfg.seed,
            rank=dist.rank if dist.enabled else None, world_size=dist.world_size if dist.enabled else None,
            model=self.model, train_x=self.ds.train_x, train_y=self.ds.train_y, device=self.device,
            loss=self.score_loss, extra={"cost_ratio": self.cost_ratio, "cache": self._cached,
                                         "epochs": d.value if d.unit == "epochs" else None})
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
        self._set_progress = getattr(self.source, "set_progress", None)
        # selective backprop's Composer mode scores the batch before the training forward
        self.selectors = [t for t in self.transforms if getattr(t, "method", None) == "select"]
        self.budget = ForwardEquivalents(self.cost_ratio, world_size=dist.world_size,
                                         setup=float(getattr(self.source, "setup_forwards", 0.0)))

    def _cost_ratio(self) -> float:
        """``cost_ratio`` r of the forward-equivalent budget: the config's number, the resumed run's, or measured
        once on a training batch (rank 0's measurement on every rank)."""
        c = self.cfg
        if c.cost_ratio != "auto":
            return float(c.cost_ratio)
        saved = (self.ckpt or {}).get("budget")
        if isinstance(saved, dict) and "cost_ratio" in saved:
            return float(saved["cost_ratio"])
        b = min(c.sampler.batch_size, self.num_train)
        x, y = self.ds.train_x[:b].to(self.device), self.ds.train_y[:b].to(self.device)
        if c.fast.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        smoothing = c.loss.label_smoothing
        with self._autocast():
            r = measure_cost_ratio(self.model, x, y, lambda z, t: per_example_loss(c.loss.name, z, t, smoothing))
        if self.dist.enabled:
            t = torch.tensor([r], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(t, 0)
            r = float(t.item())
        return r

    def _cached(self, key: str, compute) -> dict:
        """``compute()`` once per run: its tensors are kept in ``cache/<key>.pt`` of the run directory and
        loaded from there afterwards (a resumed run reuses them; e.g. RHO-LOSS's irreducible losses)."""
        path = self.run_dir / "cache" / f"{key}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        value = compute()
        if self.dist.main:
            atomic_torch_save(value, path)
        return value

    def fwd_used(self) -> float:
        """Forward-equivalents spent so far (:mod:`sgdlab.train.budget`)."""
        return self.budget.used((self.source,), self.transforms)

    def _global_batch(self) -> int:
        """The examples per step over all processes: the checkpoint's on a resume (written at any world
        size), else ``sampler.batch_size`` per process times the number of processes."""
        st = self.ckpt
        if st is None:
            return self.cfg.sampler.batch_size * self.dist.world_size
        saved = st.get("global_batch", int(st.get("world_size", 1)) * self.cfg.sampler.batch_size)
        if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1:
            raise guard.CheckpointError(f"{self.run_dir / CHECKPOINT}: global_batch must be a positive integer, "
                                        f"got {saved!r}")
        return saved

    def _build_schedule(self) -> None:
        """Steps per epoch, the run's length in steps (None for a time budget), the lr schedule."""
        self.steps_per_epoch = max(len(self.source), 1)
        d = self.cfg.duration
        # a source with epochs of its own length (InfoBatch) counts a duration in epochs itself
        self.own_epochs = d.unit == "epochs" and hasattr(self.source, "epochs_done")
        self.total_steps = None if d.unit in ("seconds", "fwd") or self.own_epochs else (
            int(d.value) if d.unit == "steps" else max(1, round(d.value * self.steps_per_epoch)))
        s = self.cfg.schedule
        try:
            self.schedule = Schedule(
                name=s.name, total=self._total_in(s.unit), milestones=tuple(s.milestones), factor=s.factor,
                power=s.power, period=s.period, low=s.low, warmup=s.warmup, warmup_from=s.warmup_from)
        except ValueError as e:
            raise ConfigError(f"schedule: {e}") from None

    def _build_monitors(self) -> None:
        """The ``monitors:`` of the config (:mod:`sgdlab.monitors`), measuring the trained data loss."""
        c = self.cfg
        self._monitor_row: dict = {}
        self.monitors = build_monitors(c, self.ds, self.device, DataLoss(per_example_loss, c.loss.name,
                                                                          c.loss.label_smoothing),
                                       batch_size=c.sampler.batch_size)

    # -- position in the run (a new duration unit goes in these three) --------------------------

    def _progress_fraction(self) -> float:
        """The fraction of the run done: of the steps, the forward-equivalents, the source's epochs or the time."""
        d = self.cfg.duration
        if self.total_steps is not None:
            return self.step / self.total_steps
        if d.unit == "fwd":
            return min(self.fwd_used() / d.value, 1.0)
        if self.own_epochs:
            return min(self.source.epochs_done / d.value, 1.0)
        return self.elapsed / d.value

    def _total_in(self, unit: str) -> float | None:
        d = self.cfg.duration
        if unit == "fraction":
            return 1.0
        if self.own_epochs:
            return d.value if unit == "epochs" else None
        if d.unit in ("seconds", "fwd"):
            return d.value if unit == d.unit else None
        if unit == "steps":
            return float(self.total_steps)
        if unit == "epochs":
            return self.total_steps / self.steps_per_epoch
        return None  # seconds unit on a step-based run: no known total (constant-like schedules only)

    def _position(self, unit: str) -> float:
        if unit == "steps":
            return float(self.step)
        if unit == "epochs":
            return self.source.epochs_done if self.own_epochs else self.step / self.steps_per_epoch
        if unit == "seconds":
            return self.elapsed
        return self._progress_fraction()

    def _done(self) -> bool:
        if self.total_steps is not None:
            return self.step >= self.total_steps
        d = self.cfg.duration
        if d.unit == "fwd":
            return self.fwd_used() >= d.value
        if self.own_epochs:
            return self.source.epochs_done >= d.value - 1e-9
        return self.elapsed >= d.value

    # -- state, evaluation, summaries -----------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self.dist.main and not self.quiet:
            print(msg, flush=True)

    def _state(self, rng: dict | None = None, rng_ranks: list | None = None) -> dict:
        state = {
            "step": self.step, "elapsed": self.elapsed, "best": dict(self.best),
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(), "source": self.source.state_dict(),
            "transforms": [t.state_dict() for t in self.transforms],
            "rng": rng if rng is not None else rng_state(),
            "world_size": self.dist.world_size, "global_batch": self.global_batch,
            "threads": torch.get_num_threads(),
            "acc_loss": self.acc_loss.detach().cpu(), "acc_n": self.acc_n, "budget": self.budget.state_dict(),
            "config": config_to_dict(self.cfg), "format": "sgdlab-run-checkpoint",
        }
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        if self.monitors is not None:
            state["monitors"] = self.monitors.state_dict()
        return state

    def _restore(self, st: dict) -> None:
        saved_world = st.get("world_size", 1)
        same_world = saved_world == self.dist.world_size
        path = self.run_dir / CHECKPOINT
        load_model_state(self.model, st["model"], path)
        try:
            self.opt.load_state_dict(st["optimizer"])
            self.scaler.load_state_dict(st["scaler"])
            self.source.load_state_dict(st["source"])
            if len(st["transforms"]) != len(self.transforms):
                raise ValueError("a different number of loss transforms")
            for t, s in zip(self.transforms, st["transforms"]):
                t.load_state_dict(s)
            ranks = st.get("rng_ranks")
            set_rng_state(ranks[self.dist.rank] if ranks and same_world else st["rng"], cuda=same_world)
            self.step, self.elapsed, self.best = int(st["step"]), float(st["elapsed"]), dict(st["best"])
            if not same_world and self.dist.rank > 0:  # torch's generator per rank cannot be carried over
                torch.manual_seed(rank_seed(keyed.mix(self.cfg.seed, self.step), self.dist.rank))
            if self.step < 0 or self.step != st["step"] or not self.elapsed >= 0:
                raise ValueError(f"step {st['step']!r} and elapsed {st['elapsed']!r} must be non-negative")
            self.acc_loss = st.get("acc_loss", torch.zeros(())).to(self.device)
            self.acc_n = int(st.get("acc_n", 0))
            if "budget" in st:
                self.budget.load_state_dict(st["budget"])
            if self.monitors is not None:
                self.monitors.load_state_dict(st.get("monitors"))
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise guard.CheckpointError(f"{path}: does not fit this run's optimizer, sampler or loss "
                                        f"transforms ({type(e).__name__}: {first_line(e)})") from None
        self._say(f"resumed at step {self.step}")
        if not same_world:
            self._say(f"note: resuming a run of {saved_world} process(es) on {self.dist.world_size}, global batch "
                      f"{self.global_batch} ({self.global_batch // self.dist.world_size} per process): the batches, "
                      "augmentation, Shake-Shake and Random Gradient draws continue exactly; not carried over: "
                      "dropout and other draws from torch's generator (fresh per-process streams), BatchNorm "
                      "batch statistics (per process unless sync_bn) and the float reduction order")
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

    def _stop_nonfinite(self, train_loss: float) -> None:
        """Record the non-finite step, write the summary and raise NonFiniteLossError."""
        kept = (f"The last good checkpoint is kept in {self.run_dir / CHECKPOINT}"
                if (self.run_dir / CHECKPOINT).is_file() else "No checkpoint had been written yet")
        msg = f"non-finite training loss ({train_loss}) at step {self.step}; stopped. {kept}"
        self.metrics.write({"step": self.step, "epoch": self.step / self.steps_per_epoch, "time": self.elapsed,
                            "train_loss": train_loss})
        self.metrics.write_csv()
        self._close_outputs()
        self._summary("nonfinite", msg)
        raise NonFiniteLossError(msg)

    _NO_AUTOCAST = contextlib.nullcontext()

    def _autocast(self):
        if self.amp_dtype is None:
            return self._NO_AUTOCAST
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _save(self) -> None:
        rng = rng_state()
        rng_ranks = None
        if self.dist.enabled:  # every rank's torch stream (dropout), so a resume at this world size continues each
            rng_ranks = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rng_ranks, rng)
        if self.dist.main:
            atomic_torch_save(self._state(rng, rng_ranks), self.run_dir / CHECKPOINT)
            self.metrics.write_csv()

    def _interrupt(self, saved: bool = True) -> None:
        """Save the state after the step just taken, write an ``interrupted`` summary, raise RunInterrupted."""
        signum = guard.stop_requested() or signal.SIGTERM
        name = guard.signal_name(signum)
        if self.step > 0 and saved:
            self._save()
        self.metrics.write_csv()
        self._close_outputs()
        if self.step == 0 or (not saved and not (self.run_dir / CHECKPOINT).exists()):
            raise guard.RunInterrupted(f"{name} during the set-up of {self.run_dir}, before the first step; "
                                       "nothing to resume, start it again", signum)
        msg = (f"{name} at step {self.step}: checkpoint and summary written; continue with "
               f"'sgdlab resume {self.run_dir}'")
        summary = self._summary("interrupted", msg)
        self._say(msg)
        raise guard.RunInterrupted(msg, signum, summary)

    def _summary(self, status: str, message: str | None = None) -> dict:
        s = {
            "status": status, "steps": self.step, "epochs": self.step / self.steps_per_epoch,
            "wall_time": self.elapsed, "final": self.last_eval or {},
            "best": {"test_acc": self.best["test_acc"], "test_loss": self.best["test_loss"],
                     "step": self.best["step"]},
            "world_size": self.dist.world_size, "threads": self.threads,
            "forward_equivalents": self.fwd_used(), "cost_ratio": self.cost_ratio,
            "setup_forwards": self.budget.setup,
        }
        if message:
            s["message"] = message
        s = guard.finite_json(s)
        if self.dist.main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(s, indent=2, allow_nan=False))
        return s
