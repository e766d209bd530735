"""Uniform draws from a private ``torch.Generator`` that ``torch.compile(fullgraph=True)`` can capture.

Dynamo cannot put a ``torch.Generator`` argument into a graph, so ``torch.rand(..., generator=g)`` breaks the
graph (and fails under ``fullgraph=True``); ``torch.compiler.disable`` around the draw fails the same way.
While compiling, :func:`uniform` therefore draws through a small custom operator that receives the
generator's registry key (a plain int, a constant of the graph) and calls ``torch.rand`` with that generator
when the compiled graph runs, in graph order.  In eager mode it is ``torch.rand`` itself, so eager and
compiled runs draw the same numbers from the same generator state.
"""

from __future__ import annotations

import ctypes

import torch

__all__ = ["uniform"]

_GENERATORS: dict[int, torch.Generator] = {}


_HAVE_CUSTOM_OP = hasattr(torch.library, "custom_op")  # torch >= 2.4; older versions break the graph instead

if _HAVE_CUSTOM_OP:
    # Tagged as a seeded random op: graph passes then neither merge two identical draws (CSE) nor recompute
    # one in the backward pass, either of which would change the numbers or advance the generator twice.
    @torch.library.custom_op("sgdlab::uniform", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
    def _uniform_op(like: torch.Tensor, key: int, shape: list[int], double: bool) -> torch.Tensor:
        generator = _GENERATORS.get(key)
        if generator is None:
            # First run of a freshly traced graph: the registration below is a traced side effect that
            # dynamo replays only after the graph has run.  ``key`` is the generator's id(), which dynamo
            # specialised on and guards (ID_MATCH), so the graph only runs while that very generator object
            # is alive and passed in.
            generator = ctypes.cast(key, ctypes.py_object).value
            if not isinstance(generator, torch.Generator):  # pragma: no cover - defensive
                raise RuntimeError("sgdlab.regularize: lost the generator of a compiled random draw")
        return torch.rand(shape, generator=generator, device=like.device,
                          dtype=torch.float64 if double else torch.float32)

    @_uniform_op.register_fake
    def _(like, key, shape, double):
        return like.new_empty(shape, dtype=torch.float64 if double else torch.float32)


def _register(generator: torch.Generator) -> int:
    key = id(generator)
    _GENERATORS[key] = generator
    return key


def uniform(shape, generator: torch.Generator | None, *, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``torch.rand(shape, generator=generator, device=like.device, dtype=dtype)``, capturable by torch.compile.

    ``like`` only gives the device (and orders the draw after the op that computed it in a compiled graph).
    """
    if generator is None or not _HAVE_CUSTOM_OP or not torch.compiler.is_compiling():
        return torch.rand(shape, generator=generator, device=like.device, dtype=dtype)
    return _uniform_op(like.detach(), _register(generator), [int(s) for s in shape], dtype == torch.float64)
