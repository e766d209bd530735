"""How a mini-batch is chosen: the :class:`BatchSource` protocol and its strategies."""

from .base import Batch, BatchSource, SourceContext, create, names, rank_batch_size, rank_slice, register, resolve_rank
from .blind import EpochSampler, ReplacementSampler
from .configurations import accessible_configurations
from .srs import SequencedReplacementSampler
from .importance import ImportanceSampler, model_scorer, upper_bound_scores
from .history import OnlineBatchSelection, PrioritizedSampler
from .position import LoaderPosition
from .loading import IndexBatch, WithWeights
from .selection import InfoBatch, RhoLoss, infobatch_weights, train_irreducible

__all__ = ["Batch", "BatchSource", "SourceContext", "create", "names", "register", "resolve_rank", "rank_slice", "rank_batch_size",
           "EpochSampler", "ReplacementSampler", "SequencedReplacementSampler", "accessible_configurations",
           "ImportanceSampler", "model_scorer", "upper_bound_scores", "OnlineBatchSelection", "PrioritizedSampler",
           "LoaderPosition", "IndexBatch", "WithWeights", "InfoBatch", "RhoLoss", "infobatch_weights",
           "train_irreducible"]
