"""How a mini-batch is chosen: the :class:`BatchSource` protocol and its strategies."""

from .base import Batch, BatchSource, SourceContext, create, names, rank_slice, register, resolve_rank

__all__ = ["Batch", "BatchSource", "SourceContext", "create", "names", "register", "resolve_rank", "rank_slice"]
