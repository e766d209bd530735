"""Forward-equivalent compute: a machine-independent budget for comparing data-selection methods.

Kaddour et al. ("No train no gain", NeurIPS 2023) compare efficient-training methods at equal compute
with the baseline's learning rate fully decayed within that compute. Here compute is counted in
*forward-equivalents* (METHODS.md, section 6): a forward pass of ``b`` examples costs ``b`` units and a
backward pass ``r * b``, with ``r`` the measured backward/forward time ratio of the model
(:func:`measure_cost_ratio`, measured once per run and stored in its checkpoint so a resume counts the
same). Every forward used to *select* data counts too (importance sampling's presample, RHO-LOSS's
presample and its holdout model, selective backprop's scoring forward); evaluation for reporting does not.

The counter holds only the training forward/backward units; selection forwards are read from the
components' own cumulative ``selection_forwards`` (restored with their state), one-off costs from
``setup_forwards`` (e.g. training RHO-LOSS's irreducible-loss model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

__all__ = ["ForwardEquivalents", "measure_cost_ratio", "selection_forwards"]


def selection_forwards(component) -> float:
    """Cumulative examples ``component`` forwarded to choose data (0 for blind ones).

    Reads ``component.selection_forwards``; an :class:`~sgdlab.sampling.ImportanceSampler` counts its
    importance-sampled steps times the (global) presample.
    """
    value = getattr(component, "selection_forwards", None)
    if value is not None:
        return float(value)
    if hasattr(component, "is_steps") and hasattr(component, "presample"):
        return float(component.is_steps * component.presample)
    return 0.0


class ForwardEquivalents:
    """Counts the forward-equivalents of a run (module docstring): ``used = setup + training + selection``.

    ``training`` grows by ``world_size * (forwarded + r * backpropagated)`` per :meth:`add_step` (per-rank
    counts of examples). ``sources`` count global selection forwards; ``transforms`` count their rank's, so
    theirs are multiplied by ``world_size``.
    """

    def __init__(self, cost_ratio: float, *, world_size: int = 1, setup: float = 0.0):
        self.cost_ratio = float(cost_ratio)
        if not (self.cost_ratio >= 0 and self.cost_ratio < float("inf")):
            raise ValueError(f"cost_ratio must be a non-negative number, got {cost_ratio!r}")
        self.world_size = int(world_size)
        self.setup = float(setup)
        self.training = 0.0

    def add_step(self, forwarded: int, backpropagated: int) -> None:
        """Count one training step: ``forwarded`` examples through the forward, ``backpropagated`` backward."""
        self.training += self.world_size * (forwarded + self.cost_ratio * backpropagated)

    def used(self, sources: Iterable = (), transforms: Iterable = ()) -> float:
        """Forward-equivalents spent so far."""
        sel = sum(selection_forwards(s) for s in sources)
        sel += self.world_size * sum(selection_forwards(t) for t in transforms)
        return self.setup + self.training + sel

    def state_dict(self) -> dict:
        return {"cost_ratio": self.cost_ratio, "setup": self.setup, "training": self.training}

    def load_state_dict(self, state: dict) -> None:
        self.cost_ratio = float(state["cost_ratio"])
        self.setup = float(state["setup"])
        self.training = float(state["training"])


def measure_cost_ratio(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, repeats: int = 7,
                       warmup: int = 2) -> float:
    """``r = (t_fwd+bwd - t_fwd) / t_fwd``: the backward/forward time ratio of ``model`` on the batch ``(x, y)``.

    Medians over ``repeats`` timed repetitions after ``warmup``; the forward is timed with gradients on
    (what training runs). The model's buffers (batch-norm statistics), gradients and every random stream
    are restored afterwards, so measuring changes nothing about the run that follows.
    """
    import statistics

    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fwd, both = [], []
    devices = [x.device.index or 0] if x.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            for i in range(warmup + repeats):
                sync()
                t0 = time.perf_counter()
                loss = loss_fn(model(x).float(), y).mean()
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
                if i >= warmup:
                    fwd.append(t1 - t0)
                    both.append(t2 - t0)
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
        for n, p in model.named_parameters():
            p.grad = grads[n]
    f, fb = statistics.median(fwd), statistics.median(both)
    return max(fb - f, 0.0) / f if f > 0 else 2.0

