"""Study protocols: the pre-registration of a study as a YAML file (``studies/<name>.yaml``).

A protocol fixes, before anything runs: the claim in the paper's words with its citation, the regime
it is tested in, the base config, the arms (dotted-key overrides of the base), the seeds (final and
pilot, disjoint; ``seed_keys`` lists config keys that follow the trial seed, e.g. ``data.seed`` for a
fresh dataset draw per seed), the claims (metric, arms contrasted, direction, smallest effect of interest),
the worst value standing in for a diverged trial, and the quick-mode settings. Its SHA-256 is
written into every result, so a verdict names the exact protocol it answers. The fields are
documented in ``docs/studies.md``; :class:`Protocol` validates them with one-line errors.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..files import name_problem

__all__ = ["Claim", "Floor", "Ladder", "Matched", "Protocol", "find_protocol", "load_protocol", "shipped",
           "studies_dir"]

DEFAULT_WORST = {"test_error": 1.0, "test_acc": 0.0, "train_eval_acc": 0.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _seed_list(v: Any) -> list[int]:
    """Seeds as a list, or ``"a-b"`` (inclusive range)."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", v)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise ValueError(f"seeds {v!r}: expected a list or 'first-last'")
        return list(range(int(m.group(1)), int(m.group(2)) + 1))
    return [int(s) for s in v]


class Seeds(_Strict):
    """``final``: the seeds of the verdict; ``pilot``: for choices made before the final run (never reused)."""

    final: list[int]
    pilot: list[int] = Field(default_factory=list)

    @field_validator("final", "pilot", mode="before")
    @classmethod
    def _expand(cls, v):
        return _seed_list(v)

    @model_validator(mode="after")
    def _disjoint(self):
        if len(self.final) < 2:
            raise ValueError("seeds.final: a paired interval needs at least 2 seeds")
        for name, lst in (("final", self.final), ("pilot", self.pilot)):
            if len(set(lst)) != len(lst):
                raise ValueError(f"seeds.{name}: repeated seeds")
        both = sorted(set(self.final) & set(self.pilot))
        if both:
            raise ValueError(f"seeds: pilot seeds {both} are also final seeds; pilot seeds are never reused")
        return self


class Arm(_Strict):
    """One arm: a label, dotted-key overrides; ``vary`` expands it into one arm per combination, the label
    formatted with the last part of each varied key (``"plain lr={lr}"``)."""

    label: str
    set: dict[str, Any] = Field(default_factory=dict)
    vary: dict[str, list[Any]] = Field(default_factory=dict)
    quick: dict[str, Any] = Field(default_factory=dict)

    def expand(self) -> list[tuple[str, dict]]:
        if not self.vary:
            return [(self.label, dict(self.set))]
        keys = list(self.vary)
        out = []
        for combo in itertools.product(*(self.vary[k] for k in keys)):
            names = {k.split(".")[-1]: v for k, v in zip(keys, combo)}
            try:
                label = self.label.format(**names)
            except (KeyError, IndexError) as e:
                raise ConfigError(f"arm {self.label!r}: label names {e} which is not a varied key") from None
            out.append((label, dict(self.set, **dict(zip(keys, combo)))))
        return out


class Matched(_Strict):
    """A claim's matching condition: its arms are compared where ``metric`` agrees within ``tolerance``
    (an absolute difference, or of natural logs with ``log``); the study refuses to decide when the mean
    per-seed difference of the contrast's arms exceeds it (on the pilot seeds when they ran those arms)."""

    metric: str
    tolerance: float = Field(gt=0)
    log: bool = True


class Floor(_Strict):
    """A claim's floor check: ``early`` is the same quantity measured well before the claim's measurement
    point; an arm whose median improvement from ``early`` to the claim's metric is below ``tolerance`` (a
    log ratio) has stopped improving, and the verdict is flagged "metric at a floor"."""

    early: str
    tolerance: float = Field(0.0953, gt=0)


class Claim(_Strict):
    """One claim: a per-seed value (a contrast of arms, or a per-seed slope) and its decision rule.

    ``contrast`` maps arm labels (or ``@selection``) to coefficients; ``treatment``/``baseline`` is the
    shorthand for ``{treatment: 1, baseline: -1}``. ``kind: optimum_slope`` fits, within each seed,
    the metric against ``log2(x)`` per cell of the ``factors`` (a parabola; its vertex in the grid
    range, else the best grid point), and regresses ``log2`` of the optimum on ``log2`` of every factor:
    the per-seed value is the coefficient of ``slope_of``. ``log: true`` contrasts natural logs of the
    metric (a relative effect: SESOI ``log(1.1)`` is 10%).
    """

    id: str
    text: str
    metric: str
    kind: Literal["contrast", "optimum_slope"] = "contrast"
    contrast: dict[str, float] = Field(default_factory=dict)
    treatment: str | None = None
    baseline: str | None = None
    direction: Literal["higher", "lower"]
    sesoi: float = Field(gt=0)
    margin: float | None = Field(None, gt=0)
    log: bool = False
    primary: bool = True
    ladder: str | None = None
    at: float | None = None
    x: str | None = None
    factors: list[str] = Field(default_factory=list)
    slope_of: str | None = None
    among: str | None = None
    maximize: bool = True
    predicted: float | None = None
    matched: Matched | None = None
    floor: Floor | None = None
    # the id of this protocol's manipulation check (a secondary claim): unless that check is supported, this
    # claim does not test what it says, and its verdict is flagged misspecified
    requires: str | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.predicted is not None and self.margin is not None:
            raise ValueError(f"claim {self.id}: give predicted or margin, not both")
        if self.kind == "contrast":
            if self.treatment or self.baseline:
                if not (self.treatment and self.baseline) or self.contrast:
                    raise ValueError(f"claim {self.id}: give treatment and baseline, or contrast, not both")
                self.contrast = {self.treatment: 1.0, self.baseline: -1.0}
            if not self.contrast:
                raise ValueError(f"claim {self.id}: needs contrast (or treatment and baseline)")
        else:
            if not (self.x and self.factors and self.slope_of in self.factors):
                raise ValueError(f"claim {self.id}: optimum_slope needs x, factors and slope_of (one of the factors)")
        if self.ladder is not None and self.at is None:
            raise ValueError(f"claim {self.id}: a ladder claim needs at (its rung, e.g. k)")
        return self

    @property
    def sign(self) -> int:
        return 1 if self.direction == "higher" else -1


class Ladder(_Strict):
    """Extend an ordered selection's grid on the pilot seeds: while the best candidate is the first or last,
    add a rung beyond it (``key`` multiplied, or divided at the low end, by ``factor``), until the best is
    interior, the new extreme diverges, or ``max_rungs`` rungs were added at that end."""

    key: str
    factor: float = Field(2.0, gt=1)
    max_rungs: int = Field(4, ge=1, le=20)


class Select(_Strict):
    """Choose one arm among ``candidates`` on the pilot seeds: the best mean of ``metric`` (a diverged or
    non-finite arm never wins). ``ordered`` (default: more than two candidates) says the candidates are a
    grid in order; a choice at its first or last point is not bracketed and the claims on it are
    inconclusive, unless ``ladder`` extends the grid (:class:`Ladder`)."""

    candidates: list[str]
    metric: str
    direction: Literal["higher", "lower"]
    ordered: bool | None = None
    ladder: Ladder | None = None

    @property
    def is_ordered(self) -> bool:
        return self.ordered if self.ordered is not None else len(self.candidates) > 2


class Metric(_Strict):
    """A metric computed from a trial's logged rows (see ``docs/studies.md``)."""

    kind: Literal["first_below", "at_fraction", "mean", "forward_equivalents"]
    of: str | None = None
    after: float = Field(0.0, ge=0, lt=1)
    x: Literal["step", "time", "epoch"] = "step"
    target: float | None = None
    fraction: float | None = Field(None, gt=0, le=1)
    batch: int | None = None
    presample: int | None = None
    # the value of a trial that completed without ever logging ``of`` (``is_active``, logged only by the
    # importance sampler: 0 for an arm that never samples by importance); None leaves the metric undefined
    missing: float | None = None


class Analysis(_Strict):
    """A diagnostic of each final model on its first ``samples`` training examples: ``sharpness`` (Keskar
    et al. 2017, box ``eps``), ``hessian_top`` (top Hessian eigenvalue; with it, ``eos_ratio`` = eigenvalue
    x lr / 2, its level against the edge of stability 2/lr of Cohen et al. 2021) or ``adaptive_sharpness``
    (Kwon et al., ASAM, ICML 2021: the loss rise of one ascent step of radius ``eps`` in the metric scaled
    elementwise by ``|w|``, invariant to the rescalings of ReLU layers that change Keskar's measure)."""

    kind: Literal["sharpness", "hessian_top", "adaptive_sharpness"]
    samples: int = Field(1000, gt=0)
    eps: float = Field(1e-3, gt=0)


class Measure(_Strict):
    """``cost_ratio``: time backward and forward of the base model on a batch; gives ``cost_ratio`` r and
    ``tau_th = (B + (1 + r) b) / ((1 + r) b)`` (Katharopoulos & Fleuret, eq. 26 with r measured)."""

    batch_size: int = Field(gt=0)
    presample: int = Field(gt=0)
    repeats: int = Field(30, gt=0)


class Quick(_Strict):
    """Quick mode: runs on the pilot seeds (or ``seeds``) with ``set`` applied to every arm; ``arms``
    keeps only those arms (claims on other arms are left out of quick mode)."""

    seeds: list[int] | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    arms: list[str] | None = None

    @field_validator("seeds", mode="before")
    @classmethod
    def _expand(cls, v):
        return None if v is None else _seed_list(v)


class Protocol(_Strict):
    """A study's pre-registration (module doc). ``arms`` expand to labelled grid points of ``base``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: int = Field(1, ge=1)
    title: str
    claim: str
    citation: str
    regime: str
    estimate: str = ""
    base: dict[str, Any]
    arms: list[Arm]
    seeds: Seeds
    seed_keys: list[str] = Field(default_factory=list)
    claims: list[Claim]
    select: dict[str, Select] = Field(default_factory=dict)
    metrics: dict[str, Metric] = Field(default_factory=dict)
    analyses: list[Analysis] = Field(default_factory=list)
    measure: Measure | None = None
    worst: dict[str, float] = Field(default_factory=dict)
    record: list[str] = Field(default_factory=list)
    alpha: float = Field(0.05, gt=0, lt=1)
    chance: float = Field(0.1, ge=0, lt=1)
    quick: Quick = Field(default_factory=Quick)
    notes: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        problem = name_problem(v)  # the pattern lets '.' and '..' through; the name is the folder results/<name>/
        if problem is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        labels = [lab for a in self.arms for lab, _ in a.expand()]
        for k in self.seed_keys:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", k):
                raise ValueError(f"seed_keys: {k!r} is not a dotted config key such as 'data.seed'")
            clash = [lab for a in self.arms for lab, over in a.expand() if k in over]
            if clash:
                raise ValueError(f"seed_keys: {k!r} is also set by arm {clash[0]!r}; it follows the seed")
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"arms: repeated labels {dup}")
        for name, sel in self.select.items():
            bad = [c for c in sel.candidates if c not in labels]
            if bad:
                raise ValueError(f"select.{name}: unknown arms {bad}")
            if not self.seeds.pilot:
                raise ValueError(f"select.{name}: choosing on pilot seeds needs seeds.pilot")
        if self.quick.arms is not None:
            bad = [a for a in self.quick.arms if a not in labels]
            if bad:
                raise ValueError(f"quick.arms: unknown arms {bad}")
        ids = [c.id for c in self.claims]
        if len(set(ids)) != len(ids):
            raise ValueError("claims: repeated ids")
        for c in self.claims:
            for arm in c.contrast:
                if arm.startswith("@"):
                    if arm[1:] not in self.select:
                        raise ValueError(f"claim {c.id}: {arm} names no selection")
                elif arm not in labels:
                    raise ValueError(f"claim {c.id}: unknown arm {arm!r}")
            if c.metric not in self.worst and c.metric not in DEFAULT_WORST:
                raise ValueError(f"claim {c.id}: give worst.{c.metric} (the value a diverged trial counts as)")
            if c.matched is not None and len([a for a, k in c.contrast.items() if k]) != 2:
                raise ValueError(f"claim {c.id}: matched needs a two-arm contrast (treatment and baseline)")
            if c.requires is not None:
                check = next((d for d in self.claims if d.id == c.requires), None)
                if check is None or check is c or check.primary or check.requires is not None:
                    raise ValueError(f"claim {c.id}: requires names {c.requires!r}, which must be another claim of "
                                     "this protocol, secondary (primary: false) and itself without requires")
        for name, sel in self.select.items():
            if sel.ladder is not None and not sel.is_ordered:
                raise ValueError(f"select.{name}: a ladder needs ordered candidates")
            if sel.ladder is not None:
                over = dict(self.arm_list())
                bad = [c for c in sel.candidates if not isinstance(over[c].get(sel.ladder.key), (int, float))]
                if bad:
                    raise ValueError(f"select.{name}: ladder key {sel.ladder.key!r} is not a number set by arm {bad[0]!r}")
        return self

    def regime_that_ran(self, quick: bool = False) -> str:
        """The regime the trials ran in, one line: :attr:`regime`, or in quick mode the quick settings
        (``quick.set``, the arms' own quick settings, the seeds and arms) followed by the protocol's regime
        they shorten, so that a pilot never reads as if it had run the full protocol."""
        regime = " ".join(self.regime.split()).rstrip(". ")
        if not quick:
            return regime
        sets = [f"{k}={v}" for k, v in self.quick.set.items()]
        sets += [f"{a.label or 'an arm'}: {', '.join(f'{k}={v}' for k, v in a.quick.items())}"
                 for a in self.arms if a.quick]
        seeds = self.quick.seeds or self.seeds.pilot or []
        ran = "; ".join(filter(None, ["; ".join(sets), f"seeds {', '.join(map(str, seeds))}" if seeds else "",
                                      f"arms {', '.join(self.quick.arms)}" if self.quick.arms else ""]))
        return f"quick mode ({ran or 'the protocol settings'}), a pilot of the protocol's regime: {regime}"

    def arm_list(self, quick: bool = False) -> list[tuple[str, dict]]:
        """``(label, overrides)`` of every arm; in quick mode ``quick.set`` first, the arm's ``quick`` last."""
        out = []
        for a in self.arms:
            for label, over in a.expand():
                if quick and self.quick.arms is not None and label not in self.quick.arms:
                    continue
                out.append((label, dict(self.quick.set, **over, **a.quick) if quick else over))
        return out

    def ladder_arm(self, select: str, edge: str, rung: int) -> tuple[str, dict]:
        """``(label, overrides)`` of ladder rung ``rung`` (1, 2, ...) beyond the ``edge`` ("low" or "high")
        candidate of selection ``select``: the edge arm with the ladder key divided or multiplied by
        ``factor ** rung``."""
        sel = self.select[select]
        lad = sel.ladder
        label = sel.candidates[0 if edge == "low" else -1]
        over = dict(dict(self.arm_list())[label])
        value = float(over[lad.key]) * (lad.factor ** (rung if edge == "high" else -rung))
        over[lad.key] = float(f"{value:.6g}")
        return f"{label} [ladder {lad.key.split('.')[-1]}={over[lad.key]:g}]", over

    def worst_value(self, metric: str) -> float:
        return float(self.worst.get(metric, DEFAULT_WORST.get(metric, float("nan"))))


def studies_dir() -> Path | None:
    """The shipped protocols: ``studies/`` of the source tree this package runs from, else the copy a
    wheel installs under ``<prefix>/share/sgdlab/studies`` (``pyproject.toml``'s data-files)."""
    import site
    import sysconfig

    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "studies"
        if cand.is_dir() and (parent / "pyproject.toml").is_file():
            return cand
    for prefix in filter(None, (sysconfig.get_paths()["data"], site.USER_BASE)):
        cand = Path(prefix) / "share" / "sgdlab" / "studies"
        if cand.is_dir():
            return cand
    return None


def shipped() -> list[str]:
    """Names of the shipped protocols, in the order ``study all`` runs them (cheapest first)."""
    d = studies_dir()
    if d is None:
        return []
    order = (d / "ORDER").read_text().split() if (d / "ORDER").is_file() else []
    found = sorted(p.stem for p in d.glob("*.yaml"))
    return [n for n in order if n in found] + [n for n in found if n not in order]


def find_protocol(name_or_path: str | Path) -> Path:
    """A protocol file from a path, or a shipped study's name (``./studies/NAME.yaml`` first)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"protocol {str(p)!r}: no such file")
        return p
    for d in (Path("studies"), studies_dir()):
        if d is not None and (d / f"{p.name}.yaml").is_file():
            return d / f"{p.name}.yaml"
    known = ", ".join(shipped())
    raise ConfigError(f"unknown study {str(name_or_path)!r}; known: {known or 'none'} (or 'all', or a .yaml path)")


def _friendly(e: ValidationError, path: Path) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {loc + ': ' if loc else ''}{msg}"


def load_protocol(name_or_path: str | Path) -> tuple[Protocol, str, str]:
    """``(protocol, text, sha256)`` of a protocol file or shipped study name; bad fields raise ConfigError."""
    path = find_protocol(name_or_path)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a protocol is a YAML mapping")
    try:
        proto = Protocol.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_friendly(e, path)) from None
    return proto, text, hashlib.sha256(text.encode()).hexdigest()
