"""Experiments: sweeps over configs x seeds, aggregation with bootstrap intervals, reports, and the
studies that test the papers' claims (``sgdlab sweep``, ``sgdlab report``, ``sgdlab study``)."""

import importlib

# Every name loads its module on first use (PEP 562): the CLI builds its parser from this package, and
# scipy (aggregate), torch (sweep) and matplotlib (report) should not load for `sgdlab --help`.
_LAZY = {
    **dict.fromkeys(("Difference", "Stats", "bootstrap_ci", "bootstrap_difference", "load_trials", "summarize"),
                    "aggregate"),
    **dict.fromkeys(("Point", "parse_grid", "run_sweep", "trial_name"), "sweep"),
    **dict.fromkeys(("Verdict", "decide", "decide_equivalence"), "verdict"),
    "write_report": "report",
    **dict.fromkeys(("run_study", "STUDIES"), "studies"),
}

__all__ = [
    "STUDIES",
    "Difference",
    "Point",
    "Stats",
    "Verdict",
    "bootstrap_ci",
    "bootstrap_difference",
    "decide",
    "decide_equivalence",
    "load_trials",
    "parse_grid",
    "run_study",
    "run_sweep",
    "summarize",
    "trial_name",
    "write_report",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
