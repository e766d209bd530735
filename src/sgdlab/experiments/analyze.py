"""``sgdlab analyze {sharpness,hessian,interpolate,noise} RUN_DIR [RUN_DIR]``: diagnostics of trained runs.

Each kind loads the run(s) with :func:`sgdlab.train.load_run` (model from the last checkpoint), evaluates
the data loss (cross-entropy, no weight decay) in eval mode, and writes ``RUN_DIR/analysis/<kind>.json``
(plus PNG figures) into the run directory (for ``interpolate``, into the first of the two):

- ``sharpness``: Keskar sharpness (papers/004 eq. 2) on the training data for each ``eps`` (default
  1e-3 and 5e-4), in the full space and (``subspace_dim``, default 100) in a random subspace.
- ``hessian``: top-``k`` eigenvalues (Lanczos) with residuals, Hutchinson trace with standard error, and
  the SLQ spectral density (``hessian_density.png``).
- ``interpolate``: loss/accuracy on train and test along ``theta(alpha)`` from RUN_DIR_1 (alpha 0) to
  RUN_DIR_2 (alpha 1) for ``path`` linear and sincos (``interpolate_<path>.png``, as papers/004 Fig. 5).
- ``noise``: SGD noise scale ``lr/(1-m) (N/B - 1)`` from the config and the gradient noise scale
  ``B_simple`` (exact per-example and two-batch estimates).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sgdlab import analysis

__all__ = ["main", "KINDS"]

KINDS = ("sharpness", "hessian", "interpolate", "noise")


def _get(cfg: Any, *path: str, default: Any = None) -> Any:
    cur = cfg
    for key in path:
        if cur is None:
            return default
        cur = cur.get(key) if isinstance(cur, dict) else getattr(cur, key, None)
    return default if cur is None else cur


def _subset(x: torch.Tensor, y: torch.Tensor, max_examples: int | None, batch_size: int, seed: int):
    if max_examples is not None and max_examples < x.shape[0]:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_examples]
        idx = idx.sort().values
        x, y = x[idx], y[idx]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor | np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _write(out_dir: Path, name: str, payload: dict, written: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2))
    tmp.replace(path)
    written.append(str(path))


def _world_size(run_dir: Path) -> int:
    """Processes the run trained with (``summary.json``, else the checkpoint; 1 if neither says)."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            return int(json.loads(summary.read_text()).get("world_size", 1))
        except (ValueError, TypeError, AttributeError):
            pass
    from sgdlab.train.engine import CHECKPOINT

    ckpt = run_dir / CHECKPOINT
    if ckpt.is_file():
        from sgdlab.train.guard import load_checkpoint

        state = load_checkpoint(ckpt)  # one-line error for a corrupt or foreign file
        return int(state.get("world_size", 1))
    return 1


def main(
    kind: str,
    run_dirs: str | Path | Sequence[str | Path],
    *,
    loader: Callable | None = None,
    loss_fn: Callable = F.cross_entropy,
    seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 1000,
    eps: Sequence[float] = (1e-3, 5e-4),
    subspace_dim: int | None = 100,
    max_iter: int = 10,
    k: int = 5,
    num_samples: int = 100,
    num_vectors: int = 4,
    num_steps: int = 64,
    alphas: Sequence[float] | None = None,
    paths: Sequence[str] = ("linear", "sincos"),
    noise_batch_sizes: tuple[int, int] = (16, 256),
    num_pairs: int = 32,
    quiet: bool = True,
) -> dict:
    """Run one diagnostic on one run directory (two for ``interpolate``); returns ``{"kind", "results",
    "written"}`` where ``written`` lists the JSON/PNG files created under ``RUN_DIR/analysis/``.

    ``loader(run_dir) -> (config, model, dataset)`` defaults to :func:`sgdlab.train.load_run`; the dataset
    needs ``train_x, train_y, test_x, test_y``. ``max_examples`` subsamples the training data (seeded);
    evaluation uses batches of ``batch_size`` (results do not depend on it).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    dirs = [Path(run_dirs)] if isinstance(run_dirs, str | Path) else [Path(d) for d in run_dirs]
    need = 2 if kind == "interpolate" else 1
    if len(dirs) != need:
        raise ValueError(
            f"analyze {kind} takes {need} run director{'ies' if need == 2 else 'y'}, got {len(dirs)}"
        )
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"run directory {d} does not exist")
    if loader is None:
        from sgdlab.train import load_run as loader  # noqa: N813
    runs = [loader(d) for d in dirs]
    cfg, model, ds = runs[0]
    train = _subset(ds.train_x, ds.train_y, max_examples, batch_size, seed)
    out_dir = dirs[0] / "analysis"
    written: list[str] = []
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "run_dirs": [str(d) for d in dirs],
        "num_examples": sum(int(x.shape[0]) for x, _ in train),
    }

    if kind == "sharpness":
        rows = []
        for e in eps:
            row = {
                "eps": float(e),
                "full_space": analysis.model_sharpness(
                    model, loss_fn, train, eps=e, max_iter=max_iter, seed=seed
                ),
            }
            if subspace_dim:
                row["subspace_dim"] = int(subspace_dim)
                row["random_subspace"] = analysis.model_sharpness(
                    model, loss_fn, train, eps=e, max_iter=max_iter, subspace_dim=subspace_dim, seed=seed
                )
            rows.append(row)
        results["sharpness"] = rows
    elif kind == "hessian":
        eig = analysis.hessian_eigen(model, loss_fn, train, k=k, seed=seed)
        tr = analysis.hessian_trace_estimate(model, loss_fn, train, num_samples=num_samples, seed=seed)
        sd = analysis.spectral_density(
            model, loss_fn, train, num_vectors=num_vectors, num_steps=num_steps, seed=seed
        )
        results.update(eigenvalues=eig.as_dict(), trace=tr.as_dict(), spectral_density=sd.as_dict())
        png = out_dir / "hessian_density.png"
        analysis.plot_spectral_density(sd, path=png)
        written.append(str(png))
    elif kind == "interpolate":
        _, model_b, _ = runs[1]
        test = _subset(ds.test_x, ds.test_y, None, batch_size, seed)
        results["paths"] = {}
        for path in paths:
            tr_res = analysis.interpolate(model, model_b, loss_fn, train, alphas=alphas, path=path)
            te_res = analysis.interpolate(model, model_b, loss_fn, test, alphas=alphas, path=path)
            results["paths"][path] = {"train": tr_res, "test": te_res}
            png = out_dir / f"interpolate_{path}.png"
            analysis.plot_interpolation(
                tr_res,
                te_res,
                path=png,
                title=f"{dirs[0].name} -> {dirs[1].name} ({path})",
                labels=(dirs[0].name, dirs[1].name),
            )
            written.append(str(png))
    elif kind == "noise":
        n = int(ds.train_x.shape[0])
        lr = float(_get(cfg, "optim", "lr", default=0.1))
        momentum = float(_get(cfg, "optim", "momentum", default=0.0))
        per_rank = int(_get(cfg, "sampler", "batch_size", default=128))
        world = _world_size(dirs[0])
        b = per_rank * world  # each SGD step averages the gradient over the global batch
        results["sgd_noise_scale"] = {
            "lr": lr,
            "momentum": momentum,
            "batch_size": b,
            "batch_size_per_rank": per_rank,
            "world_size": world,
            "num_samples": n,
            "g": analysis.sgd_noise_scale(lr, n, min(b, n), momentum),
        }
        exact_batches = _subset(ds.train_x, ds.train_y, max_examples, min(batch_size, 256), seed)
        results["gradient_noise_scale"] = {
            "exact": analysis.gradient_noise_stats(model, loss_fn, exact_batches, method="exact"),
            "two_batch": analysis.gradient_noise_stats(
                model,
                loss_fn,
                train,
                method="two_batch",
                batch_sizes=noise_batch_sizes,
                num_pairs=num_pairs,
                seed=seed,
            ),
        }
    results["seconds"] = time.perf_counter() - t0
    _write(out_dir, kind, results, written)
    if not quiet:
        print(json.dumps({"kind": kind, "written": written}))
    return {"kind": kind, "results": results, "written": written}
