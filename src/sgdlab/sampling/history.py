"""History-based baselines of importance sampling: online batch selection and prioritized sampling.

The importance-sampling paper (Katharopoulos & Fleuret, ICML 2018, section 4) compares against two
samplers that choose examples from the *stale* losses they saw when those examples were last trained
on, instead of scoring a fresh presample:

- :class:`OnlineBatchSelection` (Loshchilov & Hutter, "Online batch selection for faster training of
  neural networks", 2015): rank all examples by their latest loss, highest first, and sample rank
  ``r`` with probability proportional to ``exp(-log(s_e) r / N)``; no reweighting (biased).
- :class:`PrioritizedSampler` (Schaul et al., "Prioritized experience replay", 2016, proportional
  variant): priority ``p_i = |loss_i| + eps``, ``P(i) = p_i^alpha / sum_j p_j^alpha``, importance
  weights ``(N P(i))^-beta`` divided by their maximum, ``beta`` annealed to 1.

Both are :class:`~sgdlab.sampling.base.BatchSource` objects with ``wants_losses = True``: the engine
calls ``observe(indices, losses=...)`` with the per-example (unweighted) losses of the trained batch.
Under DDP the observed losses are all-gathered, so every rank keeps the same history and draws the
same global batch, keeping its :func:`~sgdlab.sampling.base.rank_slice`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .base import Batch, SourceContext, check_group, check_sizes, group_initialized, register, resolve_rank
from .importance import _all_gather_cat, _fetcher, model_scorer
from .loading import ScoredPasses

__all__ = ["OnlineBatchSelection", "PrioritizedSampler", "rank_probabilities"]


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return seed


def _gather_feedback(indices, losses, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trained indices and their losses (all ranks' under DDP) as CPU int64 / float64 vectors."""
    idx = torch.as_tensor(indices).long().reshape(-1)
    val = torch.as_tensor(losses).detach().reshape(-1).float()
    if idx.numel() != val.numel():
        raise ValueError(f"observe: {idx.numel()} indices but {val.numel()} losses")
    if world_size > 1:
        idx = _all_gather_cat(idx.to(val.device), world_size)
        val = _all_gather_cat(val, world_size)
    return idx.cpu(), val.to("cpu", torch.float64)


def rank_probabilities(num_samples: int, s_e: float) -> torch.Tensor:
    """Selection probability of rank ``r = 0..N-1`` (0 = highest loss): ``p_r ∝ exp(-log(s_e) r / (N - 1))``.

    Loshchilov & Hutter (2015), section 3: the most likely example is exactly ``s_e`` times more likely
    than the least likely. (Their text divides by ``N`` with ranks 1..N, which gives the ratio
    ``s_e^((N-1)/N)``, the same for large ``N``.) Float64, sums to 1.
    """
    if num_samples == 1:
        return torch.ones(1, dtype=torch.float64)
    r = torch.arange(num_samples, dtype=torch.float64)
    logp = -math.log(s_e) * r / (num_samples - 1)
    p = torch.exp(logp - logp.max())
    return p / p.sum()


class OnlineBatchSelection(ScoredPasses):
    """Online batch selection by loss rank (Loshchilov & Hutter, 2015), a history-based batch source.

    All ``N`` examples are ranked by their latest known loss (highest first); rank ``r`` is drawn with
    probability :func:`rank_probabilities` ``(N, s_e)``, so the ratio between the most and the least
    likely example is ``s_e``. Examples with equal losses share the average probability of the ranks
    they occupy (so, before any loss is known, sampling is uniform). Batches are drawn with
    replacement and are **not reweighted** (the method is biased on purpose).

    ``s_e`` may decay over epochs: with ``s_e_end`` and ``decay_epochs`` given,
    ``s_e(epoch) = s_e * (s_e_end / s_e) ** min(epoch / decay_epochs, 1)`` (geometric, as in the paper's
    experiments where ``s_e`` goes from 1e2 or 1e8 towards 1); epoch = steps * global batch / N.

    Losses of trained examples are refreshed through :meth:`observe` (``wants_losses = True``). If
    ``loss_fn(indices) -> losses`` and ``recompute_every`` (epochs) are given, the losses of all ``N``
    examples are recomputed with ``loss_fn`` (in chunks of ``chunk``) at the first batch and then every
    ``recompute_every`` epochs, as the paper does to fight staleness.

    Args:
        num_samples, batch_size: ``N`` and ``b`` per rank.
        s_e: selection pressure (ratio of most to least likely), ``>= 1``; 1 is uniform.
        s_e_end, decay_epochs: optional geometric decay of ``s_e``.
        loss_fn, recompute_every, chunk: optional periodic recomputation of all losses.
        seed, rank, world_size: generator seed (same on every rank) and DDP placement.
    """

    wants_losses = True

    def __init__(self, num_samples: int, batch_size: int, *, s_e: float = 100.0, s_e_end: float | None = None,
                 decay_epochs: float | None = None, loss_fn: Callable[[torch.Tensor], Any] | None = None,
                 recompute_every: float | None = None, chunk: int = 4096, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        check_sizes(num_samples, batch_size)
        s_e = float(s_e)
        if not (math.isfinite(s_e) and s_e >= 1):
            raise ValueError(f"s_e must be a finite number >= 1, got {s_e}")
        if (s_e_end is None) != (decay_epochs is None):
            raise ValueError("s_e_end and decay_epochs must be given together")
        if s_e_end is not None:
            s_e_end = float(s_e_end)
            if not (math.isfinite(s_e_end) and s_e_end >= 1):
                raise ValueError(f"s_e_end must be a finite number >= 1, got {s_e_end}")
            decay_epochs = float(decay_epochs)
            if not (math.isfinite(decay_epochs) and decay_epochs > 0):
                raise ValueError(f"decay_epochs must be a positive number, got {decay_epochs}")
        if recompute_every is not None:
            if loss_fn is None:
                raise ValueError("recompute_every needs loss_fn (indices -> losses)")
            recompute_every = float(recompute_every)
            if not (math.isfinite(recompute_every) and recompute_every > 0):
                raise ValueError(f"recompute_every must be a positive number of epochs, got {recompute_every}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("loss_fn must be callable (indices -> losses)")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        self.seed = _check_seed(seed)
        # set up for one process while no group exists: checked again at every draw (never duplicate)
        self._alone = (rank is None or world_size is None) and not group_initialized()
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.global_batch = batch_size * self.world_size
        self.s_e0, self.s_e_end, self.decay_epochs = s_e, s_e_end, decay_epochs
        self.loss_fn, self.recompute_every, self.chunk = loss_fn, recompute_every, chunk
        self.generator = torch.Generator().manual_seed(seed)
        self.losses = torch.zeros(num_samples, dtype=torch.float64)
        self.steps = 0
        self.last_recompute: float | None = None
        self._probs: torch.Tensor | None = None
        self._probs_s_e: float | None = None
        self._init_passes()

    def __len__(self) -> int:
        return max(1, self.num_samples // self.global_batch)

    @property
    def epoch(self) -> float:
        """Effective epochs so far: ``steps * global batch / N``."""
        return self.steps * self.global_batch / self.num_samples

    @property
    def s_e(self) -> float:
        """The current selection pressure (after decay)."""
        if self.s_e_end is None:
            return self.s_e0
        frac = min(self.epoch / self.decay_epochs, 1.0)
        return self.s_e0 * (self.s_e_end / self.s_e0) ** frac

    def probabilities(self) -> torch.Tensor:
        """Current selection probability of every example (float64, sums to 1)."""
        s_e = self.s_e
        if self._probs is not None and self._probs_s_e == s_e:  # the cache holds only while s_e is unchanged
            return self._probs
        n = self.num_samples
        order = torch.sort(self.losses, descending=True, stable=True)
        p_rank = rank_probabilities(n, s_e)
        # ties share the mean probability of the ranks they occupy
        _, counts = torch.unique_consecutive(order.values, return_counts=True)
        group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        mean = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, group, p_rank) / counts
        p = torch.empty(n, dtype=torch.float64)
        p[order.indices] = mean[group]
        self._probs, self._probs_s_e = p, s_e
        return p

    def _recompute(self) -> None:
        out = []
        for i in range(0, self.num_samples, self.chunk):
            idx = torch.arange(i, min(i + self.chunk, self.num_samples))
            out.append(torch.as_tensor(self.loss_fn(idx)).detach().reshape(-1).to("cpu", torch.float64))
        losses = torch.cat(out)
        if losses.numel() != self.num_samples:
            raise ValueError(f"loss_fn returned {losses.numel()} losses for {self.num_samples} examples")
        self.losses = losses
        self.last_recompute = self.epoch
        self._probs = None

    def _draw(self) -> Batch:
        """The next global batch: ``world_size * batch_size`` examples with replacement by loss rank; no weights."""
        if self._alone:
            self._alone = check_group(type(self).__name__)
        if self.recompute_every is not None and (
                self.last_recompute is None or self.epoch - self.last_recompute >= self.recompute_every - 1e-12):
            self._recompute()
        glob = torch.multinomial(self.probabilities(), self.global_batch, replacement=True, generator=self.generator)
        self.steps += 1
        return Batch(glob, None)

    def observe(self, indices: torch.Tensor, losses: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> None:
        """Refresh the latest losses of the trained examples (gathered across ranks under DDP)."""
        if losses is None:
            return
        idx, val = _gather_feedback(indices, losses, self.world_size)
        self.losses[idx] = val
        self._probs = None

    def metrics(self) -> dict[str, float]:
        """``obs_s_e``: the current selection pressure."""
        return {"obs_s_e": self.s_e}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "losses": self.losses.clone(), "steps": self.steps,
                "last_recompute": -1.0 if self.last_recompute is None else self.last_recompute,
                "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"state was saved with num_samples={state['num_samples']}, this sampler has "
                             f"{self.num_samples}")
        self.generator.set_state(state["generator"])
        self.losses = state["losses"].to(torch.float64).clone()
        self.steps = int(state["steps"])
        lr = float(state["last_recompute"])
        self.last_recompute = None if lr < 0 else lr
        self.seed = int(state["seed"])
        self._probs = None


class PrioritizedSampler(ScoredPasses):
    """Proportional prioritized sampling (Schaul et al., 2016, section 3.3 and 3.4), a history-based source.

    Priority ``p_i = |loss_i| + eps`` from the latest observed loss (examples never trained on keep the
    largest priority seen so far, 1 initially, as new transitions do in the paper);
    ``P(i) = p_i^alpha / sum_j p_j^alpha``; the batch is drawn with replacement from ``P`` and weighted
    by ``w_i = (N P(i))^-beta``, divided by the maximum weight (of the batch with ``normalize="batch"``,
    the default, or of all ``N`` examples with ``"global"``), so weights only scale updates down.
    ``beta`` goes linearly from ``beta`` to 1 over ``beta_steps`` steps (constant if None).

    Args:
        num_samples, batch_size: ``N`` and ``b`` per rank.
        alpha: priority exponent (0 = uniform), ``>= 0``.
        beta: initial importance-weight exponent in [0, 1].
        beta_steps: steps over which beta is annealed to 1.
        eps: added to ``|loss|`` so no example has zero probability.
        normalize: ``"batch"`` or ``"global"`` maximum for the weights.
        seed, rank, world_size: generator seed (same on every rank) and DDP placement.
    """

    wants_losses = True

    def __init__(self, num_samples: int, batch_size: int, *, alpha: float = 0.6, beta: float = 0.4,
                 beta_steps: int | None = None, eps: float = 1e-6, normalize: str = "batch", seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        check_sizes(num_samples, batch_size)
        alpha, beta, eps = float(alpha), float(beta), float(eps)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a non-negative number, got {alpha}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if beta_steps is not None and (isinstance(beta_steps, bool) or not isinstance(beta_steps, int)
                                       or beta_steps <= 0):
            raise ValueError(f"beta_steps must be a positive integer or None, got {beta_steps!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps}")
        if normalize not in ("batch", "global"):
            raise ValueError(f"normalize must be 'batch' or 'global', got {normalize!r}")
        self.seed = _check_seed(seed)
        # set up for one process while no group exists: checked again at every draw (never duplicate)
        self._alone = (rank is None or world_size is None) and not group_initialized()
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.global_batch = batch_size * self.world_size
        self.alpha, self.beta0, self.beta_steps, self.eps, self.normalize = alpha, beta, beta_steps, eps, normalize
        self.generator = torch.Generator().manual_seed(seed)
        self.priorities = torch.ones(num_samples, dtype=torch.float64)
        self.seen = torch.zeros(num_samples, dtype=torch.bool)
        self.max_priority = 1.0
        self.steps = 0
        self._last: dict[str, float] = {}
        self._init_passes()

    def __len__(self) -> int:
        return max(1, self.num_samples // self.global_batch)

    @property
    def beta(self) -> float:
        """The current importance-weight exponent."""
        if self.beta_steps is None:
            return self.beta0
        return self.beta0 + (1.0 - self.beta0) * min(self.steps / self.beta_steps, 1.0)

    def probabilities(self) -> torch.Tensor:
        """``P(i) = p_i^alpha / sum_j p_j^alpha`` (float64)."""
        q = self.priorities.pow(self.alpha)
        return q / q.sum()

    def weights_for(self, indices: torch.Tensor) -> torch.Tensor:
        """``(N P(i))^-beta`` of ``indices``, divided by the max (batch or global), at the current beta."""
        p = self.probabilities()
        b = self.beta
        w = (self.num_samples * p[indices]).pow(-b)
        top = w.max() if self.normalize == "batch" else (self.num_samples * p.min()).pow(-b)
        return w / top

    def _draw(self) -> Batch:
        """The next global batch: ``world_size * batch_size`` examples drawn with replacement from ``P``, with
        normalized weights."""
        if self._alone:
            self._alone = check_group(type(self).__name__)
        glob = torch.multinomial(self.probabilities(), self.global_batch, replacement=True, generator=self.generator)
        w = self.weights_for(glob).float()
        self._last = {"per_beta": self.beta, "per_weight_min": float(w.min())}
        self.steps += 1
        return Batch(glob, w)

    def observe(self, indices: torch.Tensor, losses: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> None:
        """Set the priorities of the trained examples to ``|loss| + eps`` (gathered across ranks under DDP)."""
        if losses is None:
            return
        idx, val = _gather_feedback(indices, losses, self.world_size)
        pr = val.abs() + self.eps
        self.priorities[idx] = pr
        self.seen[idx] = True
        self.max_priority = max(self.max_priority, float(pr.max()))
        self.priorities[~self.seen] = self.max_priority

    def metrics(self) -> dict[str, float]:
        """``per_beta`` and the smallest weight of the last batch."""
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "priorities": self.priorities.clone(),
                "seen": self.seen.clone(), "max_priority": self.max_priority, "steps": self.steps,
                "seed": self.seed, "num_samples": self.num_samples, "last": dict(self._last)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"state was saved with num_samples={state['num_samples']}, this sampler has "
                             f"{self.num_samples}")
        self.generator.set_state(state["generator"])
        self.priorities = state["priorities"].to(torch.float64).clone()
        self.seen = state["seen"].to(torch.bool).clone()
        self.max_priority = float(state["max_priority"])
        self.steps = int(state["steps"])
        self.seed = int(state["seed"])
        self._last = {k: float(v) for k, v in state.get("last", {}).items()}


@register("online_batch_selection")
def _obs_factory(ctx: SourceContext, *, s_e: float = 100.0, s_e_end: float | None = None,
                 decay_epochs: float | None = None, recompute_every: float | None = None,
                 chunk: int = 4096) -> OnlineBatchSelection:
    """Config ``sampler: {name: online_batch_selection, s_e: 100, recompute_every: 5, ...}``."""
    loss_fn = None
    if recompute_every is not None:
        loss_fn = model_scorer(ctx.model, _fetcher(ctx), loss=ctx.loss, score="loss", chunk_size=chunk)
    return OnlineBatchSelection(ctx.num_samples, ctx.batch_size, s_e=s_e, s_e_end=s_e_end, decay_epochs=decay_epochs,
                                loss_fn=loss_fn, recompute_every=recompute_every, chunk=chunk, seed=ctx.seed,
                                rank=ctx.rank, world_size=ctx.world_size)


@register("prioritized")
def _prioritized_factory(ctx: SourceContext, *, alpha: float = 0.6, beta: float = 0.4, beta_steps: int | None = None,
                         eps: float = 1e-6, normalize: str = "batch") -> PrioritizedSampler:
    """Config ``sampler: {name: prioritized, alpha: 0.6, beta: 0.4, beta_steps: 10000}``."""
    return PrioritizedSampler(ctx.num_samples, ctx.batch_size, alpha=alpha, beta=beta, beta_steps=beta_steps, eps=eps,
                              normalize=normalize, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size)
