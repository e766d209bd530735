"""Score-driven samplers inside a ``torch.utils.data.DataLoader``: index batches that carry their weights.

Blind samplers are plain iterables of index lists.  Score-driven samplers (importance sampling,
Katharopoulos & Fleuret 2018; online batch selection, Loshchilov & Hutter 2015; prioritized sampling,
Schaul et al. 2016) are iterables too, through :class:`ScoredPasses`: each ``iter()`` pass yields the rest of
the current effective epoch as :class:`IndexBatch` lists (plain ``list[int]`` of this rank's indices) whose
``weights`` attribute holds the batch's importance weights (None for an unweighted batch).

A ``DataLoader`` hands each index list to the dataset, in a worker when ``num_workers > 0``, so the weights
travel with the list: :class:`WithWeights` wraps a dataset and appends each example's weight and index to it
(``dataset.__getitems__`` receives the whole :class:`IndexBatch`), and the default collate stacks them::

    loader = DataLoader(WithWeights(data), batch_sampler=sampler, num_workers=2)
    for x, y, w, idx in loader:
        losses = per_example_loss(model(x), y)
        (w * losses).mean().backward()                 # Batch semantics: mean(weights * losses)
        sampler.observe(idx, losses=losses.detach(), scores=upper_bound_scores(...))

Draws depend on the model and on the feedback, so a batch that a read-ahead loader drew but training did
not reach cannot be redrawn later: :class:`~sgdlab.sampling.LoaderPosition` saves those drawn-but-untrained
global batches with the sampler's state, and the resumed pass replays them first (see its docstring).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .base import Batch, check_group, rank_slice

__all__ = ["IndexBatch", "ScoredPasses", "WithWeights"]


class IndexBatch(list):
    """A batch of dataset indices (a ``list[int]``) with the batch's per-example ``weights`` (or None).

    Pickles with its weights, so it reaches DataLoader workers intact.  ``weights`` is a float32 tensor of
    one weight per index: the training loss is ``mean(weights * per_example_loss)`` (see
    :class:`~sgdlab.sampling.Batch`).
    """

    def __init__(self, indices=(), weights: torch.Tensor | None = None):
        super().__init__(indices)
        self.weights = weights

    def __reduce__(self):
        return IndexBatch, (list(self), self.weights)


def _attach(item, weight: torch.Tensor, index: int, weight_key: str, index_key: str):
    if isinstance(item, Mapping):
        return {**item, weight_key: weight, index_key: index}
    if isinstance(item, tuple | list):
        return (*item, weight, index)
    return item, weight, index


class WithWeights(torch.utils.data.Dataset):
    """``dataset`` whose examples also carry their sampling weight and their dataset index.

    Use it with any sampler as ``DataLoader(WithWeights(data), batch_sampler=sampler, ...)``:

    - tuple (or list) examples become ``(*example, weight, index)``, so a ``TensorDataset(x, y)`` batch is
      ``x, y, w, idx``;
    - dict examples (Hugging Face style) get ``weight_key`` and ``index_key`` entries;
    - any other example becomes ``(example, weight, index)``.

    ``weight`` is a 0-d float32 tensor: the importance weight of the batch the example was drawn in
    (:class:`IndexBatch` ``.weights``), 1 for unweighted batches and for plain index lists.  ``index`` is the
    int dataset index (pass it to ``sampler.observe``).  Examples drawn twice in one batch appear twice.
    """

    def __init__(self, dataset, *, weight_key: str = "weight", index_key: str = "index"):
        if not isinstance(weight_key, str) or not isinstance(index_key, str) or weight_key == index_key:
            raise ValueError(f"weight_key and index_key must be two different strings, got {weight_key!r}, "
                             f"{index_key!r}")
        self.dataset, self.weight_key, self.index_key = dataset, weight_key, index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return _attach(self.dataset[index], torch.tensor(1.0), int(index), self.weight_key, self.index_key)

    def __getitems__(self, indices) -> list:
        weights = getattr(indices, "weights", None)
        inner = getattr(self.dataset, "__getitems__", None)
        items = inner(list(indices)) if inner is not None else [self.dataset[i] for i in indices]
        ws = weights.float().unbind(0) if weights is not None else [torch.tensor(1.0)] * len(items)
        return [_attach(item, w, int(i), self.weight_key, self.index_key)
                for item, w, i in zip(items, ws, indices)]


class ScoredPasses:
    """Iteration of a score-driven sampler as a DataLoader ``batch_sampler`` (mixin).

    The sampler defines ``_draw() -> Batch`` (the *global* batch of ``world_size * batch_size`` indices and
    its weights, advancing its state by one step), ``steps`` (global batches drawn so far), ``rank``,
    ``world_size`` and ``__len__`` (steps per effective epoch); ``next_batch()`` is this rank's slice of
    ``_draw()``.  Each ``iter()`` pass yields the rest of the current effective epoch, ``len(self)`` batches
    from a boundary, as :class:`IndexBatch` lists, and records the global batches it drew, so that
    :class:`~sgdlab.sampling.LoaderPosition` can save those a read-ahead loader drew but training did not
    reach; after :meth:`_replay_after_load` the next pass yields them again before drawing new ones.
    """

    _passes: int = 0
    _pass_batches: list
    _replay: list

    def _init_passes(self) -> None:
        self._passes = 0
        self._pass_batches = []
        self._replay = []

    def _draw(self) -> Batch:  # pragma: no cover - every sampler defines it
        raise NotImplementedError

    def _slice(self, glob: Batch) -> Batch:
        if self.world_size == 1:
            return glob
        w = glob.weights
        return Batch(rank_slice(glob.indices, self.rank, self.world_size),
                     None if w is None else rank_slice(w, self.rank, self.world_size))

    def next_batch(self) -> Batch:
        """This rank's share of the next global batch, with weights when the method has them."""
        return self._slice(self._draw())

    def __iter__(self) -> Iterator[IndexBatch]:
        """The rest of the current effective epoch as :class:`IndexBatch` lists (replayed batches first)."""
        if getattr(self, "_alone", False):
            self._alone = check_group(type(self).__name__)
        self._passes += 1
        drawn: list[Batch] = []
        self._pass_batches = drawn
        replay, self._replay = self._replay, []
        n = len(self)
        trained = self.steps - len(replay)
        for k in range(n - trained % n):
            glob = replay[k] if k < len(replay) else self._draw()
            drawn.append(glob)
            mine = self._slice(glob)
            yield IndexBatch(mine.indices.tolist(), mine.weights)

    def _replay_after_load(self, batches: list[Batch]) -> None:
        """Global batches drawn before the checkpoint but not trained: the next pass yields them first."""
        self._replay = list(batches)
        self._pass_batches = []
