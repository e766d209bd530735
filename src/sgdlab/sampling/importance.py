"""Importance sampling with the gradient-norm upper bound (Katharopoulos & Fleuret, ICML 2018).

"Not All Samples Are Created Equal: Deep Learning with Importance Sampling" samples each
mini-batch from a larger, uniformly *presampled* set with probabilities proportional to an
upper bound of the per-example gradient norm, reweights the chosen examples so the gradient
estimate stays unbiased, and switches importance sampling on only when the expected variance
reduction pays for the extra forward pass of the presample.

- Score (eq. 19): ``||d loss_i / d z_i||``, the norm of the gradient of the per-example loss
  with respect to the network's output ``z`` (the logits). It bounds the full per-example
  gradient norm up to a constant, and costs one forward pass: :func:`upper_bound_scores`.
- Presampling (section 3.3): draw ``B`` examples uniformly with replacement, score them,
  ``g_i = s_i / sum_j s_j``, draw ``b`` of them with replacement with probabilities ``g`` and
  weight each by ``w_i = 1 / (B g_i)`` (:func:`unbiased_weights`), so that
  ``E[mean(w_i grad_i)]`` is the presample's mean gradient.
- Variance reduction (eqs. 20-21), with ``u = 1/B``: ``1 - ||g-u||^2 / ||g||^2 = 1 / (B ||g||^2)``;
  the equivalent batch-size increment is ``tau = B * sum(g^2)`` ("variance"), the authors' code
  uses its square root ("std"): :func:`tau`.
- The switch (section 3.4): importance sampling runs while the exponential moving average of
  tau exceeds ``tau_th = (B + 3b) / (3b)`` (a backward pass costs about two forward passes);
  while sampling uniformly, tau is updated from the training batch's own scores, for free.

Everything is in :class:`ImportanceSampler`, a :class:`~sgdlab.sampling.base.BatchSource`;
:func:`model_scorer` turns a model into the ``score_fn`` the sampler needs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .base import Batch, SourceContext, check_group, check_sizes, group_initialized, register, resolve_rank
from .loading import ScoredPasses

__all__ = [
    "LOSSES",
    "ImportanceSampler",
    "default_tau_th",
    "model_logits",
    "model_scorer",
    "normalize_scores",
    "per_example_loss",
    "smooth_scores",
    "tau",
    "unbiased_weights",
    "upper_bound_scores",
]

LOSSES = ("cross_entropy", "bce", "mse", "token_cross_entropy", "causal_lm")
SEQUENCE_LOSSES = ("token_cross_entropy", "causal_lm")
IGNORE_INDEX = -100  # label of a token that is not counted (Hugging Face / PyTorch convention)
SCORES = ("upper_bound", "loss", "gradnorm")
TAU_KINDS = ("std", "variance")

LossArg = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Per-example losses and the upper bound of eq. 19
# ---------------------------------------------------------------------------------------------


def _check_loss(loss: Any) -> None:
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a callable loss(logits, targets) -> per-example "
                         f"losses, got {loss!r}")


def _dense_targets(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Targets as a float tensor shaped like ``logits``: class indices become one-hot rows."""
    if not torch.is_tensor(targets):
        raise ValueError(f"targets must be a tensor, got {type(targets).__name__}")
    n = logits.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"targets must have one row per example ({n}), got shape {tuple(targets.shape)}")
    if not targets.is_floating_point():
        if targets.ndim != 1:
            raise ValueError(f"integer targets must be class indices of shape ({n},), got {tuple(targets.shape)}")
        if logits.ndim != 2:
            raise ValueError(f"class-index targets need logits of shape (N, K), got {tuple(logits.shape)}")
        k = logits.shape[1]
        if n and (int(targets.min()) < 0 or int(targets.max()) >= k):
            raise ValueError(f"targets must be class indices in [0, {k}), got values in "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        return F.one_hot(targets.long(), k).to(logits.dtype)
    if targets.shape != logits.shape:
        raise ValueError(f"{loss}: float targets must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}")
    return targets.to(logits.dtype)


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor, loss: LossArg = "cross_entropy") -> torch.Tensor:
    """Per-example losses, the conventions :func:`upper_bound_scores` differentiates.

    - ``"cross_entropy"``: ``-sum_k y_k log softmax(z)_k`` (``y`` class indices, one-hot or soft rows).
    - ``"bce"``: sigmoid + binary cross-entropy averaged over the ``K`` outputs
      (``y`` in [0, 1] shaped like ``z``, or class indices, taken one-hot).
    - ``"mse"``: ``0.5 * ||z - y||^2`` (``y`` shaped like ``z`` or class indices, taken one-hot), the
      training engine's convention.
    - ``"token_cross_entropy"``: logits ``(N, T, V)``, integer targets ``(N, T)``; the mean of the token
      cross-entropies over the example's counted tokens (targets ``-100`` are not counted; an example with no
      counted token has loss 0) -- shared/METHODS.md, "importance sampling for sequences".
    - ``"causal_lm"``: the same after the causal shift (the logits at position ``t`` predict target ``t + 1``),
      as Hugging Face causal language models compute it.
    - a callable ``loss(logits, targets) -> per-example losses`` is called as is.
    """
    _check_loss(loss)
    if loss in SEQUENCE_LOSSES:
        return _token_loss(*_tokens(logits, targets, loss))
    if callable(loss):
        out = loss(logits, targets)
        if not torch.is_tensor(out) or out.shape != (logits.shape[0],):
            raise ValueError(f"loss callable must return per-example losses of shape ({logits.shape[0]},), got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        return out
    if loss == "cross_entropy" and logits.ndim != 2:
        raise ValueError(f"cross_entropy needs logits of shape (N, K), got {tuple(logits.shape)}")
    _dense_targets(logits, targets, loss)  # validates shapes and class indices
    return _loss(logits, targets, loss)


def _tokens(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated token logits ``(N, T', V)`` and targets ``(N, T')`` of a sequence loss (shifted for causal_lm)."""
    if not torch.is_tensor(logits) or logits.ndim != 3:
        raise ValueError(f"{loss} needs logits of shape (N, T, V), got {tuple(getattr(logits, 'shape', ()))}")
    if not torch.is_tensor(targets) or targets.is_floating_point() or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"{loss} needs integer targets of shape {tuple(logits.shape[:2])} (-100 = not counted), got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}")
    if loss == "causal_lm":
        logits, targets = logits[:, :-1], targets[:, 1:]
    counted = targets[targets != IGNORE_INDEX]
    v = logits.shape[-1]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= v):
        raise ValueError(f"{loss}: targets must be token ids in [0, {v}) or -100, got values in "
                         f"[{int(counted.min())}, {int(counted.max())}]")
    return logits, targets.long()


def _token_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example mean of the token cross-entropies over counted tokens (``y != -100``)."""
    n, t, v = z.shape
    ce = F.cross_entropy(z.reshape(n * t, v), y.reshape(n * t), ignore_index=IGNORE_INDEX, reduction="none")
    counted = (y != IGNORE_INDEX).sum(1).clamp(min=1)
    return ce.view(n, t).sum(1) / counted.to(ce.dtype)


def _token_scores(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||d loss_i / d Z_i||_F`` of :func:`_token_loss`: rows ``(softmax(z_t) - onehot(y_t)) / n_i``, 0 if not counted."""
    counted = y != IGNORE_INDEX
    n, t, v = z.shape
    flat, target, keep = z.reshape(n * t, v), torch.where(counted, y, 0).reshape(-1, 1), counted.reshape(-1, 1)
    sq = z.new_empty(n * t)
    rows = max(1, (1 << 18) // max(v, 1))  # blocks of about 1 MB: the softmax stays in cache, no logits-sized temp
    for i in range(0, n * t, rows):
        d = torch.softmax(flat[i:i + rows], dim=-1)
        d.scatter_add_(-1, target[i:i + rows], -keep[i:i + rows].to(d.dtype))
        sq[i:i + rows] = torch.linalg.vector_norm(d, dim=-1).square()
    sq = sq.view(n, t) * counted
    return sq.sum(1).sqrt() / counted.sum(1).clamp(min=1).to(z.dtype)


def _loss(logits: torch.Tensor, targets: torch.Tensor, loss: LossArg) -> torch.Tensor:
    """:func:`per_example_loss` without validation (usable under ``torch.func.vmap``)."""
    if loss in SEQUENCE_LOSSES:
        if loss == "causal_lm":
            logits, targets = logits[:, :-1], targets[:, 1:]
        return _token_loss(logits, targets.long())
    if callable(loss):
        return loss(logits, targets)
    if loss == "cross_entropy" and not targets.is_floating_point():
        return F.cross_entropy(logits, targets.long(), reduction="none")
    if targets.is_floating_point():
        y = targets.to(logits.dtype)
    else:
        y = torch.zeros_like(logits).scatter(1, targets.long().unsqueeze(1), 1.0)
    if loss == "cross_entropy":
        return -(y * F.log_softmax(logits, dim=1)).sum(1)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").flatten(1).mean(1)
    return 0.5 * (logits - y).pow(2).flatten(1).sum(1)


def upper_bound_scores(logits: torch.Tensor, targets: torch.Tensor, loss: LossArg = "cross_entropy") -> torch.Tensor:
    """Per-example importance score: the gradient norm of the loss w.r.t. the logits (eq. 19).

    Katharopoulos & Fleuret (2018), section 3.2: ``||grad_i|| <= C * ||d loss_i / d z_i||`` where ``z``
    is the last layer's pre-activation output, so this norm is a cheap upper bound (up to the
    constant ``C``, which cancels in ``g = s / sum(s)``) of the per-example gradient norm.

    Closed forms (no autograd):

    - ``"cross_entropy"`` (softmax + cross-entropy): ``||softmax(z) * sum_k y_k - y||``, i.e.
      ``||softmax(z) - y||`` for class indices, one-hot or probability rows (rows summing to 1).
    - ``"bce"`` (sigmoid + binary cross-entropy averaged over the ``K`` outputs): ``||sigmoid(z) - y|| / K``.
    - ``"mse"`` (``0.5 ||z - y||^2``, the engine's convention): ``||z - y||``, constant 1; with the
      ``mean_k (z_k - y_k)^2`` convention of ``torch.nn.MSELoss`` the gradient norm is ``2 ||z - y|| / K``,
      a constant factor that does not change the sampling distribution.
    - ``"token_cross_entropy"`` / ``"causal_lm"`` (sequences, METHODS.md "importance sampling for
      sequences"): the Frobenius norm of the gradient with respect to all of the example's token logits,
      ``sqrt(sum_t ||softmax(z_t) - onehot(y_t)||^2) / n_i`` over its ``n_i`` counted tokens (targets ``-100``
      and, for ``causal_lm``, the last position contribute zero rows); eq. 19 applied to the stacked outputs.
    - a callable ``loss(logits, targets) -> per-example losses``: autograd of the summed losses with
      respect to (a detached copy of) the logits, one pass, never backward through the network.

    Returns a detached float tensor of shape ``(N,)``.
    """
    _check_loss(loss)
    if loss in SEQUENCE_LOSSES:
        with torch.no_grad():
            z = logits.detach()
            _tokens(z, targets, loss)  # validation
            y = targets.long()
            if loss == "causal_lm":  # the last position predicts nothing: a zero row, as an uncounted token
                y = torch.cat([y[:, 1:], y.new_full((y.shape[0], 1), IGNORE_INDEX)], dim=1)
            return _token_scores(z, y)  # all positions: the softmax runs on contiguous logits
    if not torch.is_tensor(logits) or logits.ndim < 1:
        raise ValueError(f"logits must be a tensor of shape (N, ...), got {getattr(logits, 'shape', logits)!r}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if callable(loss):
        z = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = per_example_loss(z, targets, loss)
            (grad,) = torch.autograd.grad(losses.sum(), z)
        return grad.flatten(1).norm(dim=1)
    with torch.no_grad():
        z = logits.detach()
        if loss == "cross_entropy":
            if z.ndim != 2:
                raise ValueError(f"cross_entropy needs logits of shape (N, K), got {tuple(z.shape)}")
            y = _dense_targets(z, targets, loss)
            p = torch.softmax(z, dim=1)
            if targets.is_floating_point():
                p = p * y.sum(1, keepdim=True)
            return (p - y).norm(dim=1)
        y = _dense_targets(z, targets, loss)
        if loss == "bce":
            k = z[0].numel() if z.shape[0] else 1
            return (torch.sigmoid(z) - y).flatten(1).norm(dim=1) / k
        return (z - y).flatten(1).norm(dim=1)


# ---------------------------------------------------------------------------------------------
# Distribution, variance reduction and weights
# ---------------------------------------------------------------------------------------------


def _as_scores(scores: Any, name: str = "scores") -> torch.Tensor:
    s = torch.as_tensor(scores)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(s.shape)}")
    s = s.detach().to("cpu", torch.float64)
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} must be finite")
    if (s < 0).any():
        raise ValueError(f"{name} must be non-negative (min {float(s.min())})")
    return s


def normalize_scores(scores: Any) -> torch.Tensor:
    """``g = s / sum(s)`` in float64 on the CPU; all-zero scores give the uniform distribution."""
    s = _as_scores(scores)
    total = s.sum()
    if total <= 0:
        return torch.full_like(s, 1.0 / s.numel())
    return s / total


def tau(scores: Any, kind: str = "std") -> float:
    """Variance-reduction factor of sampling with ``g = scores / sum(scores)`` (section 3.4, eq. 21).

    With ``u = 1/B`` and ``B = len(scores)``: ``1 - ||g - u||^2 / ||g||^2 = 1 / (B ||g||^2)``, so

    - ``kind="variance"``: ``tau = (1 - ||g-u||^2/||g||^2)^-1 = B * sum(g^2)`` (the equivalent increase of
      the batch size, derived from the variances);
    - ``kind="std"`` (default, as the authors' code): its square root ``sqrt(B * sum(g^2))``.

    ``tau >= 1``, with equality for uniform scores.
    """
    if kind not in TAU_KINDS:
        raise ValueError(f"kind must be one of {TAU_KINDS}, got {kind!r}")
    g = normalize_scores(scores)
    t = float(g.numel() * g.pow(2).sum())
    return t if kind == "variance" else math.sqrt(t)


def unbiased_weights(scores: Any, chosen: Any) -> torch.Tensor:
    """Weights ``w = 1 / (B g_i)`` of the presample slots ``chosen`` (eq. 5 with the presample as dataset).

    ``g = scores / sum(scores)`` over the ``B`` presampled examples; ``chosen`` indexes the presample
    (positions in ``scores``, repeats allowed). Then ``E_{i~g}[w_i x_i] = mean_j x_j`` for any ``x``:
    the weighted mini-batch gradient is an unbiased estimate of the presample's mean gradient.
    Returns float32 weights; choosing a slot of probability zero raises ValueError.
    """
    g = normalize_scores(scores)
    idx = torch.as_tensor(chosen).long().reshape(-1).cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= g.numel()):
        raise ValueError(f"chosen must index the {g.numel()} presampled scores, got values outside [0, {g.numel()})")
    gi = g[idx]
    if (gi <= 0).any():
        raise ValueError("chosen contains an example of zero probability (zero score)")
    return (1.0 / (g.numel() * gi)).float()


def smooth_scores(scores: Any, smoothing: Any) -> torch.Tensor:
    """Apply ``smoothing`` to non-negative scores (float64, CPU); see :class:`ImportanceSampler`.

    - ``None``: unchanged;
    - a number ``c`` or ``{"kind": "additive", "c": c}``: ``s + c`` (pulls ``g`` towards uniform);
    - ``{"kind": "adaptive", "fraction": f}``: ``s + f * mean(s)`` (additive, scale-free);
    - ``{"kind": "power", "exponent": p}``: ``s ** p`` with ``0 < p``, ``p < 1`` flattens ``g``.
    """
    s = _as_scores(scores)
    kind, value = _parse_smoothing(smoothing)
    if kind is None:
        return s
    if kind == "additive":
        return s + value
    if kind == "adaptive":
        return s + value * s.mean()
    return s.pow(value)


def _parse_smoothing(smoothing: Any) -> tuple[str | None, float]:
    if smoothing is None:
        return None, 0.0
    if isinstance(smoothing, bool):
        raise ValueError(f"smoothing must be None, a number or a mapping with 'kind', got {smoothing!r}")
    if isinstance(smoothing, int | float):
        kind, value = "additive", float(smoothing)
    elif isinstance(smoothing, dict):
        kind = smoothing.get("kind")
        keys = {"additive": "c", "adaptive": "fraction", "power": "exponent"}
        if kind not in keys:
            raise ValueError(f"smoothing kind must be one of {tuple(keys)}, got {kind!r}")
        extra = set(smoothing) - {"kind", keys[kind]}
        if extra or keys[kind] not in smoothing:
            raise ValueError(f"smoothing {{kind: {kind}}} takes exactly the key {keys[kind]!r}, got {sorted(smoothing)}")
        value = float(smoothing[keys[kind]])
    else:
        raise ValueError(f"smoothing must be None, a number or a mapping with 'kind', got {smoothing!r}")
    if not math.isfinite(value) or value < 0 or (kind == "power" and value == 0):
        raise ValueError(f"smoothing {kind} value must be {'positive' if kind == 'power' else 'non-negative'} "
                         f"and finite, got {value!r}")
    return kind, value


def default_tau_th(presample: int, batch_size: int, cost_ratio: float = 2.0) -> float:
    """``(B + (1 + r) b) / ((1 + r) b)``: the tau above which importance sampling saves time (section 3.4).

    One importance-sampled step costs ``B`` forward passes (scoring) plus ``b`` forward and backward
    passes; a backward pass costs ``r`` forward passes (``r = 2``: ``(B + 3b) / (3b)``).
    """
    return (presample + (1.0 + cost_ratio) * batch_size) / ((1.0 + cost_ratio) * batch_size)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


OBSERVE_WARNING_STEPS = 200  # uniform steps without any observed scores before ImportanceSampler warns


def _all_gather_cat(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) across ranks in rank order."""
    if world_size == 1:
        return t
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs an initialized torch.distributed process group")
    t = t.contiguous()
    if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
        t = t.cuda()
    parts = [torch.empty_like(t) for _ in range(world_size)]
    torch.distributed.all_gather(parts, t)
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------


class ImportanceSampler(ScoredPasses):
    """Presample-score-resample batch source with the automatic switch (Katharopoulos & Fleuret 2018, Alg. 1).

    Each step, while importance sampling is active:

    1. draw ``presample = B`` dataset indices uniformly **with replacement** (the global presample;
       under DDP each rank scores its ``B / world_size`` share and the scores are all-gathered);
    2. ``scores = score_fn(indices)`` (e.g. :func:`model_scorer`), optionally smoothed;
    3. ``g = scores / sum(scores)``; update the moving average of tau with :func:`tau` of ``g``;
    4. draw the global batch of ``world_size * batch_size`` presample slots with replacement with
       probabilities ``g``; weights ``1 / (B g_i)``; each rank keeps its :func:`rank_slice`.

    The switch: importance sampling is active while the moving average ``tau`` exceeds ``tau_th``
    (checked at the start of every step; ``tau <- a * tau + (1 - a) * new``, ``a = tau_momentum``,
    starting at 0, so the run starts uniformly). While inactive the batch is drawn uniformly with
    replacement, unweighted (``weights=None``), and tau is updated in :meth:`observe` from the
    upper-bound scores of the trained batch, which the engine computes from the training forward pass
    (``wants_scores`` is True). Scores observed while active are ignored (the presample's were used).
    In your own loop call ``observe(batch.indices, scores=upper_bound_scores(logits, y))`` after every
    step: without it tau stays 0 and importance sampling never switches on, so the sampler warns after
    ``OBSERVE_WARNING_STEPS`` uniform steps without any observed scores.

    Args:
        num_samples: dataset size ``N``.
        batch_size: ``b`` per rank.
        presample: ``B``, the number of uniformly presampled examples (global; not a multiple of
            anything; divisible by ``world_size``; at least the global batch ``world_size * b``).
        score_fn: ``score_fn(indices: LongTensor) -> scores`` (non-negative, one per index).
        tau_th: switch threshold; default :func:`default_tau_th` ``(B + (1+r) b) / ((1+r) b)`` with the
            global ``b`` and ``r = cost_ratio``. Use ``0`` to always sample by importance after the
            first step, ``float("inf")`` never.
        tau_kind: ``"std"`` (authors' code, default) or ``"variance"``, see :func:`tau`.
        tau_momentum: ``a`` in ``[0, 1)``.
        cost_ratio: ``r``, cost of a backward pass in forward passes (2).
        smoothing: ``None``; a number ``c`` (``s + c``); ``{"kind": "additive", "c": c}``;
            ``{"kind": "adaptive", "fraction": f}`` (``s + f * mean(s)``); ``{"kind": "power",
            "exponent": p}`` (``s ** p``). Applied before ``g`` and tau are computed (also to observed scores).
        seed: seed of the sampler's generator (identical on every rank).
        rank, world_size: DDP placement (default: the process group, else 0 / 1).

    ``tau``, ``active``, ``tau_th`` are readable; :meth:`metrics` returns ``is_tau``, ``is_active``,
    ``is_weight_max``, ``is_weight_min``, ``is_tau_new``; :meth:`state_dict` holds the generator state,
    tau, the flag and counters (loadable with ``torch.load(weights_only=True)``) for exact resume.
    """

    wants_scores = True

    def __init__(self, num_samples: int, batch_size: int, *, presample: int, score_fn: Callable[[torch.Tensor], Any],
                 tau_th: float | None = None, tau_kind: str = "std", tau_momentum: float = 0.9,
                 cost_ratio: float = 2.0, smoothing: Any = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        check_sizes(num_samples, batch_size)
        if isinstance(presample, bool) or not isinstance(presample, int) or presample <= 0:
            raise ValueError(f"presample must be a positive integer, got {presample!r}")
        if not callable(score_fn):
            raise ValueError(f"score_fn must be callable (indices -> scores), got {type(score_fn).__name__}")
        if tau_kind not in TAU_KINDS:
            raise ValueError(f"tau_kind must be one of {TAU_KINDS}, got {tau_kind!r}")
        tau_momentum = float(tau_momentum)
        if not 0.0 <= tau_momentum < 1.0:
            raise ValueError(f"tau_momentum must be in [0, 1), got {tau_momentum}")
        cost_ratio = float(cost_ratio)
        if not (math.isfinite(cost_ratio) and cost_ratio >= 0):
            raise ValueError(f"cost_ratio must be a non-negative number, got {cost_ratio}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        _parse_smoothing(smoothing)
        # set up for one process while no group exists: checked again at every draw (never duplicate)
        self._alone = (rank is None or world_size is None) and not group_initialized()
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if presample % self.world_size:
            raise ValueError(f"presample ({presample}) must be divisible by world_size ({self.world_size})")
        self.num_samples, self.batch_size, self.presample = num_samples, batch_size, presample
        self.global_batch = batch_size * self.world_size
        if presample < self.global_batch:
            raise ValueError(f"presample ({presample}) must be at least the global batch size ({self.global_batch} = "
                             f"batch_size x world_size): the batch is resampled from the presample")
        if tau_th is None:
            tau_th = default_tau_th(presample, self.global_batch, cost_ratio)
        tau_th = float(tau_th)
        if math.isnan(tau_th) or tau_th < 0:
            raise ValueError(f"tau_th must be a non-negative number, got {tau_th}")
        self.score_fn = score_fn
        self.tau_th, self.tau_kind, self.tau_momentum = tau_th, tau_kind, tau_momentum
        self.cost_ratio, self.smoothing, self.seed = cost_ratio, smoothing, seed
        self.generator = torch.Generator().manual_seed(seed)
        self._tau = 0.0
        self._active = False
        self.steps = 0
        self.is_steps = 0
        self._observed = False
        self._last: dict[str, float] = {}
        self._init_passes()

    # -- state ---------------------------------------------------------------------------------

    @property
    def tau(self) -> float:
        """The moving average of tau (starts at 0)."""
        return self._tau

    @property
    def active(self) -> bool:
        """Whether the last batch was drawn by importance sampling."""
        return self._active

    def __len__(self) -> int:
        return max(1, self.num_samples // self.global_batch)

    def _update_tau(self, scores: torch.Tensor) -> float:
        new = tau(scores, self.tau_kind)
        self._tau = self.tau_momentum * self._tau + (1.0 - self.tau_momentum) * new
        return new

    # -- protocol ------------------------------------------------------------------------------

    def _score_presample(self, pre: torch.Tensor) -> torch.Tensor:
        share = self.presample // self.world_size
        mine = pre[self.rank * share:(self.rank + 1) * share] if self.world_size > 1 else pre
        s = torch.as_tensor(self.score_fn(mine)).detach().reshape(-1)
        if s.numel() != mine.numel():
            raise ValueError(f"score_fn returned {s.numel()} scores for {mine.numel()} indices")
        s = _all_gather_cat(s.float() if s.dtype not in (torch.float32, torch.float64) else s, self.world_size)
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError("score_fn returned non-finite scores for the presample: the model's outputs "
                                     "are not finite (training has diverged)")
        return smooth_scores(s, self.smoothing)

    def _draw(self) -> Batch:
        """The next global batch: by importance (weighted) while ``tau > tau_th``, else uniformly."""
        if self._alone:
            self._alone = check_group(type(self).__name__)
        self._active = self._tau > self.tau_th
        self.steps += 1
        if self.steps == OBSERVE_WARNING_STEPS and not self._observed and not self._active:
            warnings.warn(f"ImportanceSampler has drawn {self.steps} uniform batches and observe() was never called "
                          "with scores: tau stays 0 and importance sampling never switches on; call "
                          "sampler.observe(batch.indices, scores=upper_bound_scores(logits, y)) after every step",
                          UserWarning, stacklevel=3)
        if not self._active:
            glob = torch.randint(self.num_samples, (self.global_batch,), generator=self.generator)
            self._last = {"is_weight_max": 1.0, "is_weight_min": 1.0}
            return Batch(glob, None)
        self.is_steps += 1
        pre = torch.randint(self.num_samples, (self.presample,), generator=self.generator)
        s = self._score_presample(pre)
        g = normalize_scores(s)
        new = self._update_tau(g)
        slots = torch.multinomial(g, self.global_batch, replacement=True, generator=self.generator)
        w = (1.0 / (self.presample * g[slots])).float()
        self._last = {"is_weight_max": float(w.max()), "is_weight_min": float(w.min()), "is_tau_new": new}
        return Batch(pre[slots], w)

    def observe(self, indices: torch.Tensor, losses: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> None:
        """Update tau from the trained batch's upper-bound ``scores`` when that batch was uniform.

        Under DDP the scores of all ranks are gathered first, so every rank keeps the same tau.
        """
        if scores is not None:
            self._observed = True
        if self._active or scores is None:
            return
        s = torch.as_tensor(scores).detach().reshape(-1)
        s = _all_gather_cat(s.float() if s.dtype not in (torch.float32, torch.float64) else s, self.world_size)
        self._last["is_tau_new"] = self._update_tau(smooth_scores(s, self.smoothing))

    def metrics(self) -> dict[str, float]:
        """``is_tau`` (moving average), ``is_active`` (0/1), ``is_tau_th``, last weights' max/min, last raw tau."""
        return {"is_tau": self._tau, "is_active": float(self._active), "is_tau_th": self.tau_th, **self._last}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "tau": self._tau, "active": self._active,
                "steps": self.steps, "is_steps": self.is_steps, "seed": self.seed, "last": dict(self._last),
                "num_samples": self.num_samples, "presample": self.presample, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "presample", "global_batch"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]}, this sampler has {getattr(self, key)}")
        self.generator.set_state(state["generator"])
        self._tau = float(state["tau"])
        self._active = bool(state["active"])
        self.steps = int(state["steps"])
        self.is_steps = int(state["is_steps"])
        self.seed = int(state.get("seed", self.seed))
        self._last = {k: float(v) for k, v in state.get("last", {}).items()}

    def __repr__(self) -> str:
        return (f"ImportanceSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"presample={self.presample}, tau_th={self.tau_th:.4g}, tau_kind={self.tau_kind!r}, "
                f"smoothing={self.smoothing!r}, seed={self.seed}, rank={self.rank}, world_size={self.world_size})")


# ---------------------------------------------------------------------------------------------
# Scoring a model
# ---------------------------------------------------------------------------------------------


def _per_example_grad_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossArg) -> torch.Tensor:
    """Exact per-example gradient norms over all trainable parameters (torch.func vmap of grad)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p, xi, yi):
        if isinstance(xi, Mapping):
            out = functional_call(model, (p, buffers), (), {k: v.unsqueeze(0) for k, v in xi.items()})
        else:
            out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return _loss(model_logits(out).float(), yi.unsqueeze(0), loss).sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    sq = None
    for g in grads.values():
        v = g.flatten(1).pow(2).sum(1)
        sq = v if sq is None else sq + v
    return sq.sqrt()


def model_logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, ``output.logits`` (a Hugging Face ``ModelOutput``),
    ``output["logits"]`` or the first element of a tuple; ValueError otherwise."""
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not torch.is_tensor(logits):
        raise ValueError(f"the model's output must be logits, a ModelOutput with .logits, a dict with 'logits' or a "
                         f"tuple of logits first, got {type(output).__name__}")
    return logits


def _call(model: torch.nn.Module, x: Any) -> torch.Tensor:
    return model_logits(model(**x) if isinstance(x, Mapping) else model(x))


def _split(batch: Any, label_key: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` of what ``fetch`` returned: an ``(x, y)`` pair or a dict holding ``label_key``."""
    if isinstance(batch, Mapping):
        if label_key not in batch:
            raise ValueError(f"fetch returned a dict without the targets {label_key!r} (keys: {sorted(batch)})")
        rest = {k: v for k, v in batch.items() if k != label_key}
        return rest, batch[label_key]
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise ValueError(f"fetch must return (inputs, targets) or a dict of model inputs with {label_key!r}, got "
                         f"{type(batch).__name__}")
    return batch[0], batch[1]


def model_scorer(model: torch.nn.Module, fetch: Callable[[torch.Tensor], Any], *,
                 loss: LossArg = "cross_entropy", score: str = "upper_bound",
                 chunk_size: int | None = None, label_key: str = "labels") -> Callable[[torch.Tensor], torch.Tensor]:
    """Build ``score_fn(indices) -> scores`` for :class:`ImportanceSampler` from a model.

    ``fetch(indices)`` returns the batch, on the model's device and preprocessed, as

    - ``(x, y)``: inputs and targets, the model is called as ``model(x)``, or as ``model(**x)`` when ``x`` is a
      dict of model inputs;
    - a dict of model inputs holding the targets under ``label_key`` (a collated Hugging Face batch): the
      targets are taken out and the model is called on the rest (``model(**inputs)``).

    The output may be logits, a Hugging Face ``ModelOutput`` (its ``.logits``), a dict with ``"logits"`` or a
    tuple with the logits first (:func:`model_logits`).  Sequences: ``loss="causal_lm"`` or
    ``"token_cross_entropy"`` score each sequence by the norm of the gradient of its loss with respect to all
    its token logits (see :func:`upper_bound_scores`).
    The model runs in eval mode (every submodule's mode is restored afterwards), in chunks of
    ``chunk_size`` examples (all at once if None). ``score``:

    - ``"upper_bound"``: one no-grad forward pass and :func:`upper_bound_scores` (eq. 19; the paper's);
    - ``"loss"``: the per-example loss (the "loss" baseline of section 4);
    - ``"gradnorm"``: the exact per-example gradient norm over all trainable parameters via
      ``torch.func.vmap(grad(functional_call))`` (slow, for ablations).

    Returns float32 scores on the CPU.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(fetch):
        raise ValueError("fetch must be callable (indices -> (x, y) or a dict of model inputs with the targets)")
    _check_loss(loss)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")

    def score_fn(indices: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices).long().reshape(-1)
        step = chunk_size or max(1, idx.numel())
        modes = [(m, m.training) for m in model.modules()]
        out = []
        try:
            model.eval()
            for i in range(0, idx.numel(), step):
                x, y = _split(fetch(idx[i:i + step]), label_key)
                if score == "gradnorm":
                    s = _per_example_grad_norms(model, x, y, loss)
                else:
                    with torch.no_grad():
                        z = _call(model, x).float()
                    s = upper_bound_scores(z, y, loss) if score == "upper_bound" else \
                        per_example_loss(z, y, loss).detach()
                out.append(s.detach().float().cpu())
        finally:
            for m, training in modes:
                m.training = training
        if len(out) == 1:
            return out[0]
        return torch.cat(out) if out else torch.zeros(0)

    return score_fn


def _fetcher(ctx: SourceContext) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    if ctx.model is None:
        raise ValueError("this sampler needs the model (ctx.model) to score examples")

    def fetch(indices: torch.Tensor):
        if ctx.train_x is None or ctx.train_y is None:  # checked lazily: config checks build without data
            raise ValueError("this sampler needs the training tensors (ctx.train_x, ctx.train_y) to score examples")
        idx = indices.to(ctx.train_x.device)
        x = ctx.train_x[idx]
        if ctx.transform is not None:
            x = ctx.transform(x)
        return x.to(ctx.device), ctx.train_y[idx].to(ctx.device)

    return fetch


@register("importance")
def _importance_factory(ctx: SourceContext, *, presample: int = 640, tau_th: float | None = None,
                        tau_kind: str = "std", tau_momentum: float = 0.9, cost_ratio: float = 2.0,
                        smoothing: Any = None, score: str = "upper_bound",
                        chunk_size: int | None = None) -> ImportanceSampler:
    """Config ``sampler: {name: importance, presample: 640, tau_th: 1.5, score: upper_bound, ...}``."""
    fn = model_scorer(ctx.model, _fetcher(ctx), loss=ctx.loss, score=score, chunk_size=chunk_size)
    return ImportanceSampler(ctx.num_samples, ctx.batch_size, presample=presample, score_fn=fn, tau_th=tau_th,
                             tau_kind=tau_kind, tau_momentum=tau_momentum, cost_ratio=cost_ratio,
                             smoothing=smoothing, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size)
