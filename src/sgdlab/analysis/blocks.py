"""Per-block curvature: trace and top eigenvalues of the diagonal blocks of the Hessian (or GGN), one call.

The Hessian restricted to a block ``b`` of parameters is the diagonal block ``H_bb``; its trace is the
sum of the corresponding diagonal entries of ``H``, so the traces of a partition of the parameters sum
to ``tr(H)``, while the top eigenvalue of a block is at most that of the full matrix (Cauchy
interlacing) and shows where the sharp directions live. Yao et al. ("PyHessian", 2020) report the
trace layer by layer in the same way.

Blocks are ``"layers"`` (every module that owns trainable parameters directly), ``"stages"`` (the
top-level children of the model), or an explicit mapping ``{label: block}`` / list of prefixes, where a
block is anything :class:`sgdlab.analysis.HessianOperator` accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ._data import trainable_parameters, unwrap_model
from .estimators import EigenResult, TraceEstimate, estimate_trace, top_eigenvalues
from .operators import curvature_operator

__all__ = ["BlockRow", "BlockTable", "block_partition", "curvature_blocks"]


def block_partition(model: nn.Module, by: str = "layers") -> dict[str, list[str]]:
    """A partition of the trainable parameters into labelled blocks (lists of parameter names).

    ``by="layers"``: one block per module owning trainable parameters directly (label: the module's
    name; ``"(root)"`` for the model's own parameters). ``by="stages"``: one block per top-level child.
    """
    model = unwrap_model(model)
    trainable = {n for n, _ in trainable_parameters(model)}
    out: dict[str, list[str]] = {}
    if by == "layers":
        for mname, mod in model.named_modules():
            names = [f"{mname}.{p}" if mname else p for p, q in mod.named_parameters(recurse=False)]
            names = [n for n in names if n in trainable]
            if names:
                out[mname or "(root)"] = names
    elif by == "stages":
        for n, _ in model.named_parameters():
            if n in trainable:
                label = n.split(".", 1)[0] if "." in n else "(root)"
                out.setdefault(label, []).append(n)
    else:
        raise ValueError(f"blocks must be 'layers', 'stages', a list of prefixes or a mapping, got {by!r}")
    return out


def _module_class(model: nn.Module, label: str, block: Any) -> str:
    """The class name of the module at path ``label`` (or at the prefix ``block``), ``""`` if there is none."""
    model = unwrap_model(model)
    for path in (label, block):
        if isinstance(path, str):
            if path == "(root)":
                return type(model).__name__
            try:
                return type(model.get_submodule(path)).__name__
            except AttributeError:
                pass
    return ""


@dataclass
class BlockRow:
    """One block: its label (the module path for ``"layers"``/``"stages"``), parameter names and count,
    trace estimate and top eigenvalues, and ``module``, the class of the module at that path (``""`` when
    the label is not a module path)."""

    label: str
    names: list[str] = field(repr=False)
    num_params: int
    trace: TraceEstimate
    top: EigenResult
    module: str = ""

    @property
    def title(self) -> str:
        """``"path (Class)"``, e.g. ``"features.0 (Conv2d)"``: the label with the module's class."""
        return f"{self.label} ({self.module})" if self.module else self.label

    def as_dict(self) -> dict:
        return {"block": self.label, "module": self.module, "num_params": self.num_params,
                "trace": self.trace.as_dict(), "top_eigenvalues": self.top.as_dict(), "names": self.names}


@dataclass
class BlockTable:
    """Per-block rows plus the same estimates for all parameters together (``total``)."""

    rows: list[BlockRow]
    total: BlockRow | None
    curvature: str

    @property
    def sum_of_traces(self) -> float:
        return float(sum(r.trace.value for r in self.rows))

    def as_dict(self) -> dict:
        return {"curvature": self.curvature, "blocks": [r.as_dict() for r in self.rows],
                "total": self.total.as_dict() if self.total is not None else None,
                "sum_of_block_traces": self.sum_of_traces}

    def format(self) -> str:
        """A plain-text table: block, parameters, trace +- stderr, top eigenvalue (residual)."""
        width = max([24, *(len(r.title) for r in self.rows)])
        lines = [f"{'block':{width}s} {'params':>8s} {'trace':>12s} {'+-':>10s} {'top eig':>12s} {'residual':>9s}"]
        for r in [*self.rows, *([self.total] if self.total is not None else [])]:
            lines.append(f"{r.title:{width}s} {r.num_params:8d} {r.trace.value:12.5g} {r.trace.stderr:10.3g} "
                         f"{float(r.top.values[0]):12.5g} {float(r.top.residuals[0]):9.2g}")
        return "\n".join(lines)


def curvature_blocks(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    *,
    blocks: str | Mapping[str, Any] | list[str] = "layers",
    curvature: str = "hessian",
    k: int = 1,
    trace_method: str = "hutch++",
    num_matvecs: int = 30,
    max_iter: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    data_resamples: int = 0,
    include_total: bool = True,
    cache_graph: bool | None = None,
) -> BlockTable:
    """Trace and top-``k`` eigenvalues of each diagonal block of the data-loss Hessian (or GGN).

    ``blocks``: ``"layers"``, ``"stages"`` (see :func:`block_partition`), a list of module prefixes, or a
    mapping ``label -> block``. For each block: :func:`sgdlab.analysis.estimate_trace` with
    ``trace_method`` and ``num_matvecs`` products, and :func:`sgdlab.analysis.top_eigenvalues` by Lanczos
    (``max_iter``, ``tol``); with ``include_total`` the same for all parameters. Every row carries the
    standard errors of the estimators (and, with ``data_resamples``, over bootstrap resamples of the data).
    """
    if isinstance(blocks, str):
        spec: dict[str, Any] = dict(block_partition(model, blocks))
    elif isinstance(blocks, Mapping):
        spec = dict(blocks)
    else:
        spec = {str(b): b for b in blocks}
    if not spec:
        raise ValueError("blocks is empty")
    parts = list(spec.items()) + ([("(all)", None)] if include_total else [])
    rows = []
    for label, block in parts:
        op = curvature_operator(model, loss_fn, data, curvature=curvature, block=block, cache_graph=cache_graph)
        kk = min(int(k), op.dim)
        # a block with no more parameters than the budget has its trace computed exactly, cheaper
        method = "exact" if op.dim <= num_matvecs else trace_method
        tr = estimate_trace(op, method=method, num_matvecs=num_matvecs, seed=seed, data_resamples=data_resamples)
        top = top_eigenvalues(op, k=kk, max_iter=max_iter, tol=tol, seed=seed, data_resamples=data_resamples)
        rows.append(BlockRow(str(label), list(op.names), op.dim, tr, top, _module_class(model, label, block)))
    total = rows.pop() if include_total else None
    return BlockTable(rows, total, curvature)
