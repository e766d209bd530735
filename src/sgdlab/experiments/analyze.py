"""``sgdlab analyze {sharpness,hessian,interpolate,noise} RUN_DIR [RUN_DIR]``: diagnostics of trained runs.

Each kind loads the run(s) with :func:`sgdlab.train.load_run` (model from the last checkpoint), evaluates
the data loss (cross-entropy, no weight decay) in eval mode, and writes ``RUN_DIR/analysis/<kind>.json``
(plus PNG figures) into the run directory (for ``interpolate``, into the first of the two):

- ``sharpness``: Keskar sharpness (papers/004 eq. 2) on the training data for each ``eps`` (default
  1e-3 and 5e-4), in the full space and (``subspace_dim``, default 100) in a random subspace.
- ``hessian``: top-``k`` eigenvalues (Lanczos) with residuals, the trace (Hutch++ by default) with its
  standard error and 95% interval, the SLQ spectral density (``hessian_density.png``); ``blocks`` adds
  the per-layer (or per-stage) table of traces and top eigenvalues; ``curvature="ggn"`` analyses the
  generalised Gauss-Newton matrix instead; ``data_resamples`` adds bootstrap error bars over the data.
- ``interpolate``: loss/accuracy on train and test along ``theta(alpha)`` from RUN_DIR_1 (alpha 0) to
  RUN_DIR_2 (alpha 1) for ``path`` linear and sincos (``interpolate_<path>.png``, as papers/004 Fig. 5).
- ``noise``: SGD noise scale ``lr/(1-m) (N/B - 1)`` from the config and the gradient noise scale
  ``B_simple``: exact per-example where affordable, and the two-batch estimate from ``num_pairs`` pairs
  with a bootstrap interval and a reliability flag.

:func:`format_results` renders the numbers as the table that ``sgdlab analyze`` prints.
"""

from __future__ import annotations

import contextlib
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
from sgdlab.errors import ConfigError
from sgdlab.files import write_text

__all__ = ["main", "KINDS", "format_results"]

KINDS = ("sharpness", "hessian", "interpolate", "noise")
SPLITS = ("train", "test")


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
    write_text(path, json.dumps(_jsonable(payload), indent=2))
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


def _check_finite_loss(kind: str, run_dir: Path, model, loss_fn, batches) -> None:
    """ConfigError if the model's loss on the first batch is not finite (diverged or damaged weights): every
    analysis differentiates that loss, and NaN would surface as a solver's message about its own input."""
    x, y = batches[0]
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    if not math.isfinite(loss):
        raise ConfigError(f"analyze {kind}: the loss of {run_dir}'s checkpoint is {loss} on the first {x.shape[0]} "
                          "examples; its weights are not finite or have diverged, so there is nothing to analyse")


def _check_options(kind: str, *, split: str, max_examples, k: int, eps, num_samples: int, trace_method: str,
                   blocks, curvature: str, data_resamples: int, num_pairs: int, noise_batch_sizes,
                   batch_size: int = 1000, seed: int = 0, threads: int | None = None) -> None:
    """One-line ``ConfigError`` naming the option for every bad value (the CLI exits 2 on it)."""

    def bad(opt: str, why: str):
        raise ConfigError(f"analyze {kind}: {opt} {why}")

    if split not in SPLITS:
        bad("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    if max_examples is not None and (int(max_examples) != max_examples or max_examples < 1):
        bad("examples", f"must be a positive integer, got {max_examples!r}")
    if int(k) != k or k < 1:
        bad("k", f"must be a positive integer, got {k!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        bad("batch-size", f"must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**63:
        bad("seed", f"must be an integer in [0, 2^63), got {seed!r}")
    if not eps or any(not (float(e) > 0 and math.isfinite(float(e))) for e in eps):
        bad("eps", f"must be positive finite numbers, got {list(eps)!r}")
    if trace_method not in analysis.estimators.TRACE_METHODS:
        bad("trace-method", f"must be one of {', '.join(analysis.estimators.TRACE_METHODS)}, got {trace_method!r}")
    need = 4 if trace_method == "hutch++" else 2
    if int(num_samples) != num_samples or num_samples < need:
        bad("samples", f"must be an integer >= {need} for {trace_method}, got {num_samples!r}")
    if blocks not in (None, "layers", "stages"):
        bad("blocks", f"must be 'layers' or 'stages', got {blocks!r}")
    if curvature not in ("hessian", "ggn"):
        bad("curvature", f"must be 'hessian' or 'ggn', got {curvature!r}")
    if int(data_resamples) != data_resamples or data_resamples < 0 or data_resamples == 1:
        bad("resamples", f"must be 0 or an integer >= 2, got {data_resamples!r}")
    if int(num_pairs) != num_pairs or num_pairs < 2:
        bad("pairs", f"must be an integer >= 2, got {num_pairs!r}")
    if threads is not None:
        from sgdlab.train.config import MAX_THREADS

        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            bad("threads", f"must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")
    b_small, b_big = noise_batch_sizes
    if not 1 <= b_small < b_big:
        bad("noise-batch-sizes", f"must be B_SMALL,B_BIG with 1 <= B_SMALL < B_BIG, got {b_small},{b_big}")


def main(
    kind: str,
    run_dirs: str | Path | Sequence[str | Path],
    *,
    loader: Callable | None = None,
    loss_fn: Callable = F.cross_entropy,
    seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 1000,
    split: str = "train",
    eps: Sequence[float] = (1e-3, 5e-4),
    subspace_dim: int | None = 100,
    max_iter: int = 10,
    k: int = 5,
    num_samples: int = 99,
    trace_method: str = "hutch++",
    blocks: str | None = None,
    curvature: str = "hessian",
    data_resamples: int = 0,
    num_vectors: int = 4,
    num_steps: int = 64,
    alphas: Sequence[float] | None = None,
    paths: Sequence[str] = ("linear", "sincos"),
    noise_batch_sizes: tuple[int, int] = (16, 256),
    num_pairs: int = 200,
    quiet: bool = True,
    threads: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Run one diagnostic on one run directory (two for ``interpolate``); returns ``{"kind", "results",
    "written"}`` where ``written`` lists the JSON/PNG files created under ``RUN_DIR/analysis/``.

    ``loader(run_dir) -> (config, model, dataset)`` defaults to :func:`sgdlab.train.load_run`; the dataset
    needs ``train_x, train_y, test_x, test_y``. ``split`` picks the data the diagnostic uses (``train`` or
    ``test``), ``max_examples`` subsamples them (seeded); evaluation uses batches of ``batch_size``
    (results do not depend on it). ``hessian``: ``k`` top eigenvalues, the trace by ``trace_method`` with
    ``num_samples`` products, ``blocks`` (``"layers"``/``"stages"``) adds the per-block table,
    ``curvature`` ``"hessian"`` or ``"ggn"``, ``data_resamples`` bootstrap error bars over the data.
    ``noise``: the exact per-example noise scale where affordable and the two-batch estimate from
    ``num_pairs`` pairs with a bootstrap interval. Bad options raise a one-line ``ConfigError``.

    ``threads`` (torch CPU threads) defaults to the run's own ``threads`` setting, applied as
    :func:`sgdlab.train.run` applies it (``auto``: one thread below 2 million parameters, see
    :func:`sgdlab.train.build.auto_threads`); the previous thread count is restored at the end.
    ``progress(done, total, stage)`` is called before each stage of the computation.
    """
    if kind not in KINDS:
        raise ConfigError(f"analyze: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _check_options(kind, split=split, max_examples=max_examples, k=k, eps=eps, num_samples=num_samples,
                   trace_method=trace_method, blocks=blocks, curvature=curvature, data_resamples=data_resamples,
                   num_pairs=num_pairs, noise_batch_sizes=noise_batch_sizes, batch_size=batch_size, seed=seed,
                   threads=threads)
    dirs = [Path(run_dirs)] if isinstance(run_dirs, str | Path) else [Path(d) for d in run_dirs]
    need = 2 if kind == "interpolate" else 1
    if len(dirs) != need:
        raise ConfigError(
            f"analyze {kind} takes {need} run director{'ies' if need == 2 else 'y'}, got {len(dirs)}"
        )
    for d in dirs:
        if not d.is_dir():
            what = "is a file, not a run directory" if d.exists() else "does not exist"
            raise ConfigError(f"analyze {kind}: run directory {d} {what}")
    if loader is None:
        from sgdlab.train import load_run as loader  # noqa: N813
        from sgdlab.train.engine import CHECKPOINT

        for d in dirs:
            for f in ("config.yaml", CHECKPOINT):
                if not (d / f).is_file():
                    raise ConfigError(f"analyze {kind}: {d} is not a finished run directory (no {f})")
    runs = [loader(d) for d in dirs]
    cfg, model, _ = runs[0]
    previous_threads = torch.get_num_threads()
    count = _thread_count(threads, cfg, model)
    torch.set_num_threads(count)
    try:
        with _blas_threads(count):
            return _analyse(kind, dirs, runs, progress=progress, loss_fn=loss_fn, seed=seed,
                            max_examples=max_examples, batch_size=batch_size, split=split, eps=eps,
                            subspace_dim=subspace_dim, max_iter=max_iter, k=k, num_samples=num_samples,
                            trace_method=trace_method, blocks=blocks, curvature=curvature,
                            data_resamples=data_resamples, num_vectors=num_vectors, num_steps=num_steps,
                            alphas=alphas, paths=paths, noise_batch_sizes=noise_batch_sizes, num_pairs=num_pairs,
                            quiet=quiet)
    finally:
        torch.set_num_threads(previous_threads)


def _blas_threads(count: int):
    """numpy's and scipy's BLAS thread pools limited to ``count`` too, as ``OMP_NUM_THREADS`` would: the small
    dense problems of Lanczos and SLQ gain nothing from threads, and OpenBLAS threads spin while they wait for
    a busy core. A no-op where threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=count, user_api="blas")


def _thread_count(threads: int | None, cfg: Any, model: torch.nn.Module) -> int:
    """``threads``, else the run's ``threads`` setting with ``auto`` resolved as the engine resolves it."""
    from sgdlab.train.build import auto_threads

    wanted = threads if threads is not None else _get(cfg, "threads", default="auto")
    if wanted == "auto" or isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        return auto_threads(sum(p.numel() for p in model.parameters()))
    return wanted


def _analyse(kind: str, dirs: list[Path], runs: list, *, progress, loss_fn, seed, max_examples, batch_size, split,
             eps, subspace_dim, max_iter, k, num_samples, trace_method, blocks, curvature, data_resamples,
             num_vectors, num_steps, alphas, paths, noise_batch_sizes, num_pairs, quiet) -> dict:
    """The computation of :func:`main` once its options are checked and the runs loaded."""
    cfg, model, ds = runs[0]
    stages = {"sharpness": len(eps) * (2 if subspace_dim else 1), "hessian": 3 + bool(blocks),
              "interpolate": len(paths), "noise": 2}[kind]
    done = 0

    def stage(name: str) -> None:
        nonlocal done
        if progress is not None:
            progress(done, stages, name)
        done += 1

    xs, ys = (ds.train_x, ds.train_y) if split == "train" else (ds.test_x, ds.test_y)
    train = _subset(xs, ys, max_examples, batch_size, seed)
    for d, (_, m, _) in zip(dirs, runs):
        _check_finite_loss(kind, d, m, loss_fn, train)
    out_dir = dirs[0] / "analysis"
    written: list[str] = []
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "run_dirs": [str(d) for d in dirs],
        "split": split,
        "num_examples": sum(int(x.shape[0]) for x, _ in train),
    }

    if kind == "sharpness":
        rows = []
        for e in eps:
            stage(f"sharpness eps={e:g}, full space")
            row = {
                "eps": float(e),
                "full_space": analysis.model_sharpness(
                    model, loss_fn, train, eps=e, max_iter=max_iter, seed=seed
                ),
            }
            if subspace_dim:
                stage(f"sharpness eps={e:g}, {subspace_dim}-dim random subspace")
                row["subspace_dim"] = int(subspace_dim)
                row["random_subspace"] = analysis.model_sharpness(
                    model, loss_fn, train, eps=e, max_iter=max_iter, subspace_dim=subspace_dim, seed=seed
                )
            rows.append(row)
        results["sharpness"] = rows
    elif kind == "hessian":
        stage(f"top {k} eigenvalues (Lanczos)")
        eig = analysis.hessian_eigen(model, loss_fn, train, k=k, seed=seed, curvature=curvature,
                                     data_resamples=data_resamples)
        stage(f"trace ({trace_method}, {num_samples} products)")
        tr = analysis.hessian_trace_estimate(model, loss_fn, train, num_samples=num_samples, seed=seed,
                                             method=trace_method, curvature=curvature,
                                             data_resamples=data_resamples)
        stage(f"spectral density (SLQ, {num_vectors} vectors)")
        sd = analysis.spectral_density(
            model, loss_fn, train, num_vectors=num_vectors, num_steps=num_steps, seed=seed, curvature=curvature
        )
        trace_row = tr.as_dict()
        trace_row["interval95"] = list(tr.interval(0.95))
        results.update(curvature=curvature, eigenvalues=eig.as_dict(), trace=trace_row,
                       spectral_density=sd.as_dict())
        if blocks:
            stage(f"per-block table ({blocks})")
            table = analysis.curvature_blocks(
                model, loss_fn, train, blocks=blocks, curvature=curvature, k=1, trace_method=trace_method,
                num_matvecs=num_samples, seed=seed, data_resamples=data_resamples, include_total=False,
            )
            results["blocks"] = table.as_dict()
        png = out_dir / "hessian_density.png"
        analysis.plot_spectral_density(sd, path=png)
        written.append(str(png))
    elif kind == "interpolate":
        _, model_b, _ = runs[1]
        test = _subset(ds.test_x, ds.test_y, None, batch_size, seed)
        results["paths"] = {}
        for path in paths:
            stage(f"interpolation along the {path} path")
            tr_res = analysis.interpolate(model, model_b, loss_fn, train, alphas=alphas, curve=path)
            te_res = analysis.interpolate(model, model_b, loss_fn, test, alphas=alphas, curve=path)
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
        stage("gradient noise scale, per-example")
        exact_batches = _subset(xs, ys, max_examples, min(batch_size, 256), seed)
        exact = analysis.gradient_noise_stats(model, loss_fn, exact_batches, method="auto")
        stage(f"gradient noise scale, two-batch estimate ({num_pairs} pairs)")
        two_batch = analysis.gradient_noise_stats(model, loss_fn, train, method="two_batch",
                                                  batch_sizes=noise_batch_sizes, num_pairs=num_pairs, seed=seed)
        results["gradient_noise_scale"] = {"exact": exact, "two_batch": two_batch}
    results["seconds"] = time.perf_counter() - t0
    _write(out_dir, kind, results, written)
    if not quiet:
        print(json.dumps({"kind": kind, "written": written}))
    return {"kind": kind, "results": results, "written": written}


def _g(x: Any) -> str:
    return f"{x:.5g}" if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def format_results(result: dict) -> str:
    """The numbers of a :func:`main` result as a plain-text table (what ``sgdlab analyze`` prints)."""
    kind, r = result["kind"], result["results"]
    lines = [f"analyze {kind}: {', '.join(r['run_dirs'])} ({r['num_examples']} {r.get('split', 'train')} "
             f"examples, {r['seconds']:.1f} s)"]
    if kind == "sharpness":
        lines.append(f"  {'eps':>8s} {'full space':>12s} {'subspace':>12s}")
        for row in r["sharpness"]:
            sub = _g(row["random_subspace"]) + f" (p={row['subspace_dim']})" if "random_subspace" in row else "-"
            lines.append(f"  {row['eps']:8.1e} {_g(row['full_space']):>12s} {sub:>12s}")
    elif kind == "hessian":
        eig, tr, sd = r["eigenvalues"], r["trace"], r["spectral_density"]
        name = "GGN" if r.get("curvature") == "ggn" else "Hessian"
        lines.append(f"  top {name} eigenvalues ({eig['method']}, {eig['num_matvecs']} products):")
        errs = eig.get("data_stderr")
        for i, (v, res, ok) in enumerate(zip(eig["values"], eig["residuals"], eig["converged"])):
            extra = f"  data stderr {_g(errs[i])}" if errs else ""
            lines.append(f"    {i + 1:2d}  {v:12.6g}  residual {res:.2g}{'' if ok else ' (not converged)'}{extra}")
        lo, hi = tr["interval95"]
        data = f", data stderr {_g(tr['data_stderr'])}" if "data_stderr" in tr else ""
        lines.append(f"  trace ({tr['method']}, {tr['num_matvecs']} products): {tr['value']:.6g} "
                     f"+- {tr['stderr']:.3g}{data}  95% interval [{lo:.6g}, {hi:.6g}]")
        lines.append(f"  spectral density (SLQ): {len(sd['nodes'])} vectors, nodes in "
                     f"[{min(map(min, sd['nodes'])):.4g}, {max(map(max, sd['nodes'])):.4g}], "
                     f"Gaussian broadening sigma {sd['sigma']:.3g}")
        if "blocks" in r:
            b = r["blocks"]
            lines.append(f"  per block ({len(b['blocks'])} blocks, trace sum {b['sum_of_block_traces']:.6g}):")
            titles = [f"{row['block']} ({row['module']})" if row.get("module") else row["block"]
                      for row in b["blocks"]]
            width = max([24, *map(len, titles)])
            lines.append(f"    {'block (module path)':{width}s} {'params':>8s} {'trace':>12s} {'+-':>9s} "
                         f"{'top eig':>12s} {'residual':>9s}")
            for title, row in zip(titles, b["blocks"]):
                t, e = row["trace"], row["top_eigenvalues"]
                lines.append(f"    {title:{width}s} {row['num_params']:8d} {t['value']:12.6g} "
                             f"{t['stderr']:9.2g} {e['values'][0]:12.6g} {e['residuals'][0]:9.2g}")
    elif kind == "interpolate":
        for path, res in r["paths"].items():
            lines.append(f"  path {path}: {'alpha':>6s} {'train loss':>11s} {'test loss':>10s} "
                         f"{'train acc':>10s} {'test acc':>9s}")
            for a, b in zip(res["train"], res["test"]):
                lines.append(f"  {'':{len(path) + 6}s}{a['alpha']:6.3g} {a['loss']:11.4g} {b['loss']:10.4g} "
                             f"{_g(a['accuracy']):>10s} {_g(b['accuracy']):>9s}")
    elif kind == "noise":
        g = r["sgd_noise_scale"]
        lines.append(f"  SGD noise scale g = lr/(1-m) (N/B - 1) = {g['g']:.5g}  (lr {g['lr']}, momentum "
                     f"{g['momentum']}, N {g['num_samples']}, B {g['batch_size']})")
        ex, tb = r["gradient_noise_scale"]["exact"], r["gradient_noise_scale"]["two_batch"]
        lines.append(f"  gradient noise scale B_simple ({ex['method']}, {ex['num_examples']} examples): "
                     f"{ex['b_simple']:.5g}  (|G|^2 {ex['grad_norm_sq']:.4g}, tr Sigma {ex['trace_cov']:.4g})")
        lo, hi = tb["b_simple_interval"]
        warn = "" if tb["reliable"] else "  UNRELIABLE: |G|^2 is not resolved from zero; use more pairs or exact"
        lines.append(f"  two-batch estimate (B {tb['batch_sizes'][0]}/{tb['batch_sizes'][1]}, {tb['num_pairs']} "
                     f"pairs): {tb['b_simple']:.5g}  95% interval [{lo:.5g}, {hi:.5g}]{warn}")
    lines.extend(f"  wrote {p}" for p in result.get("written", []))
    return "\n".join(lines)
