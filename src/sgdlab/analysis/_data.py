"""Shared evaluation discipline for :mod:`sgdlab.analysis`.

Every diagnostic takes ``data`` as an ``(x, y)`` pair of tensors or an iterable of such batches, and
``loss_fn(logits, y)`` returning the *mean* loss of a batch (like ``torch.nn.functional.cross_entropy``).
Quantities are averages over examples: a batch of ``n_b`` examples out of ``N`` is weighted by
``n_b / N``, so the result does not depend on how the data are batched. The model is evaluated in eval
mode (BatchNorm uses its running statistics, dropout is off) and its previous mode is restored.

The curvature tools and :func:`sgdlab.analysis.model_sharpness` also take Hugging Face style batches: a
dict of model inputs with a ``"labels"`` entry (or an ``(inputs_dict, labels)`` pair), or an iterable of
them. The model is then called as ``model(**inputs)`` (``labels`` is not passed, so the model does not
compute its own loss), an output with a ``.logits`` attribute (a ``transformers`` ``ModelOutput``) is
unwrapped, and ``loss_fn(logits, labels)`` gives the batch loss; a batch counts ``labels.shape[0]``
examples (sequences).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

Batches = list[tuple[Any, torch.Tensor]]  # x: a tensor, or a dict of model inputs (``dicts=True``)


def _is_pair(data: Any, dicts: bool) -> bool:
    return (isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[1], torch.Tensor)
            and (isinstance(data[0], torch.Tensor) or (dicts and isinstance(data[0], Mapping))))


def _dict_batch(item: Mapping, name: str) -> tuple[dict, Any]:
    if "labels" not in item:
        keys = ", ".join(repr(k) for k in list(item)[:6])
        raise ValueError(f"{name}: a dict batch needs a 'labels' entry (the targets of loss_fn), "
                         f"got keys {keys}")
    return {k: v for k, v in item.items() if k != "labels"}, item["labels"]


def as_batches(
    data: Any, *, device: torch.device | None = None, name: str = "data", dicts: bool = False
) -> Batches:
    """Normalise ``data`` to a non-empty list of ``(x, y)`` batches (moved to ``device`` if given).

    With ``dicts=True`` a batch may also be a dict of model inputs with a ``"labels"`` entry (it becomes
    ``(inputs, labels)``) or an ``(inputs_dict, labels)`` pair; ``data`` may be one such dict. Raises
    ``ValueError`` naming ``name`` if the data are empty or not batches.
    """
    want = "an (x, y) pair of tensors" + (" or a dict batch with 'labels'" if dicts else "")
    if data is None:
        raise ValueError(f"{name}: expected {want} or an iterable of batches, got None")
    if _is_pair(data, dicts) or (dicts and isinstance(data, Mapping)):
        pairs: Iterable = [data]
    else:
        pairs = data
    out: Batches = []
    try:
        iterator = iter(pairs)
    except TypeError as exc:
        raise ValueError(f"{name}: expected {want} or an iterable of batches") from exc
    for item in iterator:
        if dicts and isinstance(item, Mapping):
            item = _dict_batch(item, name)
        if not (isinstance(item, tuple | list) and len(item) >= 2):
            raise ValueError(f"{name}: every batch must be {want}, got {type(item).__name__}")
        x, y = item[0], item[1]
        if not _is_pair((x, y), dicts):
            raise ValueError(f"{name}: every batch must be {want}")
        n = batch_size(x) if isinstance(x, Mapping) else (x.shape[0] if x.ndim else -1)
        if y.ndim == 0 or n != y.shape[0]:
            got = {k: tuple(v.shape) for k, v in x.items() if isinstance(v, torch.Tensor)} if isinstance(
                x, Mapping) else tuple(x.shape)
            raise ValueError(
                f"{name}: x and y must have the same number of examples (got {got} and {tuple(y.shape)})"
            )
        if y.shape[0] == 0:
            continue
        if isinstance(x, Mapping):
            x = dict(x)
        if device is not None:
            x, y = to_device(x, device), y.to(device)
        out.append((x, y))
    if not out:
        raise ValueError(f"{name} is empty: no examples to evaluate on")
    return out


def batch_size(x: Any) -> int:
    """Examples in a batch's inputs: ``x.shape[0]``, or for a dict that of its first batched tensor."""
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
        return -1
    return int(x.shape[0])


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor or a dict of inputs) with every tensor moved to ``device``."""
    if isinstance(x, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    return x.to(device)


def take(x: Any, idx: torch.Tensor, n: int) -> Any:
    """Rows ``idx`` of a batch's inputs (for a dict: of every tensor whose leading dimension is ``n``)."""
    if isinstance(x, Mapping):
        return {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v)
                for k, v in x.items()}
    return x[idx]


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor as is, or the ``.logits`` of a ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "model output: expected a tensor of logits or an output with a .logits tensor, "
            f"got {type(out).__name__}"
        )
    return logits


def forward(model: Any, x: Any) -> torch.Tensor:
    """The logits of ``model`` on a batch's inputs: ``model(x)``, or ``model(**x)`` for a dict."""
    return logits_of(model(**x) if isinstance(x, Mapping) else model(x))


def num_examples(batches: Batches) -> int:
    """Total number of examples in ``batches``."""
    return sum(int(y.shape[0]) for _, y in batches)


def unwrap_model(model: Any) -> Any:
    """The eager module under ``torch.compile`` (``_orig_mod``) and data-parallel wrappers (``module``).

    A compiled module's parameters are those of the original one, so every diagnostic evaluates the
    original (eager) module: compiled graphs do not support the double backward that curvature needs,
    and the parameter names stay free of the ``_orig_mod.`` prefix.
    """
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            break
    return model


def trainable_parameters(model: nn.Module, *, name: str = "model") -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs with ``requires_grad``; ``ValueError`` if there are none."""
    params = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name} has no trainable parameters")
    return params


def select_parameters(model: nn.Module, block: Any = None) -> list[tuple[str, nn.Parameter]]:
    """The trainable ``(name, parameter)`` pairs of ``block``.

    ``block`` is ``None`` (all trainable parameters), a module prefix or parameter name (``"layer1"``
    selects ``layer1.*``), a sequence of such prefixes, or a callable ``filter(name, parameter) -> bool``.
    ``ValueError`` naming ``block`` if nothing is selected.
    """
    named = trainable_parameters(model)
    if block is None:
        return named
    if callable(block):
        chosen = [(n, p) for n, p in named if block(n, p)]
        what = getattr(block, "__name__", "the parameter filter")
    else:
        prefixes = [block] if isinstance(block, str) else list(block)
        if not prefixes or not all(isinstance(b, str) for b in prefixes):
            raise ValueError(f"block must be a module prefix, a list of prefixes or a filter, got {block!r}")
        prefixes = [b.removeprefix("_orig_mod.").rstrip(".") for b in prefixes]
        chosen = [(n, p) for n, p in named if any(b == "" or n == b or n.startswith(b + ".") for b in prefixes)]
        what = ", ".join(repr(b) for b in prefixes)
    if not chosen:
        sample = ", ".join(n for n, _ in named[:6])
        raise ValueError(f"block {what} selects no trainable parameter (names look like: {sample})")
    return chosen


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter or buffer (CPU for an empty module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the duration of the block and restore every submodule's mode."""
    saved = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for modes in saved:
            for m, training in modes:
                m.training = training


def _set_sdpa_math_only() -> Any:
    """Restrict ``scaled_dot_product_attention`` to its math backend; returns a function restoring it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        ctx = torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    else:
        ctx = sdpa_kernel(SDPBackend.MATH)
    ctx.__enter__()
    return lambda: ctx.__exit__(None, None, None)


_ATTENTION_LOCK = threading.Lock()
_attention_users = 0  # blocks inside differentiable_attention, in any thread
_attention_restore: Any = None


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention that supports double backward, for the duration of the block (process-wide flags).

    ``scaled_dot_product_attention`` is restricted to its math backend: the fused kernels (flash on CPU
    and CUDA, memory-efficient and cuDNN on CUDA) have no derivative of their backward (PyTorch issue
    #116350), while the math backend is made of ordinary differentiable operations and computes the same
    function. The fast path of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (the fused
    ``torch._native_multi_head_attention`` / ``torch._transformer_encoder_layer_fwd`` kernels that eval mode
    may take) is switched off through ``torch.backends.mha``, so every evaluation runs the same math.
    The flags are set when the first block opens and restored when the last one closes, counted across
    threads (a background monitor's check may overlap a foreground diagnostic).
    """
    global _attention_users, _attention_restore
    with _ATTENTION_LOCK:
        if _attention_users == 0:
            mha = getattr(torch.backends, "mha", None)
            fastpath = mha.get_fastpath_enabled() if mha is not None else None
            restore_sdpa = _set_sdpa_math_only()
            if mha is not None:
                mha.set_fastpath_enabled(False)

            def restore() -> None:
                if mha is not None:
                    mha.set_fastpath_enabled(fastpath)
                restore_sdpa()

            _attention_restore = restore
        _attention_users += 1
    try:
        yield
    finally:
        with _ATTENTION_LOCK:
            _attention_users -= 1
            if _attention_users == 0:
                _attention_restore()
                _attention_restore = None


@contextlib.contextmanager
def analysis_mode(*models: nn.Module) -> Iterator[None]:
    """:func:`eval_mode` and :func:`differentiable_attention` together: how every diagnostic runs a model."""
    with eval_mode(*models), differentiable_attention():
        yield


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (views of ``vector``)."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[i : i + n].view_as(t))
        i += n
    if i != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the parameters have {i}")
    return out


def check_loss(loss: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` must return a scalar (the mean loss of the batch)."""
    if loss.ndim != 0:
        raise ValueError(
            f"loss_fn must return the mean loss of a batch (a scalar), got shape {tuple(loss.shape)}"
        )
    return loss
