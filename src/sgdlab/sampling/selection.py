"""Data selection by loss: InfoBatch (Qin et al., ICLR 2024) and RHO-LOSS (Mindermann et al., ICML 2022).

- :class:`InfoBatch` ("InfoBatch: Lossless training speed up by unbiased dynamic data pruning", section 3):
  at the start of every epoch, of the examples whose last observed loss is below the mean of the observed
  losses, a random fraction ``prune`` is left out of the epoch and the kept ones' losses are multiplied by
  ``1 / (1 - prune)`` (their eq. 3-4), so the epoch's expected weighted gradient equals the full-data
  gradient; in the last ``1 - delta`` of the epochs ("annealing") nothing is pruned.
- :class:`RhoLoss` ("Prioritized training on points that are learnable, worth learning, and not yet
  learnt", Algorithm 1): from a uniform presample of ``n_B`` examples take the ``b`` with the largest
  reducible holdout loss ``L_i(theta) - IL_i``, where the irreducible loss ``IL_i`` comes from a model
  trained on a holdout split (:func:`train_irreducible`). Biased by design; no weights.

Both keep only global state (every rank holds the same losses, plans and generators and keeps its
:func:`~sgdlab.sampling.base.rank_slice` of each global batch), and ``state_dict`` resumes exactly,
mid-epoch included. Every random draw of an epoch or step comes from a generator seeded from
``(seed, epoch)`` or ``(seed, step)``, so what an example gets does not depend on which rank holds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .base import (
    Batch,
    SourceContext,
    check_group,
    check_sizes,
    group_initialized,
    rank_slice,
    register,
    resolve_rank,
)
from .history import _check_seed, _gather_feedback
from .importance import _all_gather_cat, _fetcher, model_scorer

__all__ = ["InfoBatch", "RhoLoss", "infobatch_weights", "train_irreducible"]

_MASK63 = (1 << 63) - 1
_INFOBATCH_STREAM = 0x1B0
_RHO_STREAM = 0x2B0


def _keyed_generator(seed: int, stream: int, counter: int) -> torch.Generator:
    """A generator that is a pure function of ``(seed, stream, counter)`` (NumPy's SeedSequence mixing)."""
    key = np.random.SeedSequence([seed & _MASK63, stream, counter]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key) & _MASK63)


def _fraction(name: str, value: Any, lo_open: bool, hi_open: bool) -> float:
    v = float(value)
    ok = (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}, got {value!r}")
    return v


def infobatch_weights(losses: torch.Tensor, prune: float, dropped: torch.Tensor) -> torch.Tensor:
    """Per-example epoch weights of InfoBatch given which examples the draw ``dropped`` (Qin et al., eq. 3-4).

    ``losses`` holds the last observed loss of each example (NaN: never observed); ``m`` is the mean of the
    observed ones. An example with ``l_i < m`` ("well learned") is left out (weight 0) when ``dropped[i]``,
    else weighted ``1 / (1 - prune)``; every other example has weight 1 (``dropped`` is ignored for it).
    Over ``dropped[i] ~ Bernoulli(prune)`` the expected weight of every example is 1, which is why the
    epoch's expected weighted gradient is the full-data gradient. Float64.
    """
    losses = torch.as_tensor(losses, dtype=torch.float64)
    seen = ~torch.isnan(losses)
    w = torch.ones_like(losses)
    if not bool(seen.any()) or prune == 0:
        return w
    mean = losses[seen].mean()
    well = seen & (losses < mean)
    w[well] = 1.0 / (1.0 - prune)
    w[well & torch.as_tensor(dropped, dtype=torch.bool)] = 0.0
    return w


class InfoBatch:
    """InfoBatch's unbiased dynamic data pruning as a batch source (Qin et al., ICLR 2024, section 3).

    Epoch ``e`` is planned at its first batch from the losses observed so far: with ``l_i`` the last
    observed (unweighted) loss of example ``i`` and ``m`` the mean over examples that have one, each ``i``
    with ``l_i < m`` is dropped with probability ``prune`` and, if kept, weighted ``1 / (1 - prune)``
    (:func:`infobatch_weights`); examples never observed and those with ``l_i >= m`` are always kept with
    weight 1. In epochs ``e >= delta * epochs`` (the last ``1 - delta`` of the run) nothing is pruned. The
    kept examples are shuffled and cut into global batches of ``world_size * batch_size``; an incomplete
    last batch is filled from the start of the epoch's order (so every kept example is trained at least
    once and every batch is full). ``next_batch`` continues into the next epoch after the last batch of one.

    The draws of epoch ``e`` (which examples are dropped, the order) come from a generator keyed by
    ``(seed, e)``. Losses arrive through :meth:`observe` (``wants_losses = True``; all-gathered under DDP,
    so every rank keeps the same history and plans). Use the weights as ``mean(w_i * loss_i)``.

    Args:
        num_samples: ``N``.
        batch_size: ``b`` per rank.
        prune: ``r`` in [0, 1), the fraction of well-learned examples left out each epoch (0.5).
        delta: in (0, 1]; pruning stops at epoch ``delta * epochs`` (0.875).
        epochs: the run's length in (InfoBatch) epochs, for the full-data tail; None: the tail starts with the
            first epoch that begins once :attr:`progress` (set by :meth:`set_progress`, e.g. the fraction of a
            compute budget spent) reaches ``delta``.
        seed, rank, world_size: generator seed (same on every rank) and DDP placement.

    ``len()`` is the number of steps of a full (unpruned) epoch; :attr:`epoch_steps` the steps of the current
    one. Iterating yields the rest of the current epoch as lists of indices (``DataLoader(batch_sampler=...)``);
    the weights of the batch just yielded are :attr:`last_weights`.
    """

    wants_losses = True

    def __init__(self, num_samples: int, batch_size: int, *, prune: float = 0.5, delta: float = 0.875,
                 epochs: float | None = None, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        check_sizes(num_samples, batch_size)
        self.prune = _fraction("prune", prune, lo_open=False, hi_open=True)
        self.delta = _fraction("delta", delta, lo_open=True, hi_open=False)
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                                   or not (math.isfinite(epochs) and epochs > 0)):
            raise ValueError(f"epochs must be a positive number (the run's length in epochs) or None, got {epochs!r}")
        self.epochs = None if epochs is None else float(epochs)
        self.progress = 0.0           # fraction of the run done, set by the trainer when epochs is None
        self.seed = _check_seed(seed)
        self._alone = (rank is None or world_size is None) and not group_initialized()
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.global_batch = batch_size * self.world_size
        if self.global_batch > num_samples:
            raise ValueError(f"batch_size x world_size = {self.global_batch} must be at most num_samples={num_samples}")
        self.losses = torch.full((num_samples,), float("nan"), dtype=torch.float64)
        self.epoch = 0
        self.step = 0                 # batches drawn in the current epoch
        self.steps = 0                # batches drawn in total
        self._order: torch.Tensor | None = None    # the current epoch's kept examples, shuffled
        self._weights: torch.Tensor | None = None  # their weights (float32)
        self.last_weights: torch.Tensor | None = None
        self._last: dict[str, float] = {}

    # -- the plan -------------------------------------------------------------------------------

    def pruning(self, epoch: int | None = None) -> bool:
        """Whether epoch ``epoch`` (default: the current one) prunes: ``epoch < delta * epochs``, or, without
        ``epochs``, whether the run's :attr:`progress` at the epoch's start is below ``delta``."""
        if self.prune == 0:
            return False
        if self.epochs is None:
            return self.progress < self.delta - 1e-12
        e = self.epoch if epoch is None else epoch
        return e < self.delta * self.epochs - 1e-9

    def set_progress(self, progress: float) -> None:
        """The fraction of the run done (for a budget not in epochs: compute or time); read when an epoch is
        planned, so the full-data tail starts with the first epoch that begins at ``progress >= delta``."""
        self.progress = float(progress)

    @property
    def epochs_done(self) -> float:
        """InfoBatch epochs completed, with the fraction of the current one (its own, pruned, length)."""
        if self._order is None:
            return float(self.epoch)
        return self.epoch + self.step / self.epoch_steps

    def _plan(self) -> None:
        gen = _keyed_generator(self.seed, _INFOBATCH_STREAM, self.epoch)
        u = torch.rand(self.num_samples, generator=gen, dtype=torch.float64)
        w = infobatch_weights(self.losses, self.prune if self.pruning() else 0.0, u < self.prune)
        kept = torch.nonzero(w > 0).reshape(-1)
        perm = torch.randperm(kept.numel(), generator=gen)
        self._order = kept[perm]
        self._weights = w[self._order].float()
        self._last = {"ib_kept_fraction": kept.numel() / self.num_samples, "ib_pruning": float(self.pruning())}

    @property
    def epoch_steps(self) -> int:
        """Steps of the current epoch (``ceil(kept / global batch)``)."""
        if self._order is None:
            self._plan()
        return -(-self._order.numel() // self.global_batch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.global_batch)

    def _next_global(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is not None and self.step >= self.epoch_steps:
            self.epoch += 1
            self.step = 0
            self._order = None
        if self._order is None:
            self._plan()
        n, g = self._order.numel(), self.global_batch
        pos = torch.arange(self.step * g, (self.step + 1) * g) % n
        self.step += 1
        self.steps += 1
        return self._order[pos], self._weights[pos]

    def next_batch(self) -> Batch:
        """This rank's share of the next global batch and its weights (``1 / (1 - prune)`` or 1)."""
        if self._alone:
            self._alone = check_group(type(self).__name__)
        idx, w = self._next_global()
        self.last_weights = rank_slice(w, self.rank, self.world_size)
        return Batch(rank_slice(idx, self.rank, self.world_size), self.last_weights)

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch (a whole epoch from its start) as lists of indices."""
        if self._order is not None and self.step >= self.epoch_steps:
            self.epoch += 1
            self.step = 0
            self._order = None
        for _ in range(self.epoch_steps - self.step):
            yield self.next_batch().indices.tolist()

    def set_epoch(self, epoch: int) -> None:
        """Accepted for ``DistributedSampler``-style loops; the sampler counts its own epochs (no effect)."""

    def observe(self, indices: torch.Tensor, losses: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> None:
        """Record the (unweighted) per-example losses of the trained batch (gathered across ranks under DDP)."""
        if losses is None:
            return
        idx, val = _gather_feedback(indices, losses, self.world_size)
        if not bool(torch.isfinite(val).all()):
            raise FloatingPointError("InfoBatch.observe: non-finite losses (training has diverged)")
        self.losses[idx] = val

    def metrics(self) -> dict[str, float]:
        """``ib_kept_fraction`` (kept / N of the current epoch), ``ib_pruning`` (0/1), ``ib_epoch``."""
        return {**self._last, "ib_epoch": float(self.epoch)}

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        planned = self._order is not None
        return {"kind": "infobatch", "num_samples": self.num_samples, "global_batch": self.global_batch,
                "seed": self.seed, "prune": self.prune, "delta": self.delta, "epochs": self.epochs,
                "losses": self.losses.clone(), "progress": self.progress, "epoch": self.epoch, "step": self.step,
                "steps": self.steps,
                "planned": planned, "order": self._order.clone() if planned else torch.zeros(0, dtype=torch.long),
                "weights": self._weights.clone() if planned else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "infobatch":
            raise ValueError("state is not an InfoBatch state")
        for key in ("num_samples", "global_batch", "seed", "prune", "delta", "epochs"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state[{key!r}]={state.get(key)!r} does not match this sampler's "
                                 f"{key}={getattr(self, key)!r}")
        losses = torch.as_tensor(state["losses"], dtype=torch.float64)
        if losses.shape != (self.num_samples,):
            raise ValueError(f"state['losses'] must have shape ({self.num_samples},)")
        self.losses = losses.clone()
        self.progress = float(state.get("progress", 0.0))
        self.epoch, self.step, self.steps = int(state["epoch"]), int(state["step"]), int(state["steps"])
        if min(self.epoch, self.step, self.steps) < 0:
            raise ValueError("state epoch, step and steps must be non-negative")
        if state["planned"]:
            self._order = state["order"].long().clone()
            self._weights = state["weights"].float().clone()
        else:
            self._order = self._weights = None

    def __repr__(self) -> str:
        return (f"InfoBatch(num_samples={self.num_samples}, batch_size={self.batch_size}, prune={self.prune}, "
                f"delta={self.delta}, epochs={self.epochs}, seed={self.seed}, rank={self.rank}, "
                f"world_size={self.world_size})")


class RhoLoss:
    """RHO-LOSS selection (Mindermann et al., ICML 2022, Algorithm 1) as a batch source.

    Each step draws a uniform presample of ``presample = n_B`` distinct examples from ``pool`` (default all
    ``N``; the holdout split is usually left out), computes the training model's per-example losses with
    ``loss_fn(indices)`` (a no-grad forward; under DDP each rank scores its share and the losses are
    all-gathered), and takes the global batch of the ``world_size * batch_size`` examples with the largest
    reducible loss ``loss_i - irreducible[i]`` (ties: the earlier presample slot). Biased by design: no
    weights. The presample of step ``t`` comes from a generator keyed by ``(seed, t)``. ``irreducible`` is a
    tensor of ``N`` losses or a callable returning one, called once at the first draw.

    :attr:`selection_forwards` counts the examples forwarded for selection (``presample`` per step, global),
    and :attr:`setup_forwards` the cost of the irreducible-loss model (0 when ``irreducible`` was given),
    for the forward-equivalent budget.
    """

    wants_losses = False

    def __init__(self, num_samples: int, batch_size: int, *, presample: int,
                 irreducible: torch.Tensor | Callable[[], torch.Tensor],
                 loss_fn: Callable[[torch.Tensor], Any], pool: torch.Tensor | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        check_sizes(num_samples, batch_size)
        self.seed = _check_seed(seed)
        self._alone = (rank is None or world_size is None) and not group_initialized()
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.global_batch = batch_size * self.world_size
        self._irreducible = None
        self._irreducible_fn = irreducible if callable(irreducible) else None
        if self._irreducible_fn is None:
            self._set_irreducible(irreducible)
        self.pool = (torch.arange(num_samples) if pool is None
                     else torch.as_tensor(pool).long().reshape(-1).cpu())
        if self.pool.numel() == 0 or int(self.pool.min()) < 0 or int(self.pool.max()) >= num_samples:
            raise ValueError(f"pool must be a non-empty set of indices in [0, {num_samples})")
        if isinstance(presample, bool) or not isinstance(presample, int) or presample <= 0:
            raise ValueError(f"presample must be a positive integer, got {presample!r}")
        if presample % self.world_size:
            raise ValueError(f"presample ({presample}) must be divisible by world_size ({self.world_size})")
        if not self.global_batch <= presample <= self.pool.numel():
            raise ValueError(f"presample must be between the global batch ({self.global_batch}) and the pool size "
                             f"({self.pool.numel()}), got {presample}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable (indices -> per-example losses)")
        self.presample, self.loss_fn = presample, loss_fn
        self.setup_forwards = 0.0
        self.steps = 0
        self._last: dict[str, float] = {}

    def _set_irreducible(self, value) -> None:
        il = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(-1)
        if il.numel() != self.num_samples or not bool(torch.isfinite(il).all()):
            raise ValueError(f"irreducible must hold {self.num_samples} finite losses, got {il.numel()} values")
        self._irreducible = il

    @property
    def irreducible(self) -> torch.Tensor:
        """The irreducible losses ``IL`` of all examples (float64; computed at first use when given lazily)."""
        if self._irreducible is None:
            self._set_irreducible(self._irreducible_fn())
        return self._irreducible

    @property
    def selection_forwards(self) -> int:
        """Examples forwarded for selection so far (all ranks): ``steps * presample``."""
        return self.steps * self.presample

    def __len__(self) -> int:
        return max(1, self.pool.numel() // self.global_batch)

    def presample_at(self, step: int) -> torch.Tensor:
        """The uniform presample of step ``step`` (dataset indices, distinct)."""
        gen = _keyed_generator(self.seed, _RHO_STREAM, step)
        return self.pool[torch.randperm(self.pool.numel(), generator=gen)[:self.presample]]

    def select(self, presample: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Positions in ``presample`` of the global batch: the largest ``losses - irreducible``, ties by slot."""
        red = torch.as_tensor(losses).detach().to("cpu", torch.float64).reshape(-1) - self.irreducible[presample]
        order = torch.sort(red, descending=True, stable=True).indices
        chosen = order[:self.global_batch]
        self._last = {"rho_reducible_mean": float(red[chosen].mean()),
                      "rho_irreducible_mean": float(self.irreducible[presample[chosen]].mean())}
        return chosen

    def next_batch(self) -> Batch:
        if self._alone:
            self._alone = check_group(type(self).__name__)
        pre = self.presample_at(self.steps)
        share = self.presample // self.world_size
        mine = pre[self.rank * share:(self.rank + 1) * share] if self.world_size > 1 else pre
        loss = torch.as_tensor(self.loss_fn(mine)).detach().reshape(-1).float()
        if loss.numel() != mine.numel():
            raise ValueError(f"loss_fn returned {loss.numel()} losses for {mine.numel()} indices")
        loss = _all_gather_cat(loss, self.world_size).cpu()
        if not bool(torch.isfinite(loss).all()):
            raise FloatingPointError("RhoLoss: non-finite losses of the presample (training has diverged)")
        chosen = self.select(pre, loss)
        self.steps += 1
        return Batch(rank_slice(pre[chosen], self.rank, self.world_size), None)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            yield self.next_batch().indices.tolist()

    def observe(self, indices, losses=None, scores=None) -> None:
        """No-op: RHO-LOSS scores a fresh presample every step."""

    def metrics(self) -> dict[str, float]:
        """Mean reducible and irreducible loss of the last selected batch."""
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"kind": "rho_loss", "num_samples": self.num_samples, "global_batch": self.global_batch,
                "seed": self.seed, "presample": self.presample, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "rho_loss":
            raise ValueError("state is not a RhoLoss state")
        for key in ("num_samples", "global_batch", "seed", "presample"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state[{key!r}]={state.get(key)!r} does not match this sampler's "
                                 f"{key}={getattr(self, key)!r}")
        steps = state.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state['steps'] must be a non-negative integer, got {steps!r}")
        self.steps = steps


# ---------------------------------------------------------------------------------------------
# The irreducible-loss model
# ---------------------------------------------------------------------------------------------


def holdout_split(num_samples: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(holdout, pool)``: a random ``fraction`` of the ``num_samples`` indices and the rest (sorted)."""
    fraction = _fraction("holdout.fraction", fraction, lo_open=True, hi_open=True)
    k = max(1, min(num_samples - 1, round(fraction * num_samples)))
    perm = torch.randperm(num_samples, generator=_keyed_generator(seed, _RHO_STREAM, -1 & _MASK63))
    return perm[:k].sort().values, perm[k:].sort().values


def train_irreducible(model: torch.nn.Module, fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                      holdout: torch.Tensor, num_samples: int, *, steps: int, batch_size: int, lr: float,
                      momentum: float = 0.9, weight_decay: float = 0.0, loss: Any = "cross_entropy",
                      seed: int = 0, chunk: int = 1000) -> torch.Tensor:
    """Train ``model`` (in place, a fresh copy of the architecture) on the ``holdout`` indices, return IL.

    Mindermann et al. (2022), section 3: the irreducible loss model is trained on a holdout set and its
    loss on every training example approximates the loss not reducible by training on that example.
    Plain SGD with momentum, ``steps`` batches of ``batch_size`` drawn without replacement epoch by epoch
    from a generator keyed by ``seed``, constant ``lr``; then a no-grad forward of all ``num_samples``
    examples in eval mode. Returns float64 per-example losses on the CPU.
    """
    from .importance import per_example_loss

    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"holdout.steps must be a positive integer, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"holdout.batch_size must be a positive integer, got {batch_size!r}")
    gen = _keyed_generator(seed, _RHO_STREAM, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay))
    model.train()
    order, pos = holdout[torch.randperm(holdout.numel(), generator=gen)], 0
    for _ in range(steps):
        if pos + batch_size > order.numel():
            order, pos = holdout[torch.randperm(holdout.numel(), generator=gen)], 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        x, y = fetch(idx)
        out = per_example_loss(model(x).float(), y, loss).mean()
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
    model.eval()
    res = []
    with torch.no_grad():
        for i in range(0, num_samples, chunk):
            x, y = fetch(torch.arange(i, min(i + chunk, num_samples)))
            res.append(per_example_loss(model(x).float(), y, loss).detach().to("cpu", torch.float64))
    return torch.cat(res)


# ---------------------------------------------------------------------------------------------
# Engine factories
# ---------------------------------------------------------------------------------------------


@register("infobatch")
def _infobatch_factory(ctx: SourceContext, *, prune: float = 0.5, delta: float = 0.875,
                       epochs: float | None = None) -> InfoBatch:
    """Config ``sampler: {name: infobatch, prune: 0.5, delta: 0.875}``. ``epochs`` defaults to the run's
    duration when that is in epochs (the engine then counts InfoBatch's own, pruned, epochs); otherwise the
    full-data tail follows the run's progress (:meth:`InfoBatch.set_progress`)."""
    if epochs is None:
        epochs = ctx.extra.get("epochs")
    return InfoBatch(ctx.num_samples, ctx.batch_size, prune=prune, delta=delta, epochs=epochs, seed=ctx.seed,
                     rank=ctx.rank, world_size=ctx.world_size)


HOLDOUT_KEYS = {"fraction", "steps", "batch_size", "lr", "momentum", "weight_decay"}


def irreducible_cost(num_samples: int, holdout: dict, cost_ratio: float) -> float:
    """Forward-equivalents of training the holdout model and scoring all examples:
    ``steps * b * (1 + r) + N``."""
    return holdout["steps"] * holdout["batch_size"] * (1.0 + cost_ratio) + num_samples


@register("rho_loss")
def _rho_factory(ctx: SourceContext, *, presample: int = 320, holdout: dict | None = None,
                 chunk: int = 1000) -> RhoLoss:
    """Config ``sampler: {name: rho_loss, presample: 320, holdout: {fraction: 0.2, steps: 300, lr: 0.05}}``.

    The irreducible-loss model is a fresh copy of the run's architecture trained with
    :func:`train_irreducible`; the engine caches its losses in the run directory (``ctx.extra["cache"]``, a
    ``(key, compute) -> tensors`` callable) so a resumed run never trains it again.
    """
    import copy

    world = ctx.world_size or 1  # the holdout model trains alone on every rank: default to the global batch
    h = {"fraction": 0.2, "steps": 200, "batch_size": ctx.batch_size * world, "lr": 0.05, "momentum": 0.9,
         "weight_decay": 0.0}
    unknown = set(holdout or {}) - HOLDOUT_KEYS
    if unknown:
        raise ValueError(f"unknown holdout option(s) {sorted(unknown)}; allowed: {sorted(HOLDOUT_KEYS)}")
    h.update(holdout or {})
    held, pool = holdout_split(ctx.num_samples, h["fraction"], ctx.seed)
    fetch = _fetcher(ctx)

    def compute() -> dict:
        if ctx.model is None:
            raise ValueError("rho_loss needs the model to train its irreducible-loss model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 7919)
            il_model = copy.deepcopy(ctx.model)
            for m in il_model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            il = train_irreducible(il_model, fetch, held, ctx.num_samples, steps=int(h["steps"]),
                                   batch_size=int(h["batch_size"]), lr=h["lr"], momentum=h["momentum"],
                                   weight_decay=h["weight_decay"], loss=ctx.loss, seed=ctx.seed, chunk=chunk)
        return {"irreducible": il, "holdout": held}

    def irreducible() -> torch.Tensor:
        cache = ctx.extra.get("cache")
        return (cache("rho_loss_irreducible", compute) if cache is not None else compute())["irreducible"]

    loss_fn = model_scorer(ctx.model, fetch, loss=ctx.loss, score="loss", chunk_size=chunk)
    source = RhoLoss(ctx.num_samples, ctx.batch_size, presample=presample, irreducible=irreducible,
                     loss_fn=loss_fn, pool=pool, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size)
    source.setup_forwards = irreducible_cost(ctx.num_samples, h, float(ctx.extra.get("cost_ratio", 2.0)))
    return source
