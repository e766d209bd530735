"""Run configuration: YAML validated into typed pydantic models.

Every key is documented in the README's "Configuration reference". Unknown or ill-typed keys
raise :class:`~sgdlab.errors.ConfigError` naming the dotted key and, for unknown keys, the
nearest valid one. The ``data``, ``model``, ``sampler`` and ``loss`` sections take extra keys
that are passed to the dataset builder, model builder, sampler factory and loss transforms;
they are checked against those callables' signatures.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError

__all__ = ["Config", "Duration", "load_config", "apply_overrides", "parse_duration", "config_to_dict",
           "import_plugins", "add_cli_imports"]


def _reject_bool_numbers(cls, value, info):
    """Pydantic's lax mode reads ``true`` as 1 for a number field; a boolean there is a typo, not a number."""
    if isinstance(value, bool):
        annotation = cls.model_fields[info.field_name].annotation
        allowed = {annotation, *typing.get_args(annotation)}
        if bool not in allowed and allowed & {int, float}:
            raise ValueError("expected a number, not a boolean")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _no_bools = field_validator("*", mode="before")(classmethod(_reject_bool_numbers))


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")
    _no_bools = field_validator("*", mode="before")(classmethod(_reject_bool_numbers))

    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z ]+?)\s*$", re.IGNORECASE)
_UNITS = {"step": "steps", "steps": "steps", "epoch": "epochs", "epochs": "epochs",
          "effective epoch": "epochs", "effective epochs": "epochs", "s": "seconds", "sec": "seconds",
          "second": "seconds", "seconds": "seconds", "min": "minutes", "minute": "minutes", "minutes": "minutes"}


class Duration(BaseModel):
    """A run's length: ``value`` in ``unit`` (steps, epochs — effective epochs for SRS — or seconds)."""

    model_config = ConfigDict(frozen=True)
    value: float
    unit: Literal["steps", "epochs", "seconds"]

    def __str__(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{v} {'s' if self.unit == 'seconds' else self.unit}"


def parse_duration(text) -> Duration:
    """Parse ``"2000 steps"``, ``"20 epochs"``, ``"20 effective epochs"``, ``"90 s"``, ``"5 min"``."""
    if isinstance(text, Duration):
        return text
    if isinstance(text, dict):
        return Duration(**text)
    m = _DURATION_RE.match(str(text))
    unit = _UNITS.get(m.group(2).lower().strip()) if m else None
    if not m or unit is None:
        raise ValueError(f"expected '<number> steps|epochs|effective epochs|s|min', got {text!r}")
    value = float(m.group(1))
    if unit == "minutes":
        value, unit = value * 60.0, "seconds"
    if value <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    if unit == "steps" and not value.is_integer():
        raise ValueError(f"a duration in steps must be a whole number, got {text!r}")
    return Duration(value=value, unit=unit)


class DataConfig(_Open):
    name: str = "mnist1d"
    root: str | None = None
    augment: bool = False
    normalize: bool = True
    on_device: bool = False


class ModelConfig(_Open):
    name: str = "cnn1d"


class SamplerConfig(_Open):
    name: str = "epoch"
    batch_size: int = Field(100, gt=0)


class OptimConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs optim.name 'sgd' and a momentum > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must both lie in [0, 1), got {list(self.betas)}")
        return self


class ScheduleConfig(_Strict):
    name: Literal["constant", "multistep", "cosine", "poly", "triangular"] = "constant"
    unit: Literal["steps", "epochs", "fraction", "seconds"] = "epochs"
    milestones: list[float] = Field(default_factory=list)
    factor: float = Field(0.1, gt=0)
    power: float = Field(0.9, gt=0)
    period: float | None = Field(None, gt=0)
    low: float = Field(0.0, ge=0, le=1)
    warmup: float = Field(0.0, ge=0)
    warmup_from: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self):
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        if self.name == "triangular" and self.period is None:
            raise ValueError("the triangular schedule needs a period")
        return self


class LossConfig(_Open):
    name: Literal["cross_entropy", "mse"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _smoothing_needs_cross_entropy(self):
        if self.label_smoothing > 0 and self.name != "cross_entropy":
            raise ValueError(f"label_smoothing applies to cross_entropy only, not {self.name!r}")
        return self


class EvalConfig(_Strict):
    every: int = Field(500, ge=0)
    batch_size: int = Field(1000, gt=0)
    train: bool = False


class CheckpointConfig(_Strict):
    every: int = Field(1000, ge=0)
    init_from: str | None = None


class LogConfig(_Strict):
    every: int = Field(10, gt=0)
    tensorboard: bool = False
    progress: bool = True


class FastConfig(_Strict):
    compile: bool = False
    channels_last: bool = False
    autocast: Literal["bf16", "fp16"] | None = None


class Config(_Strict):
    """The whole run: seed, device, duration and one section per layer (see the README reference)."""

    seed: int = 0
    device: str = "auto"
    duration: Duration = Field(default_factory=lambda: parse_duration("2000 steps"))
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    fast: FastConfig = Field(default_factory=FastConfig)
    name: str | None = None
    notes: str | None = None
    imports: list[str] = Field(default_factory=list)

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, v):
        return parse_duration(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v


# --------------------------------------------------------------------------------------------------
# Loading, overrides, error messages
# --------------------------------------------------------------------------------------------------


def _fields_at(loc: tuple) -> list[str]:
    """Valid field names of the model at the path ``loc`` (for 'did you mean')."""
    model: Any = Config
    for part in loc:
        f = getattr(model, "model_fields", {}).get(part)
        if f is None:
            return []
        ann = f.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _fields_at(loc[:-1]), n=1)
            hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else ""
            lines.append(f"unknown key '{key}'{hint}")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"invalid value for '{key}': {e['msg']}{got_s}")
    return "; ".join(lines)


def _check_kwargs(section: str, extras: dict, fn, skip: tuple = ()) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in skip]
    for k in extras:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{section}.{k}'{hint}")


def _check_semantics(cfg: Config) -> None:
    """Names and pass-through keys against the registries (model, dataset, sampler, loss transforms)."""
    from .. import data, models, regularize, sampling
    from ..models import registry as model_registry
    from ..sampling import base as sampling_base

    try:
        builder = model_registry._entry(cfg.model.name).builder
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    _check_kwargs("model", cfg.model.extras(), builder, skip=("num_classes",))
    if cfg.data.name not in data.names():
        close = difflib.get_close_matches(cfg.data.name, data.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"data.name: unknown dataset {cfg.data.name!r}{hint}; known: {', '.join(data.names())}")
    from ..data.datasets import _builder

    _check_kwargs("data", cfg.data.extras(), _builder(cfg.data.name))
    if cfg.sampler.name not in sampling.names():
        close = difflib.get_close_matches(cfg.sampler.name, sampling.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"sampler.name: unknown sampler {cfg.sampler.name!r}{hint}; "
                          f"known: {', '.join(sampling.names())}")
    _check_kwargs("sampler", cfg.sampler.extras(), sampling_base._REGISTRY[cfg.sampler.name], skip=("ctx",))
    from ..regularize import base as reg_base

    for key, opts in cfg.loss.extras().items():
        if key not in regularize.loss_transform_names():
            valid = regularize.loss_transform_names() + list(LossConfig.model_fields)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean 'loss.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key 'loss.{key}'{hint}")
        if opts is None:
            continue
        if not isinstance(opts, dict):
            raise ConfigError(f"invalid value for 'loss.{key}': expected a mapping of options, got {opts!r}")
        _check_kwargs(f"loss.{key}", opts, reg_base._TRANSFORMS[key], skip=("seed",))
    if cfg.duration.unit == "seconds" and cfg.schedule.unit in ("steps", "epochs") and cfg.schedule.name in (
            "cosine", "poly"):
        raise ConfigError("schedule.unit: a run whose duration is in seconds has no known length in "
                          f"{cfg.schedule.unit}; use schedule.unit 'fraction' or 'seconds' for {cfg.schedule.name}")
    del models  # imported for its registrations


def _coerce_scalar(text: str):
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a raw config dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = _coerce_scalar(value)
    return out


def read_raw_config(source) -> dict:
    """The unvalidated config dict of a YAML path, a dict (copied), a :class:`Config`, or None (empty)."""
    if isinstance(source, Config):
        return config_to_dict(source)
    if source is None:
        return {}
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return raw


_CLI_IMPORTS: list[str] = []


def import_plugins(modules) -> None:
    """Import the user modules named in a config's ``imports`` (they register datasets, models, samplers or
    loss transforms); modules are looked up on ``sys.path`` and in the current directory."""
    if modules is None:
        return
    if isinstance(modules, str) or not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"invalid value for 'imports': expected a list of module names, got {modules!r}")
    import importlib
    import os
    import sys

    for name in modules:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: cannot import {name!r} ({e})") from None


def add_cli_imports(modules: list[str]) -> None:
    """Import ``modules`` now (``sgdlab --import``) and add them to the ``imports`` of every config loaded
    afterwards in this process, so the run directories record them for ``resume``, ``analyze`` and sweeps."""
    import_plugins(list(modules))
    _CLI_IMPORTS.extend(m for m in modules if m not in _CLI_IMPORTS)


def load_config(source=None, overrides: list[str] | None = None) -> Config:
    """Validate a config from a YAML path, a dict, or a :class:`Config` (plus dotted overrides).

    The modules listed under ``imports`` (and any given with ``--import``) are imported first, so the names
    they register are known to the checks.
    """
    raw = read_raw_config(source)
    if overrides:
        raw = apply_overrides(raw, overrides)
    if _CLI_IMPORTS:
        have = raw.get("imports") if isinstance(raw.get("imports"), list) else []
        raw["imports"] = list(have) + [m for m in _CLI_IMPORTS if m not in have]
    import_plugins(raw.get("imports"))
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation(e)) from None
    _check_semantics(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain-data form of a config (durations as text), suitable for YAML."""
    d = cfg.model_dump(mode="json")
    d["duration"] = str(cfg.duration)
    return d
