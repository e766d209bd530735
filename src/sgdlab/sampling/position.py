"""Exact resume point of any sgdlab sampler read through a loader that reads ahead.

A ``torch.utils.data.DataLoader`` with workers draws ``num_workers * prefetch_factor`` batches of
indices ahead of training, Lightning's fetcher one more, Accelerate's loader one more: when a
checkpoint is written, the sampler's own :meth:`state_dict` is already several batches past the last
batch that was trained on, and resuming from it would skip those batches.

:class:`LoaderPosition` records the trained-on position instead, in one of two ways:

- *Blind samplers* (Epoch-, Replacement-, SequencedReplacementSampler) draw from their indices alone, so a
  batch can be drawn again: the state is the sampler's state when the current ``iter()`` pass began plus the
  number of batches of that pass trained on; loading restores the start of the pass and redraws that many
  batches (a few microseconds each), and the next ``iter()`` yields exactly the rest of the (effective) epoch.
- *Score-driven samplers* (importance sampling, online batch selection, prioritized sampling;
  :class:`~sgdlab.sampling.loading.ScoredPasses`) draw from the model's scores or the observed losses, which
  have changed by the time of a resume, so a batch cannot be redrawn: the state is the sampler's current
  state (after its latest draw) plus the *global* batches the loader drew but training did not reach; loading
  restores the state and the next pass yields those batches first.  A loader keeps the same number of batches
  in flight after the resume as before it, so every later batch is drawn after the same trained steps, with
  the same model and the same feedback, as in an uninterrupted run: the resume is exact.
"""

from __future__ import annotations

import torch

from .base import Batch

__all__ = ["LoaderPosition"]


class LoaderPosition:
    """Trained-on position of ``sampler`` (any sgdlab sampler) behind a loader that reads ahead.

    Call :meth:`advance` once per trained batch (a training-step hook, or the end of the loop body) and
    save :meth:`state_dict` with the checkpoint; on resume call :meth:`load_state_dict` *before* the
    loader is iterated.  The state holds tensors, numbers and the sampler's own state only
    (``torch.load(weights_only=True)``) and no rank-dependent data: every rank saves the same state.
    """

    def __init__(self, sampler):
        if hasattr(sampler, "_start_pass"):
            self.blind = True
        elif hasattr(sampler, "_pass_batches"):
            self.blind = False
        else:
            raise TypeError(f"sampler must be an sgdlab sampler (EpochSampler, ReplacementSampler, "
                            f"SequencedReplacementSampler, ImportanceSampler, OnlineBatchSelection or "
                            f"PrioritizedSampler), got {type(sampler).__name__}")
        self.sampler = sampler
        self._pass = sampler._passes
        self.consumed = 0

    def advance(self, n: int = 1) -> None:
        """``n`` more batches of the current pass were trained on."""
        passes = self.sampler._passes
        if passes != self._pass:  # a new iter() pass began since the last batch
            self._pass, self.consumed = passes, 0
        self.consumed += int(n)

    def _consumed(self) -> int:
        return self.consumed if self._pass == self.sampler._passes else 0

    def state_dict(self) -> dict:
        """Blind: ``{"origin": state at the start of the pass, "consumed": batches trained since}``; score-driven:
        ``{"state": the sampler's state, "pending": {"indices", "weights"} of the global batches drawn but not
        trained, stacked (or None)}``."""
        s = self.sampler
        if not self.blind:
            pending = s._pass_batches[self._consumed():] if s._passes else []
            return {"state": s.state_dict(), "pending": _stack(pending)}
        if s._passes == 0:  # never iterated: the sampler's own state is exact
            return {"origin": s.state_dict(), "consumed": 0}
        return {"origin": s._pass_origin, "consumed": self._consumed()}

    def load_state_dict(self, state: dict) -> None:
        """Put the sampler where the saved run had trained up to (call before iterating the loader)."""
        s = self.sampler
        if not self.blind:
            if "state" not in state:
                raise ValueError("LoaderPosition: this state was saved for a blind sampler (it has 'origin'), "
                                 f"not for a {type(s).__name__}")
            s.load_state_dict(state["state"])
            s._replay_after_load(_unstack(state["pending"]))
            self._pass, self.consumed = s._passes, 0
            return
        if "origin" not in state:
            raise ValueError(f"LoaderPosition: this state was saved for a score-driven sampler (it has 'pending'), "
                             f"not for a {type(s).__name__}")
        s.load_state_dict(state["origin"])
        for _ in range(int(state["consumed"])):
            s._next_indices()
        self._pass, self.consumed = s._passes, 0


def _stack(batches: list[Batch]) -> dict | None:
    if not batches:
        return None
    weights = [b.weights for b in batches]
    if all(w is None for w in weights):
        w = None
    else:
        w = torch.stack([torch.ones(len(b)) if b.weights is None else b.weights.float() for b in batches])
        # uniform batches among weighted ones: mark them with NaN rows so they load back as None
        for k, b in enumerate(batches):
            if b.weights is None:
                w[k] = float("nan")
    return {"indices": torch.stack([b.indices.long() for b in batches]), "weights": w}


def _unstack(pending: dict | None) -> list[Batch]:
    if pending is None:
        return []
    idx, w = pending["indices"], pending["weights"]
    out = []
    for k in range(idx.shape[0]):
        wk = None if w is None or bool(torch.isnan(w[k]).all()) else w[k].float()
        out.append(Batch(idx[k].long(), wk))
    return out
