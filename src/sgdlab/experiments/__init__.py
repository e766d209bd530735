"""Experiments: sweeps over configs x seeds, aggregation with bootstrap intervals, reports, and the
study protocols that test the papers' claims with the ledger's statistics (``sgdlab sweep``, ``sgdlab report``,
``sgdlab study``, ``sgdlab ledger``)."""

import importlib

# Every name loads its module on first use (PEP 562): the CLI builds its parser from this package, and
# scipy (aggregate), torch (sweep) and matplotlib (report, studies) should not load for `sgdlab --help`.
_LAZY = {
    **dict.fromkeys(("Difference", "Stats", "bootstrap_ci", "bootstrap_difference", "load_trials", "summarize"),
                    "aggregate"),
    **dict.fromkeys(("Point", "parse_grid", "run_sweep", "trial_name"), "sweep"),
    "write_report": "report",
    "run_study": "studies",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
