"""Exact resume point of a blind sampler read through a loader that reads ahead.

A ``torch.utils.data.DataLoader`` with workers draws ``num_workers * prefetch_factor`` batches of
indices ahead of training, Lightning's fetcher one more, Accelerate's loader one more: when a
checkpoint is written, the sampler's own :meth:`state_dict` is already several batches past the last
batch that was trained on, and resuming from it would skip those batches.

:class:`LoaderPosition` records instead *where the current pass over the sampler started* (the
sampler's state when ``iter()`` began) and *how many batches of that pass were trained on*.  Loading
restores the start of the pass and redraws that many batches, so the next ``iter()`` yields exactly the
batches an uninterrupted run would have trained on next -- the rest of the (effective) epoch, see
``EpochSampler.__iter__``.  Redrawing costs a few microseconds per batch.
"""

from __future__ import annotations

__all__ = ["LoaderPosition"]


class LoaderPosition:
    """Trained-on position of ``sampler`` (an Epoch-, Replacement- or SequencedReplacementSampler).

    Call :meth:`advance` once per trained batch (a training-step hook, or the end of the loop body) and
    save :meth:`state_dict` with the checkpoint; on resume call :meth:`load_state_dict` *before* the
    loader is iterated.  The state holds tensors and numbers only (``torch.load(weights_only=True)``).
    """

    def __init__(self, sampler):
        if not hasattr(sampler, "_start_pass"):
            raise TypeError(f"sampler must be an sgdlab blind sampler (EpochSampler, ReplacementSampler or "
                            f"SequencedReplacementSampler), got {type(sampler).__name__}")
        self.sampler = sampler
        self._pass = sampler._passes
        self.consumed = 0

    def advance(self, n: int = 1) -> None:
        """``n`` more batches of the current pass were trained on."""
        passes = self.sampler._passes
        if passes != self._pass:  # a new iter() pass began since the last batch
            self._pass, self.consumed = passes, 0
        self.consumed += int(n)

    def state_dict(self) -> dict:
        """``{"origin": sampler state at the start of the pass, "consumed": batches trained since}``."""
        s = self.sampler
        if s._passes == 0:  # never iterated: the sampler's own state is exact
            return {"origin": s.state_dict(), "consumed": 0}
        consumed = self.consumed if self._pass == s._passes else 0
        return {"origin": s._pass_origin, "consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        """Put the sampler where the saved run had trained up to (call before iterating the loader)."""
        s = self.sampler
        s.load_state_dict(state["origin"])
        for _ in range(int(state["consumed"])):
            s._next_indices()
        self._pass, self.consumed = s._passes, 0
