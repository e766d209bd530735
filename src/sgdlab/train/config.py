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
import functools
import inspect
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..files import name_problem

__all__ = ["Config", "Duration", "load_config", "apply_overrides", "parse_duration", "config_to_dict",
           "import_plugins", "add_cli_imports", "read_yaml", "resume_drift", "RESUMABLE_KEYS"]

# Limits of what a config may contain (a config is a few hundred bytes; these only stop hostile input).
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 40
MAX_NODES = 100_000
MAX_INT = 2**63 - 1
MAX_SEED = 2**63 - 2**20  # seeds derived from a run's seed (+ rank, + 1) stay below 2^63
MAX_STEPS = 10**12
MAX_THREADS = 4096  # torch CPU threads; torch.set_num_threads takes a C int


def _bounded(value, where: str = "", depth: int = 0):
    """Refuse numbers no run can use in the free-form sections: non-finite floats, integers beyond 64 bits."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ValueError(f"{where or 'value'}: integer out of range (more than 64 bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'}: must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _bounded(v, f"{where}.{k}" if where else str(k), depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _bounded(v, f"{where}[{i}]", depth + 1)
    return value


def _reject_bool_numbers(cls, value, info):
    """Pydantic's lax mode reads ``true`` as 1 for a number field; a boolean there is a typo, not a number."""
    if isinstance(value, bool):
        annotation = cls.model_fields[info.field_name].annotation
        allowed = {annotation, *typing.get_args(annotation)}
        if bool not in allowed and allowed & {int, float}:
            raise ValueError("expected a number, not a boolean")
    return value


def _int_range(cls, value, info):
    """Integers past 64 bits cannot reach torch; say so instead of overflowing later."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ValueError("integer out of range (more than 64 bits)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    _no_bools = field_validator("*", mode="before")(classmethod(_reject_bool_numbers))
    _ints = field_validator("*", mode="after")(classmethod(_int_range))


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    _no_bools = field_validator("*", mode="before")(classmethod(_reject_bool_numbers))
    _ints = field_validator("*", mode="after")(classmethod(_int_range))

    @model_validator(mode="after")
    def _extras_bounded(self):
        for k, v in (self.model_extra or {}).items():
            _bounded(v, k)
        return self

    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z _-]+?)\s*$", re.IGNORECASE)
_UNITS = {"step": "steps", "steps": "steps", "epoch": "epochs", "epochs": "epochs",
          "effective epoch": "epochs", "effective epochs": "epochs", "s": "seconds", "sec": "seconds",
          "second": "seconds", "seconds": "seconds", "min": "minutes", "minute": "minutes", "minutes": "minutes",
          "fwd": "fwd", "forward_equivalents": "fwd", "forward equivalents": "fwd", "forward-equivalents": "fwd"}


class Duration(BaseModel):
    """A run's length: ``value`` in ``unit`` (steps, epochs — effective epochs for SRS — seconds, or
    forward-equivalents ``fwd``, the compute budget of :mod:`sgdlab.train.budget`)."""

    model_config = ConfigDict(frozen=True)
    value: float
    unit: Literal["steps", "epochs", "seconds", "fwd"]

    def __str__(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{v} {'s' if self.unit == 'seconds' else self.unit}"


def parse_duration(text) -> Duration:
    """Parse ``"2000 steps"``, ``"20 epochs"``, ``"20 effective epochs"``, ``"90 s"``, ``"5 min"``,
    ``"200000 fwd"`` (``forward_equivalents``)."""
    if isinstance(text, Duration):
        return text
    if isinstance(text, dict):
        return Duration(**text)
    m = _DURATION_RE.match(str(text))
    unit = _UNITS.get(m.group(2).lower().strip()) if m else None
    if not m or unit is None:
        raise ValueError(f"expected '<number> steps|epochs|effective epochs|s|min|fwd', got {text!r}")
    value = float(m.group(1))
    if unit == "minutes":
        value, unit = value * 60.0, "seconds"
    if value <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    limit = {"steps": MAX_STEPS, "epochs": 1e9, "seconds": 1e9, "fwd": 1e18}[unit]
    if not math.isfinite(value) or value > limit:
        raise ValueError(f"duration {str(text)!r} is too long (at most {limit:.0e} {unit})")
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
    batch_size: int = Field(100, gt=0, le=2**31 - 1)


class OptimConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
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
    """``every`` steps, and also each time the training clock passes a multiple of ``seconds`` (0: off), the
    test split (and with ``train`` the whole training split) is evaluated. The time grid is for comparing
    methods at equal wall-clock time (importance sampling, Katharopoulos & Fleuret 2018, Figs. 3-4); which
    steps it lands on depends on the machine's speed, so such a run is not reproducible step for step."""

    every: int = Field(500, ge=0)
    seconds: float = Field(0.0, ge=0, allow_inf_nan=False)
    batch_size: int = Field(1000, gt=0, le=2**31 - 1)
    train: bool = False


class CheckpointConfig(_Strict):
    every: int = Field(1000, ge=0)
    init_from: str | None = None


class LogConfig(_Strict):
    every: int = Field(10, gt=0)
    tensorboard: bool = False
    progress: bool = True
    mlflow: bool | str = False  # true: a local MLflow file store in <run>/mlruns; a string: that folder or URI

    @field_validator("mlflow", mode="before")
    @classmethod
    def _mlflow(cls, v):
        if not isinstance(v, bool | str) or v == "":
            raise ValueError(f"must be true/false or a folder or tracking URI, got {v!r}")
        return v


class MonitorConfig(_Open):
    """One entry of ``monitors:``: a :mod:`sgdlab.monitors` name, its period, and its own options.

    ``probe`` (sharpness, importance): examples of the training set in the monitor's fixed probe batch,
    drawn once from the run's seed (default: the training batch size for sharpness, the whole training set
    as the pool of importance); ``0`` makes sharpness use the batch just trained on. noise_scale and norms always
    measure the batch just trained on.
    """

    name: str
    every: int = Field(100, gt=0)
    probe: int | None = Field(None, ge=0)


class FastConfig(_Strict):
    compile: bool = False
    channels_last: bool = False
    autocast: Literal["bf16", "fp16"] | None = None


class Config(_Strict):
    """The whole run: seed, device, threads, duration and one section per layer (docs/configuration.md).

    The defaults are the default experiment: ``Config()``, an empty YAML file and ``sgdlab run`` with no
    config all train cnn1d on MNIST-1D for 2000 steps with SGD (lr 0.05, momentum 0.9).
    """

    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = "auto"
    threads: int | Literal["auto"] = "auto"
    duration: Duration = Field(default_factory=lambda: parse_duration("2000 steps"))
    # backward/forward cost of the forward-equivalent budget: 2 (the FLOP ratio; deterministic) or "auto" (timed
    # once on a training batch and stored in the run)
    cost_ratio: float | Literal["auto"] = 2.0
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
    sync_bn: bool = False
    monitors: list[MonitorConfig] = Field(default_factory=list)
    name: str | None = None
    notes: str | None = None
    imports: list[str] = Field(default_factory=list)

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, v):
        return parse_duration(v)

    @field_validator("cost_ratio")
    @classmethod
    def _cost_ratio(cls, v):
        if v != "auto" and not (0 <= v < 1e6):
            raise ValueError(f"cost_ratio must be 'auto' or a non-negative number (backward/forward time), got {v!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        # a label of reports and studies, written into Markdown and HTML: one line, no path
        problem = None if v is None else name_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"threads must be 'auto' or a whole number >= 1, got {v!r}")
        if v != "auto" and v > MAX_THREADS:
            raise ValueError(f"threads must be 'auto' or at most {MAX_THREADS}, got {v!r}")
        return v

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


_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")

# Names other libraries use for our keys, which string similarity does not find (learning_rate -> lr).
_SYNONYMS = {"learning_rate": "lr", "learningrate": "lr", "wd": "weight_decay", "bs": "batch_size",
             "batchsize": "batch_size", "nesterov_momentum": "nesterov", "clip": "grad_clip",
             "grad_norm_clip": "grad_clip", "max_grad_norm": "grad_clip", "gradient_clip_val": "grad_clip"}

# The end of an unknown-name error for the registries a user's module can extend.
_IMPORT_HINT = ("; one of your own is registered in a module loaded with --import MODULE or 'imports: [MODULE]' "
                "(docs/custom.md)")


def _close_key(name: str, valid: list[str]) -> str | None:
    """The valid key a mistyped ``name`` most likely means: a known synonym, else the closest spelling."""
    if _SYNONYMS.get(name.lower()) in valid:
        return _SYNONYMS[name.lower()]
    close = difflib.get_close_matches(name, valid, n=1)
    return close[0] if close else None


def _raw_at(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        else:
            return None
    return raw


def _format_validation(err: ValidationError, raw: dict | None = None) -> str:
    lines: list[str] = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        indexed = any(isinstance(p, int) for p in e["loc"])
        if (indexed and e["type"] == "missing") or e["type"] in ("too_long", "too_short"):
            # a list of the wrong length: name the list, not its missing item
            n = next((i for i, p in enumerate(e["loc"]) if isinstance(p, int)), len(loc))
            field_loc = loc[:n]
            ann = Config
            for part in field_loc:
                ann = getattr(ann, "model_fields", {}).get(part)
                ann = ann.annotation if ann is not None else None
            want = len(typing.get_args(ann)) if typing.get_origin(ann) is tuple else None
            if want is None and e["type"] == "missing" and typing.get_origin(ann) is list:
                # a required key missing in an item of a list of mappings (monitors: [{every: 3}])
                where = ".".join(field_loc) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                                      for p in e["loc"][n:])
                lines.append(f"missing key '{where}'")
                continue
            got = _raw_at(raw, field_loc)
            msg = (f"invalid value for '{'.'.join(field_loc)}': expected a list of "
                   f"{want if want else 'the right number of'} values, got {got!r}")
            if msg not in lines:
                lines.append(msg)
            continue
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            close = _close_key(str(loc[-1]), _fields_at(loc[:-1]))
            hint = f" (did you mean '{'.'.join(loc[:-1] + (close,))}'?)" if close else ""
            lines.append(f"unknown key '{key}'{hint}")
        else:
            got = e.get("input")
            msg = e["msg"]
            for prefix in _PYDANTIC_PREFIXES:
                msg = msg.removeprefix(prefix)
            got_r = repr(got)
            shown = isinstance(got, (dict, list)) or got_r in msg or str(got) in msg
            got_s = "" if shown else f" (got {got_r if len(got_r) <= 80 else got_r[:77] + '...'})"
            lines.append(f"invalid value for '{key}': {msg}{got_s}" if key else f"invalid config: {msg}")
    return "; ".join(lines)


# Arguments a sampler factory fills from its SourceContext, or a loss-transform factory from the run.
_CONTEXT_ARGS = ("ctx", "num_samples", "batch_size", "seed", "rank", "world_size", "self")


def _options_of(fn, skip: tuple = (), through_return: bool = False) -> dict[str, Any] | None:
    """``{name: default}`` of the keyword options of a builder (``inspect.Parameter.empty`` when required).

    With ``through_return``, a factory that forwards ``**options`` to the class it returns
    (``-> EpochSampler``; sampler and loss-transform factories) is read through that class's constructor.
    None when the options cannot be enumerated. Cached per builder (a sweep validates thousands of configs).
    """
    options = _options_cached(fn, tuple(skip), through_return)
    return None if options is None else dict(options)


@functools.lru_cache(maxsize=512)
def _options_cached(fn, skip: tuple, through_return: bool) -> dict[str, Any] | None:
    params = dict(inspect.signature(fn).parameters)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        if not through_return:
            return None
        try:
            target = typing.get_type_hints(fn).get("return")
        except Exception:  # noqa: BLE001 - unresolvable annotations: options unknown
            target = None
        if not isinstance(target, type):
            return None
        inner = inspect.signature(target.__init__).parameters
        if any(p.kind == p.VAR_KEYWORD for p in inner.values()):
            return None
        params = {k: v for k, v in params.items() if v.kind != v.VAR_KEYWORD}
        params.update(inner)
        skip = tuple(skip) + _CONTEXT_ARGS
    return {k: p.default for k, p in params.items()
            if k not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_kwargs(section: str, extras: dict, fn, skip: tuple = (), through_return: bool = False) -> None:
    options = _options_of(fn, skip, through_return)
    if options is None:
        return
    valid = list(options)
    for k in extras:
        if k not in valid:
            close = _close_key(k, valid + _fields_at((section,)))
            hint = f" (did you mean '{section}.{close}'?)" if close else ""
            raise ConfigError(f"unknown key '{section}.{k}'{hint}")


def _check_semantics(cfg: Config) -> None:
    """Names and pass-through keys against the registries (model, dataset, sampler, loss transforms)."""
    from .. import data, models, regularize, sampling
    from ..models import registry as model_registry
    from ..sampling import base as sampling_base

    try:
        builder = model_registry._entry(cfg.model.name).builder
    except ValueError as e:
        raise ConfigError(f"model.name: {e}" + (_IMPORT_HINT if "unknown model" in str(e) else "")) from None
    _check_kwargs("model", cfg.model.extras(), builder, skip=("num_classes",))
    if cfg.data.name not in data.names():
        close = difflib.get_close_matches(cfg.data.name, data.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"data.name: unknown dataset {cfg.data.name!r}{hint}; known: {', '.join(data.names())}"
                          + _IMPORT_HINT)
    from ..data.datasets import _builder

    _check_kwargs("data", cfg.data.extras(), _builder(cfg.data.name))
    if cfg.sampler.name not in sampling.names():
        close = difflib.get_close_matches(cfg.sampler.name, sampling.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"sampler.name: unknown sampler {cfg.sampler.name!r}{hint}; "
                          f"known: {', '.join(sampling.names())}" + _IMPORT_HINT)
    _check_kwargs("sampler", cfg.sampler.extras(), sampling_base._REGISTRY[cfg.sampler.name], skip=("ctx",),
                  through_return=True)
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
        _check_kwargs(f"loss.{key}", opts, reg_base._TRANSFORMS[key], skip=("seed",), through_return=True)
    _check_monitors(cfg)
    if cfg.duration.unit in ("seconds", "fwd") and cfg.schedule.unit in ("steps", "epochs") and cfg.schedule.name in (
            "cosine", "poly"):
        what = "seconds" if cfg.duration.unit == "seconds" else "forward-equivalents"
        raise ConfigError(f"schedule.unit: a run whose duration is in {what} has no known length in "
                          f"{cfg.schedule.unit}; use schedule.unit 'fraction' for {cfg.schedule.name}")
    del models  # imported for its registrations


# options of a monitor the engine fills itself (from the run: optimizer, probe batch, loss, seed)
_MONITOR_FILLED = ("every", "probe", "prefix", "lr", "momentum", "nesterov", "loss", "seed", "self")


def _check_monitors(cfg: Config) -> None:
    """``monitors[i].name`` against the monitor registry and its options against the monitor's keywords."""
    from .. import monitors

    seen: set[str] = set()
    for i, m in enumerate(cfg.monitors):
        if m.name not in monitors.names():
            close = difflib.get_close_matches(m.name, monitors.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"monitors[{i}].name: unknown monitor {m.name!r}{hint}; known: "
                              f"{', '.join(monitors.names())}")
        if m.probe is not None and m.name in ("noise_scale", "norms"):
            raise ConfigError(f"monitors[{i}].probe: {m.name} measures the batch just trained on (a fixed batch "
                              "would not sample the gradient noise); remove probe")
        extras = m.extras()
        _check_kwargs(f"monitors[{i}]", extras, monitors.base._REGISTRY[m.name], skip=_MONITOR_FILLED)
        prefix = extras.get("prefix", m.name)
        if prefix in seen:
            raise ConfigError(f"monitors[{i}]: a second {m.name!r} monitor would log under the same names; give "
                              f"it a prefix (e.g. prefix: {m.name}_2)")
        seen.add(prefix)


def _plain(value) -> tuple[bool, Any]:
    """``(ok, value)``: a builder default as plain YAML data (tuples become lists), if it has one."""
    try:
        return True, json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return False, None


def _fill_into(extras: dict, options: dict | None, skip: tuple = ()) -> None:
    for k, default in (options or {}).items():
        if k in extras or k in skip or default is inspect.Parameter.empty:
            continue
        ok, plain = _plain(default)
        if ok:
            extras[k] = plain


def _fill_builder_defaults(cfg: Config) -> None:
    """Write the builders' own defaults into the open sections, so the resolved config lists every value used.

    Builders receive exactly these keywords, so filling them changes nothing about the run; it makes
    ``config.yaml`` say which dataset size, model width or sampler option a run actually had.
    """
    from .. import data  # noqa: F401 - registrations
    from ..data.datasets import _builder
    from ..models import registry as model_registry
    from ..regularize import base as reg_base
    from ..sampling import base as sampling_base

    sections = (
        (cfg.data, _options_of(_builder(cfg.data.name)), tuple(DataConfig.model_fields)),
        # the input-shape parameters are left out: the engine fills them from the data at build time
        (cfg.model, _options_of(model_registry._entry(cfg.model.name).builder,
                                ("num_classes", *model_registry.SHAPE_PARAMETERS, "length", "size")),
         tuple(ModelConfig.model_fields)),
        (cfg.sampler, _options_of(sampling_base._REGISTRY[cfg.sampler.name], ("ctx",), through_return=True),
         tuple(SamplerConfig.model_fields)),
    )
    for section, options, fields in sections:
        extras = section.__pydantic_extra__
        if extras is not None:
            _fill_into(extras, options, fields)
    loss_extras = cfg.loss.__pydantic_extra__ or {}
    for key, opts in loss_extras.items():
        if isinstance(opts, dict):
            _fill_into(opts, _options_of(reg_base._TRANSFORMS[key], ("seed",), through_return=True))


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with limits: nesting depth, expanded size (alias bombs), unique mapping keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.MarkedYAMLError(problem=f"nesting deeper than {MAX_DEPTH} levels", problem_mark=mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to convert integers of more than 4300 digits
            raise yaml.MarkedYAMLError(problem="integer too large (more than 64 bits)",
                                       problem_mark=node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            try:
                key = self.construct_object(key_node, deep=True)
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r} (first at line {seen[key] + 1})",
                                           problem_mark=key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _expanded_size(node, memo: dict) -> int:
    """Nodes of ``node`` with every alias written out (shared subtrees counted each time they are used)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_NODES + 1  # a cycle counts as too large
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[key] = min(size, MAX_NODES + 1)
    return memo[key]


def read_yaml(text: str, where: str = "<string>"):
    """Parse YAML ``text`` safely and within bounds; :class:`ConfigError` ``where:line:col: message`` if not.

    No Python objects are built (safe loader); nesting is limited to ``MAX_DEPTH`` levels, the document
    written out with its aliases to ``MAX_NODES`` nodes (a "billion laughs" document is refused after a
    few thousand operations), and a key may appear once per mapping.
    """
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses control characters already here
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_NODES:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: the document "
                              f"expands to more than {MAX_NODES} values (aliases used as a multiplier?)")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = " ".join(str(x) for x in (e.context, e.problem) if x) or "invalid YAML"
        msg = " ".join(msg.split())
        if mark is None:
            raise ConfigError(f"{where}: {msg}") from None
        raise ConfigError(f"{where}:{mark.line + 1}:{mark.column + 1}: {msg}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    except (ValueError, RecursionError, OverflowError) as e:  # e.g. an integer of 5000 digits
        raise ConfigError(f"{where}: {' '.join(str(e).split())[:200] or type(e).__name__}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _coerce_scalar(text: str, item: str = ""):
    return read_yaml(text, f"override {item!r}") if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a raw config dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            node = node[p]
        set_merged(node, parts[-1], _coerce_scalar(value, item))
    return out


def set_merged(node: dict, key: str, value) -> None:
    """``node[key] = value``, except that a mapping merges key by key into an existing mapping there.

    So ``sampler={name: srs}`` changes the sampler's name and keeps its batch size; to drop a key,
    override it explicitly.
    """
    old = node.get(key)
    if isinstance(value, dict) and isinstance(old, dict):
        merged = copy.deepcopy(old)
        for k, v in value.items():
            set_merged(merged, k, v)
        node[key] = merged
    else:
        node[key] = copy.deepcopy(value)


def read_raw_config(source) -> dict:
    """The unvalidated config dict of a YAML path, a dict (copied), a :class:`Config`, or None (empty)."""
    if isinstance(source, Config):
        return config_to_dict(source)
    if source is None:
        return {}
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))[:5]
        hint = f" (it holds {', '.join(inside)}{', ...' if len(inside) == 5 else ''})" if inside else ""
        raise ConfigError(f"{path} is a directory, not a config file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config file")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file (or UTF-16 text), not a UTF-8 YAML config")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    raw = read_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return raw


_CLI_IMPORTS: list[str] = []


def import_plugins(modules, source: str = "imports") -> None:
    """Import the user modules named in a config's ``imports`` (they register datasets, models, samplers or
    loss transforms); modules are looked up on ``sys.path`` and in the current directory.

    A module that cannot be imported (not found, an empty or relative name, or one that raises while it
    is imported, a syntax error included) raises :class:`~sgdlab.errors.ConfigError` naming it and the
    error; ``source`` (``imports`` or ``--import``) starts that message.
    """
    if modules is None:
        return
    if isinstance(modules, str) or not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"invalid value for 'imports': expected a list of module names, got {modules!r}")
    import importlib
    import os
    import sys

    for name in modules:
        if not name.strip():
            raise ConfigError(f"{source}: cannot import {name!r} (empty module name)")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"{source}: cannot import {name!r} ({e})") from None
        except Exception as e:  # the module itself fails: SyntaxError, a raise at import time, ...
            raise ConfigError(f"{source}: cannot import {name!r} ({type(e).__name__}: {e})") from None


def add_cli_imports(modules: list[str]) -> None:
    """Import ``modules`` now (``sgdlab --import``) and add them to the ``imports`` of every config loaded
    afterwards in this process, so the run directories record them for ``resume``, ``analyze`` and sweeps."""
    import_plugins(list(modules), source="--import")
    _CLI_IMPORTS.extend(m for m in modules if m not in _CLI_IMPORTS)


# Keys a resume may change (eval.*, log.*, checkpoint.every, the run's name and notes; duration only longer).
RESUMABLE_KEYS = ("duration", "eval.every", "eval.seconds", "eval.batch_size", "checkpoint.every", "log.", "name", "notes",
                  "monitors")


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_imports(run_dir, overrides: list[str] | None, saved: dict | None) -> None:
    """Refuse, before any module is imported, a resume whose ``config.yaml`` (plus ``overrides``) names
    ``imports`` that the config recorded in the checkpoint (``saved``) does not: importing runs a module's
    code, so an edited ``imports`` must not run before the drift check would refuse it. ``--import``
    modules given on the command line are the user's own and not checked here."""
    if not isinstance(saved, dict):
        return
    raw = read_raw_config(Path(run_dir) / "config.yaml")  # YAML only: nothing is imported
    if overrides:
        raw = apply_overrides(raw, overrides)
    have = saved.get("imports") if isinstance(saved.get("imports"), list) else []
    now = raw.get("imports") if isinstance(raw.get("imports"), list) else []
    added = [m for m in now if m not in have and m not in _CLI_IMPORTS]
    if added:
        raise ConfigError(f"{run_dir}: config.yaml or the overrides add imports {added} that the checkpoint's "
                          f"config does not have (it has {have}); nothing was imported. A resume may not change "
                          "imports; start a new run for that")


def resume_drift(saved: dict, now: dict) -> str | None:
    """Why the config ``now`` may not resume a checkpoint written under ``saved`` (None if it may).

    Both are :func:`config_to_dict` forms. Keys in :data:`RESUMABLE_KEYS` may differ, except that the
    duration may only grow within its unit; every other changed key is listed.
    """
    a, b = _flatten(saved), _flatten(now)
    changed = []
    for key in sorted(set(a) | set(b), key=lambda k: (k not in a, list(a).index(k) if k in a else 0, k)):
        va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
        if json.dumps(va, sort_keys=True, default=str) == json.dumps(vb, sort_keys=True, default=str):
            continue
        if key == "duration":
            da, db = parse_duration(va), parse_duration(vb)
            if da.unit == db.unit and db.value >= da.value:
                continue
            changed.append(f"duration ({va} -> {vb}: a resume may only extend it, in the same unit)")
            continue
        if any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_KEYS):
            continue
        changed.append(f"{key} ({va!r} -> {vb!r})")
    if not changed:
        return None
    return ("config.yaml or the overrides differ from the config the checkpoint was written with: "
            + "; ".join(changed) + ". A resume may change only duration (longer), eval.every, "
            "checkpoint.every, log.* and monitors, e.g. 'sgdlab resume RUN duration=\"300 epochs\"'; start a new run "
            "for anything else")


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
        raise ConfigError(_format_validation(e, raw)) from None
    except (RecursionError, OverflowError, ValueError) as e:  # a pathological dict passed in directly
        raise ConfigError(f"config: {' '.join(str(e).split())[:200]}") from None
    _check_semantics(cfg)
    _fill_builder_defaults(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain-data form of a config (durations as text), suitable for YAML."""
    d = cfg.model_dump(mode="json")
    d["duration"] = str(cfg.duration)
    return d


def dry_build(cfg: Config) -> None:
    """Build ``cfg``'s model (on the meta device, no memory) and its sampler (on a stand-in dataset size).

    Option *values* that only the builders check (a WRN depth that is not 6n+4, an unknown SRS order)
    become a :class:`ConfigError` now, before a sweep starts any trial, instead of failing each trial.
    """
    import torch

    from .. import models, sampling

    num_classes = 100 if cfg.data.name == "cifar100" else 10
    try:
        with torch.device("meta"):
            model = models.create(cfg.model.name, num_classes=num_classes, **cfg.model.extras())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model ({cfg.model.name}, options {cfg.model.extras()}): {e}") from None
    n = max(50_000, 10 * cfg.sampler.batch_size)
    ctx = sampling.SourceContext(num_samples=n, batch_size=cfg.sampler.batch_size, seed=cfg.seed, model=model,
                                 loss=cfg.loss.name)
    try:
        sampling.create(cfg.sampler.name, ctx, **cfg.sampler.extras())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampler ({cfg.sampler.name}, options {cfg.sampler.extras()}): {e}") from None
