"""Experiments: sweeps over configs x seeds, aggregation with bootstrap intervals, reports, and the
study protocols that test the papers' claims with the ledger's statistics (``sgdlab sweep``, ``sgdlab report``,
``sgdlab study``, ``sgdlab ledger``)."""

from .aggregate import Difference, Stats, bootstrap_ci, bootstrap_difference, load_trials, summarize
from .sweep import Point, parse_grid, run_sweep, trial_name

__all__ = [
    "Difference",
    "Point",
    "Stats",
    "bootstrap_ci",
    "bootstrap_difference",
    "load_trials",
    "parse_grid",
    "run_study",
    "run_sweep",
    "summarize",
    "trial_name",
    "write_report",
]


def __getattr__(name):  # the report and studies pull in matplotlib: load them on first use
    if name == "write_report":
        from .report import write_report

        return write_report
    if name == "run_study":
        from . import studies

        return getattr(studies, name)
    raise AttributeError(name)
