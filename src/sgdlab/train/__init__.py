"""The engine: config -> run directory with metrics, checkpoints, resume."""

from .config import Config, ConfigError, load_config, parse_duration
from .engine import build_dataset, build_model, evaluate, load_run, per_example_loss, resume, run

__all__ = ["Config", "ConfigError", "load_config", "parse_duration", "run", "resume", "load_run",
           "build_dataset", "build_model", "evaluate", "per_example_loss"]
