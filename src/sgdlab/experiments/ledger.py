"""The claims ledger: verdicts recomputed from the committed per-trial tables, and their rendering.

``results/<study>/`` holds ``protocol.yaml`` (the copy that ran), ``trials.csv`` (and ``pilot.csv``),
``context.json`` (protocol hash, commit, measurements) and, written here, ``verdicts.json`` and
``report.md``. :func:`refresh` recomputes every study's verdicts from those tables with one Holm
adjustment across all primary claims of the ledger; :func:`ledger_markdown` is the README's table
(``sgdlab ledger --markdown``). Every table is validated on read
(:func:`~sgdlab.experiments.verdicts.validate_table`), a study folder without its ``protocol.yaml`` is an
error, and a study with pilot selections needs its ``pilot.csv``.

Earlier full runs are kept under ``results/<study>/history/`` (:func:`archive`, :func:`history`): each
``NN.json`` holds a superseded run's verdicts, protocol hash, commit and why it was replaced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..files import write_text
from .aggregate import read_json_object
from .protocol import Protocol, load_protocol
from .verdicts import finish, read_table, verdicts_from_tables

__all__ = ["LEDGER_HEADERS", "archive", "history", "history_markdown", "ledger_markdown", "ledger_rows", "load",
           "refresh", "rich_table", "study_dirs"]

LEDGER_HEADERS = ["study", "claim", "estimate", "95% CI", "SESOI", "seeds", "Holm p", "verdict", "earlier runs"]
_ARTIFACTS = ("protocol.yaml", "trials.csv", "pilot.csv", "context.json", "verdicts.json")


def study_dirs(root) -> list[Path]:
    """Subfolders of ``root`` holding a study's ``protocol.yaml`` and ``trials.csv``, by name.

    ConfigError if ``root`` is missing or not a folder (an empty folder has no studies), and for a
    subfolder holding some of a study's artifacts but not its ``protocol.yaml`` or ``trials.csv``: a
    study silently dropped would change every other study's Holm p-values."""
    root = Path(root)
    if not root.is_dir():
        why = "is a file, not a folder" if root.exists() else "no such folder"
        raise ConfigError(f"{root}: {why} (the results folder that `sgdlab study NAME` writes)")
    out = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        have = [a for a in _ARTIFACTS if (d / a).exists()]
        if not have:
            continue
        for need in ("protocol.yaml", "trials.csv"):
            if not (d / need).is_file():
                raise ConfigError(f"{d / need}: missing, but {d} holds {', '.join(have)} (a damaged study; "
                                  f"restore it or remove the folder)")
        out.append(d)
    return out


def _finite(obj):
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dump(obj) -> str:
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n"


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return ""
    return f"{v:+.{digits}g}" if v != 0 else "0"


def refresh(root, only: Sequence[Path] | None = None, *, write: bool = True) -> dict[str, dict]:
    """Recompute the verdicts of every study under ``root`` (or the folders ``only``) from their tables;
    with ``write``, rewrite each ``verdicts.json`` and ``report.md``. Returns ``{study: result}``."""
    dirs = list(only) if only is not None else study_dirs(root)
    protos: dict[str, Protocol] = {}
    results: dict[str, dict] = {}
    contexts: dict[str, dict] = {}
    for d in dirs:
        proto, _, sha = load_protocol(d / "protocol.yaml")
        ctx = read_json_object(d / "context.json") if (d / "context.json").is_file() else {}
        if ctx.get("protocol_sha256") not in (None, sha):
            raise ConfigError(f"{d}: protocol.yaml differs from the one that ran (hash {ctx['protocol_sha256'][:12]})")
        quick = bool(ctx.get("quick"))
        if proto.name in protos:
            raise ConfigError(f"{d / 'protocol.yaml'}: study {proto.name!r} appears twice in {root}")
        final_seeds = (proto.quick.seeds or proto.seeds.pilot) if quick else proto.seeds.final
        pilot = None
        if (d / "pilot.csv").is_file():
            pilot = read_table(d / "pilot.csv", proto, proto.seeds.pilot)
        elif proto.select and not quick:
            raise ConfigError(f"{d / 'pilot.csv'}: missing; {proto.name}'s selections "
                              f"({', '.join(proto.select)}) are made on the pilot seeds, never on the final ones")
        proto, amend = _amend(proto, d, sha)
        protos[proto.name] = proto
        results[proto.name] = verdicts_from_tables(proto, read_table(d / "trials.csv", proto, final_seeds), pilot,
                                                   quick=quick)
        if amend:
            for c in results[proto.name]["claims"]:
                patch = amend["claims"].get(c["id"])
                if patch:
                    c["post_hoc"] = sorted(patch)
                    c["misspecified"] = patch.get("misspecified")
            ctx = dict(ctx, amendments=amend)
        contexts[proto.name] = dict(ctx, protocol_sha256=sha, dir=d)
        shipped_proto = _shipped(proto.name)
        if shipped_proto is not None and shipped_proto[1] != sha:  # the shipped protocol was revised after this run
            for c in results[proto.name]["claims"]:
                c["stale"] = True
                c["ran_version"], c["shipped_version"] = proto.version, shipped_proto[0].version
        results[proto.name]["earlier_runs"] = len(history(d))
    alpha = min((p.alpha for p in protos.values()), default=0.05)
    finish(protos, results, alpha)
    if write:
        for name, r in results.items():
            ctx = dict(contexts[name])
            d = ctx.pop("dir")
            proto = protos[name]
            payload = {"study": name, "title": proto.title, "claim": proto.claim, "citation": proto.citation,
                       "regime": proto.regime_that_ran(True) if ctx.get("quick") else proto.regime, **ctx,
                       "alpha": alpha,
                       "holm_over": sorted(protos) if len(protos) > 1 else [name],
                       "seeds": {"final": proto.seeds.final, "pilot": proto.seeds.pilot},
                       "version": proto.version, "earlier_runs": r["earlier_runs"],
                       "selection": r["selection"], "ladders": r["ladders"], "verdicts": r["claims"]}
            write_text(d / "verdicts.json", _dump(payload))
            write_text(d / "report.md", study_markdown(proto, dict(_finite(payload), dir=d)))
    return results


_AMENDABLE = ("predicted", "matched", "floor", "misspecified")


def _amend(proto: Protocol, d: Path, ran: str) -> tuple[Protocol, dict | None]:
    """Apply ``d/amendments.yaml``: post-hoc readings of a run's committed tables under the verdict guards,
    added after the run (so never part of its pre-registered protocol, whose hash stays what ran).

    The file holds ``protocol_sha256`` (the hash of the run it reads: a later run's tables are never read
    with an earlier run's amendments), ``reason`` and ``claims: {id: {predicted | matched | floor |
    misspecified}}``; every amended verdict is flagged "post-hoc" in the ledger, and ``misspecified`` (a
    sentence) marks a check or claim whose registered form cannot test what it names. A new full run moves
    the file to ``history/`` with the run it read (:func:`archive`)."""
    import hashlib

    import yaml
    from pydantic import ValidationError

    from .protocol import Claim

    path = d / "amendments.yaml"
    if not path.is_file():
        return proto, None
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("reason"), str) or not isinstance(raw.get("claims"), dict):
        raise ConfigError(f"{path}: expected a mapping with 'protocol_sha256', 'reason' (text) and 'claims' "
                          "(id -> fields)")
    if raw.get("protocol_sha256") != ran:
        raise ConfigError(f"{path}: protocol_sha256 must be the hash of the run it reads ({ran[:12]}... in "
                          f"{d / 'protocol.yaml'}), got {str(raw.get('protocol_sha256'))[:12]!r}; amendments of an "
                          "earlier run belong in history/ beside it")
    ids = {c.id: c for c in proto.claims}
    claims = []
    for cid, patch in raw["claims"].items():
        if cid not in ids:
            raise ConfigError(f"{path}: claims.{cid}: no such claim in {proto.name}")
        bad = [k for k in (patch or {}) if k not in _AMENDABLE]
        if not isinstance(patch, dict) or bad:
            raise ConfigError(f"{path}: claims.{cid}: only {', '.join(_AMENDABLE)} may be amended, got {bad or patch!r}")
    for c in proto.claims:
        patch = {k: v for k, v in (raw["claims"].get(c.id) or {}).items() if k != "misspecified"}
        if patch:
            try:
                c = Claim.model_validate({**c.model_dump(exclude={"treatment", "baseline"}), **patch})
            except ValidationError as e:
                err = e.errors()[0]
                raise ConfigError(f"{path}: claims.{c.id}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        claims.append(c)
    amended = proto.model_copy(update={"claims": claims})
    return amended, {"reason": raw["reason"], "sha256": hashlib.sha256(text.encode()).hexdigest(),
                     "claims": raw["claims"]}


def _shipped(name: str) -> tuple[Protocol, str] | None:
    """The shipped ``studies/<name>.yaml`` and its SHA-256, or ``None`` for a study that is not shipped."""
    from .protocol import shipped

    if name not in shipped():
        return None
    proto, _, sha = load_protocol(name)
    return proto, sha


def history(study_dir) -> list[dict]:
    """The superseded runs of a study, oldest first: ``study_dir/history/NN.json`` (see :func:`archive`)."""
    d = Path(study_dir) / "history"
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.glob("*.json")):
        run = read_json_object(f)
        for k in ("replaced_because", "verdicts"):
            if k not in run:
                raise ConfigError(f"{f}: a history entry needs {k!r}")
        out.append(dict(run, file=f.name))
    return out


def archive(study_dir, reason: str, *, replaced_by: str | None = None) -> Path | None:
    """Keep the current run of ``study_dir`` (its ``verdicts.json``) as the next ``history/NN.json`` with
    ``reason``; ``None`` when there is no run to keep. Called before a full run overwrites the results."""
    study_dir = Path(study_dir)
    v = study_dir / "verdicts.json"
    if not v.is_file():
        return None
    old = read_json_object(v)
    entry = {"run": len(history(study_dir)) + 1, "study": old.get("study", study_dir.name),
             "version": old.get("version", 1), "commit": old.get("commit"),
             "protocol_sha256": old.get("protocol_sha256"), "seeds": old.get("seeds"),
             "replaced_because": reason, "replaced_by": replaced_by,
             "verdicts": [{k: c.get(k) for k in ("id", "claim", "primary", "estimate", "ci_low", "ci_high", "n",
                                                  "p_holm", "verdict")} for c in old.get("verdicts", [])]}
    d = study_dir / "history"
    d.mkdir(exist_ok=True)
    path = d / f"{entry['run']:02d}.json"
    # the run's post-hoc readings and its pilot table belong to it: they leave with it (their contents are
    # copied by the link-safe writer, never renamed, so a link in results/ cannot carry into history/)
    moved = [f for f in (study_dir / "amendments.yaml", study_dir / "pilot.csv") if f.is_file()]
    for f in moved:
        write_text(d / f"{entry['run']:02d}-{f.name}", f.read_text())
        if f.name == "amendments.yaml":
            entry["amendments"] = f"{entry['run']:02d}-{f.name}"
    write_text(path, _dump(entry))
    for f in moved:
        f.unlink()
    return path


def history_markdown(root) -> str:
    """Every study's superseded runs (``sgdlab ledger --history``): per run its verdicts and why it was replaced."""
    lines = []
    for d in study_dirs(root):
        runs = history(d)
        lines.append(f"## {d.name}: {len(runs)} earlier run{'s' if len(runs) != 1 else ''}")
        for r in runs:
            sha = (r.get("protocol_sha256") or "none")[:12]
            what = r.get("design") or f"protocol v{r.get('version') or 1}"
            lines += ["", f"### run {r['run']}: {what} (protocol hash {sha}, commit "
                          f"{(r.get('commit') or 'unknown')[:12]})", "", f"Replaced because: {r['replaced_because']}", ""]
            if r.get("amendments"):
                lines += [f"Its verdicts include post-hoc readings (`history/{r['amendments']}`).", ""]
            rows = [[v.get("claim") or v.get("id") or "", _num(v.get("estimate")),
                     f"[{_num(v.get('ci_low'))}, {_num(v.get('ci_high'))}]", str(v.get("n") or ""),
                     v.get("verdict") or ""] for v in r["verdicts"]]
            lines.append(_md(["claim", "estimate", "95% CI", "seeds", "verdict"], rows).rstrip("\n"))
        lines.append("")
    return "\n".join(lines) + "\n" if lines else "_No study results yet._\n"


def load(root) -> list[dict]:
    """The ledger's primary claims from ``root`` (recomputed from the tables, nothing written); each
    carries ``earlier_runs``, the number of its study's superseded runs."""
    res = refresh(root, write=False)
    return [dict(c, earlier_runs=r["earlier_runs"]) for r in res.values() for c in r["claims"] if c["primary"]]


def _stale(c: dict) -> str:
    if not c.get("stale"):
        return ""
    ran, now = c.get("ran_version", 1), c.get("shipped_version", 1)
    if ran != now:
        return f" (ran protocol v{ran}; v{now} not yet run)"
    return " (earlier protocol: rerun)"


def _row(c: dict) -> list[str]:
    return [c["study"], c["claim"], _num(c["estimate"]), f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}]",
            f"{c['sesoi']:g}" + (f" (margin {c['margin']:g})" if c.get("margin") else "")
            + (f" (predicted {c['predicted']:g})" if c.get("predicted") is not None else "")
            + (" (log ratio)" if c.get("log") else ""), str(c["n"]),
            f"{c['p_holm']:.2g}" if c.get("p_holm") is not None else "",
            c["verdict"] + _stale(c), str(c.get("earlier_runs", 0))]


def ledger_rows(claims: Sequence[dict]) -> list[list[str]]:
    """Rows of :data:`LEDGER_HEADERS` for the claims."""
    return [_row(c) for c in claims]


def _md(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(x).replace("|", "\\|") for x in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines) + "\n"


def ledger_markdown(root) -> str:
    """The ledger as a Markdown table (the README's block between the ledger markers)."""
    claims = load(root)
    if not claims:
        return "_No study results yet: run `sgdlab study NAME` (see docs/studies.md)._\n"
    regimes = {}
    for d in study_dirs(root):
        proto = load_protocol(d / "protocol.yaml")[0]
        regimes[proto.name] = " ".join(proto.regime.split()).rstrip(".")
    lines = [f"- `{name}`: its verdicts hold in the regime {regimes[name]}."
             for name in dict.fromkeys(c["study"] for c in claims) if name in regimes]
    return _md(LEDGER_HEADERS, ledger_rows(claims)) + "\n" + "\n".join(lines) + "\n"


def rich_table(claims: Sequence[dict], title: str = "Claims ledger", pilot: bool = False):
    """A rich table of claims; ``pilot`` labels the estimates "pilot, not a verdict" and adds the
    committed verdict (``claim["committed"]``) beside them."""
    from rich.table import Table

    colours = {"supported": "green", "contradicted": "red", "inconclusive": "yellow",
               "no effect of the claimed size": "cyan"}
    table = Table(title=title)
    headers = (["study", "claim", "pilot estimate", "pilot 95% CI", "seeds", "pilot, not a verdict",
                "committed verdict (results/)"] if pilot else LEDGER_HEADERS)
    for h in headers:
        table.add_column(h, overflow="fold")
    for c in claims:
        if pilot:
            table.add_row(c["study"], c["claim"], _num(c["estimate"]), f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}]",
                          str(c["n"]), f"[dim]{c['verdict']}[/]", c.get("committed") or "not run yet")
        else:
            r = _row(c)
            r[-1] = f"[{colours.get(c['outcome'], 'white')}]{r[-1]}[/]"
            table.add_row(*r)
    return table


def study_markdown(proto: Protocol, payload: dict) -> str:
    """A study's ``report.md``: claim, regime, protocol hash and commit, verdicts, ladders, selections."""
    lines = [f"# Study `{proto.name}`: {proto.title}", "",
             f"Claim (paper's words): {proto.claim}", "", f"Source: {proto.citation}", "",
             f"Regime: {payload.get('regime') or proto.regime}", "",
             f"Protocol SHA-256 `{payload['protocol_sha256']}`; code commit `{payload.get('commit', 'unknown')}`"
             + (f" (checkout at the end: `{payload['commit_at_end']}`)" if payload.get("commit_at_end") else "")
             + "; "
             f"final seeds {proto.seeds.final}; pilot seeds {proto.seeds.pilot or 'none'}"
             + ("; quick mode (pilot estimates, not verdicts)" if payload.get("quick") else "") + ".", ""]
    if payload.get("amendments"):
        am = payload["amendments"]
        lines += [f"Post-hoc readings (`amendments.yaml`, SHA-256 `{am['sha256'][:12]}`, added after the run; "
                  f"claims {', '.join(f'`{k}`' for k in am['claims'])}): {' '.join(am['reason'].split())}", ""]
    if payload.get("earlier_runs"):
        lines += [f"Earlier runs: {payload['earlier_runs']} (`history/`; `sgdlab ledger --history`).", ""]
    if payload.get("measurements"):
        lines += ["Measured: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                           for k, v in payload["measurements"].items()), ""]
    rows = [_row(dict(c, earlier_runs=payload.get("earlier_runs", 0))) + [c.get("note") or ""]
            for c in payload["verdicts"]]
    lines += ["## Verdicts", "", "Every verdict below is in the regime above.", "",
              _md(LEDGER_HEADERS + ["note"], rows)]
    if payload.get("ladders"):
        lines += ["## Ladders (largest rung with every rung up to it supported)", ""]
        lines += [f"- {k}: {v if v is not None else 'none'}" for k, v in payload["ladders"].items()] + [""]
    if payload.get("selection"):
        lines += ["## Choices made on the pilot seeds", ""]
        for k, v in payload["selection"].items():
            means = ", ".join(f"{a}: {m:.4g}" if m is not None else f"{a}: not finite"
                              for a, m in v["pilot_means"].items())
            edge = {"high": " It is the last point of the grid, so the optimum is not bracketed: claims on it "
                            "are inconclusive.",
                    "low": " It is the first point of the grid, so the optimum is not bracketed: claims on it "
                           "are inconclusive."}.get(v.get("edge"), "")
            lines.append(f"- {k}: **{v['arm']}** (pilot means of {v['metric']}: {means}).{edge}")
        lines.append("")
    figs = sorted((Path(payload["dir"]) / "figures").glob("*.png")) if payload.get("dir") else []
    if figs:
        lines += ["## Figures (final seeds; median and 25-75% band)", ""]
        lines += [f"![{f.stem}](figures/{f.name})" for f in figs] + [""]
    lines += ["Statistics: paired t intervals over seeds, Holm adjustment across the ledger's primary claims "
              "(see docs/studies.md).", ""]
    return "\n".join(lines)
