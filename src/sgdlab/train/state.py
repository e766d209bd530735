"""What a checkpoint holds besides the model and optimizer: every random stream, written atomically.

A resumed run ends bit-identically where an uninterrupted one does (on CPU) because the checkpoint
holds the global torch, numpy and Python RNGs, the augmentation generator and (under DDP) every rank's
streams, and because files are replaced atomically (write, fsync, rename), so a kill never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT", "rng_state", "set_rng_state", "rank_seed", "atomic_torch_save", "atomic_write_text"]

#: A run directory's checkpoint, relative to the run directory.
CHECKPOINT = "checkpoints/last.pt"


def rng_state(aug_gen: torch.Generator) -> dict:
    """The global torch, numpy and Python RNG states, ``aug_gen``'s, and CUDA's when in use (tensors and
    plain containers only, so the checkpoint loads with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
        "augment": aug_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    """Restore the streams :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s own random stream, derived from the run's seed (stable across machines)."""
    return int(np.random.SeedSequence([seed & (2**63 - 1), rank]).generate_state(1, np.uint64)[0] >> 1)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, rename over ``path``: the old file stays whole until then."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full disk leaves the previous checkpoint as it was, and no partial file
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
