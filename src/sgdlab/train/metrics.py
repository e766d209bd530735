"""A run's metric rows (``metrics.jsonl``, mirrored to ``metrics.csv`` and TensorBoard) and its progress bar."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write, open_append
from . import guard
from .state import atomic_write_text

__all__ = ["MetricsLog", "read_rows", "json_line", "progress_bar"]


def json_line(row: dict) -> str:
    """One strict-JSON line (non-finite numbers are written as null)."""
    return json.dumps(guard.finite_json(row), allow_nan=False) + "\n"


def read_rows(lines, path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (an iterable of lines), stably sorted by step; a last line cut by a kill
    is dropped, any other bad line is a ConfigError naming ``path`` and the line number."""
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if line.endswith("\n"):
                raise ConfigError(f"{path}:{i}: not a JSON line ({e.msg})") from None
            break  # a last line cut by a kill: the rows after the checkpoint are rewritten anyway
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ConfigError(f"{path}:{i}: not a metrics row")
        rows.append(row)
    # in step order: a background monitor's reading is written when collected, after rows of later steps
    return sorted(rows, key=lambda r: r["step"])


class MetricsLog:
    """Appends rows to metrics.jsonl (flushed each row), mirrors them to CSV and TensorBoard.

    On resume (``keep_until_step``) the rows written after the checkpoint's step are dropped, so the
    resumed run rewrites them exactly as an uninterrupted run would have.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, keep_until_step: int | None):
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        self.writer = None
        self.sinks: list = []  # more trackers: objects with log(row, step) and close() (MLflow)
        if not enabled:
            return
        if self.jsonl.exists():
            with open(self.jsonl) as f:
                self.rows = read_rows(f, self.jsonl)
            if keep_until_step is not None:
                self.rows = [r for r in self.rows if r["step"] <= keep_until_step]
            atomic_write_text(self.jsonl, "".join(json_line(r) for r in self.rows))
        self.fh = open_append(self.jsonl)  # never through a link planted at metrics.jsonl
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("log.tensorboard: tensorboard is not installed (pip install 'sgdlab[tensorboard]'); skipped")

    def write(self, row: dict) -> None:
        """Append ``row`` (flushed) and send its numbers to TensorBoard."""
        if not self.enabled:
            return
        row = guard.finite_json(row)
        self.rows.append(row)
        self.fh.write(json.dumps(row, allow_nan=False) + "\n")
        self.fh.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["step"])
        for sink in self.sinks:
            sink.log(row, row["step"])

    def write_csv(self) -> None:
        """Rewrite metrics.csv (atomically) from all rows; columns in order of first appearance."""
        if not self.enabled:
            return
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with atomic_write(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.writer is not None:
                self.writer.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


@contextlib.contextmanager
def progress_bar(enabled: bool, total: float, unit: str, completed: float, label: str = "train"):
    """A rich progress bar over ``total`` ``unit`` (``"steps"``, ``"seconds"``, ``"epochs"`` or ``"fwd"``); yields its update
    function ``update(completed=..., info=...)``, or None when ``enabled`` is false."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    cols = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn() if unit == "steps" else
            TextColumn("{task.completed:.0f}/{task.total:.0f} " + {"seconds": "s"}.get(unit, unit)),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, transient=False) as bar:
        task = bar.add_task(label, total=total, info="", completed=completed)

        def update(**fields) -> None:
            bar.update(task, **fields)

        yield update
