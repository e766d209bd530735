"""Write monitor (and any other) scalars to a local MLflow file store; no tracking server needed.

``MlflowLogger("runs/x/mlruns")`` creates (or reuses) an experiment in the file store at that folder and
one MLflow run in it; :meth:`MlflowLogger.log` records ``{name: value}`` at a step with MLflow's own
client (``mlflow.tracking.MlflowClient``), so ``mlflow ui --backend-store-uri file:<folder>`` shows the
curves and ``MlflowClient(tracking_uri="file:<folder>").get_metric_history(run_id, name)`` reads them
back. Needs ``pip install 'sgdlab[mlflow]'`` (``mlflow-skinny`` is enough). MLflow 3.7 and later keep
the file store behind the opt-in ``MLFLOW_ALLOW_FILE_STORE=true``, which this logger sets for its own
process if unset (set it for ``mlflow ui`` too); any other tracking URI (``sqlite:///mlflow.db``, a
server's ``http://...``) is used as given.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

__all__ = ["MlflowLogger", "mlflow_key"]

_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in metric keys replaced by ``_``."""
    return _BAD.sub("_", str(name))


class MlflowLogger:
    """One MLflow run in a local file store (``folder``), logging scalars by step.

    Args:
        folder: the store's folder (created), or a ``file:`` URI.
        experiment: experiment name (created if missing).
        run_name: the run's name; params: ``{key: value}`` logged once as the run's parameters
            (nested dicts flattened with dots); run_id: continue this run (e.g. after a resume).
    """

    def __init__(self, folder: str | Path, *, experiment: str = "sgdlab", run_name: str | None = None,
                 params: dict | None = None, run_id: str | None = None):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("logging to MLflow needs mlflow: pip install 'sgdlab[mlflow]'") from e
        self._Metric = Metric
        text = str(folder)
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text) and not re.match(r"^[A-Za-z]:[\\/]", text):
            self.uri = text  # a URI: file:..., sqlite:///..., http://...
        else:
            path = Path(folder).resolve()
            path.mkdir(parents=True, exist_ok=True)
            self.uri = path.as_uri()
        if self.uri.startswith("file:"):
            # MLflow >= 3.7 keeps the file store behind an opt-in; it is still the store that needs nothing
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=run_name)
            self.run_id = run.info.run_id
            if params:
                flat = _flatten(params)
                items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in flat.items()]
                for i in range(0, len(items), 100):
                    self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, scalars: dict[str, Any], step: int) -> None:
        """Record every finite numeric value of ``scalars`` at ``step`` (others are skipped)."""
        ts = int(time.time() * 1000)
        metrics = [self._Metric(mlflow_key(k), float(v), ts, int(step)) for k, v in scalars.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
                   and math.isfinite(float(v))]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run as ended (``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``)."""
        self.client.set_terminated(self.run_id, status=status)


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
