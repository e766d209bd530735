"""Figures for the diagnostics (matplotlib, no pyplot state: figures are returned and optionally saved).

- :func:`plot_interpolation`: loss (left axis) and accuracy (right axis) against alpha for train and
  test, in the style of the lecture's Fig. 5 (lecture notes "Towards Understanding SGD"; Keskar et al. 2017 Fig. 3).
- :func:`plot_spectral_density`: the stochastic-Lanczos-quadrature Hessian eigenvalue density.
- :func:`plot_sharpness_vs_batch`: accuracy and sharpness against batch size (the lecture notes "Towards Understanding SGD" Fig. 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..files import save_figure

__all__ = ["plot_interpolation", "plot_spectral_density", "plot_sharpness_vs_batch"]


def _save(fig: Figure, path: str | Path | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_interpolation(
    train: Sequence[dict],
    test: Sequence[dict] | None = None,
    *,
    path: str | Path | None = None,
    title: str | None = None,
    labels: tuple[str, str] = ("model_a", "model_b"),
) -> Figure:
    """Loss (solid, left axis) and accuracy (dashed, right axis) along the interpolation path.

    ``train``/``test`` are the lists returned by :func:`sgdlab.analysis.interpolate`. Alpha 0 and 1 are
    marked with ``labels``: pass the two runs' names (the default says only which argument of
    ``interpolate`` each end is). Saved to the file ``path`` if given.
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax2 = ax.twinx()
    for name, res, color in (("train", train, "tab:blue"), ("test", test, "tab:red")):
        if not res:
            continue
        a = np.array([r["alpha"] for r in res])
        ax.plot(a, [r["loss"] for r in res], "-", color=color, label=f"{name} loss")
        acc = [r.get("accuracy") for r in res]
        if all(v is not None for v in acc):
            ax2.plot(a, 100 * np.array(acc, dtype=float), "--", color=color, label=f"{name} accuracy")
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel("cross-entropy loss")
    ax2.set_ylabel("accuracy (%)")
    for x0, lab in zip((0.0, 1.0), labels):
        ax.axvline(x0, color="0.7", lw=0.8)
        ax.annotate(lab, (x0, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", fontsize=8, bbox_to_anchor=(0.5, -0.15), ncol=4)
    if title:
        ax.set_title(title, pad=14)
    _save(fig, path)
    return fig


def plot_spectral_density(
    density: Any, *, path: str | Path | None = None, log_scale: bool = True, title: str | None = None
) -> Figure:
    """Plot a :class:`sgdlab.analysis.SpectralDensity` (density against eigenvalue, log y by default).

    On the log scale, values below ``1e-6`` of the peak (the Gaussian broadening's numerical tails) are
    left out rather than drawn as a flat floor. Saved to the file ``path`` if given.
    """
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    y = np.asarray(density.density, dtype=float)
    if log_scale:
        floor = 1e-6 * max(float(np.nanmax(y)), 1e-300)
        y = np.where(y >= floor, y, np.nan)
        ax.semilogy(density.grid, y)
    else:
        ax.plot(density.grid, y)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"Hessian spectral density (SLQ, sigma={density.sigma:.2g})")
    _save(fig, path)
    return fig


def plot_sharpness_vs_batch(
    batch_sizes: Sequence[int],
    accuracy: Sequence[float],
    sharpness: dict[str, Sequence[float]],
    *,
    path: str | Path | None = None,
) -> Figure:
    """Test accuracy (left axis) and sharpness per ``eps`` label (right axis) against batch size."""
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    ax.semilogx(batch_sizes, accuracy, "o-", color="tab:blue", label="test accuracy")
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy")
    ax2 = ax.twinx()
    for label, vals in sharpness.items():
        ax2.semilogx(batch_sizes, vals, "s--", label=f"sharpness {label}")
    ax2.set_ylabel("sharpness")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    _save(fig, path)
    return fig
