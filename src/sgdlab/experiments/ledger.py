"""The claims ledger: verdicts recomputed from the committed per-trial tables, and their rendering.

``results/<study>/`` holds ``protocol.yaml`` (the copy that ran), ``trials.csv`` (and ``pilot.csv``),
``context.json`` (protocol hash, commit, measurements) and, written here, ``verdicts.json`` and
``report.md``. :func:`refresh` recomputes every study's verdicts from those tables with one Holm
adjustment across all primary claims of the ledger; :func:`ledger_markdown` is the README's table
(``sgdlab ledger --markdown``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..files import write_text
from .protocol import Protocol, load_protocol

__all__ = ["LEDGER_HEADERS", "ledger_markdown", "ledger_rows", "load", "refresh", "rich_table", "study_dirs"]

LEDGER_HEADERS = ["study", "claim", "estimate", "95% CI", "SESOI", "seeds", "Holm p", "verdict"]


def study_dirs(root) -> list[Path]:
    """Subfolders of ``root`` holding a study's ``protocol.yaml`` and ``trials.csv``, by name.

    ConfigError if ``root`` is missing or not a folder (an empty folder has no studies)."""
    root = Path(root)
    if not root.is_dir():
        why = "is a file, not a folder" if root.exists() else "no such folder"
        raise ConfigError(f"{root}: {why} (the results folder that `sgdlab study NAME` writes)")
    return sorted(d for d in root.iterdir() if (d / "protocol.yaml").is_file() and (d / "trials.csv").is_file())


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return ""
    return f"{v:+.{digits}g}" if v != 0 else "0"


def refresh(root, only: Sequence[Path] | None = None, *, write: bool = True) -> dict[str, dict]:
    """Recompute the verdicts of every study under ``root`` (or the folders ``only``) from their tables;
    with ``write``, rewrite each ``verdicts.json`` and ``report.md``. Returns ``{study: result}``."""
    from .aggregate import read_json_object
    from .studies import finish, read_table, verdicts_from_tables

    dirs = list(only) if only is not None else study_dirs(root)
    protos: dict[str, Protocol] = {}
    results: dict[str, dict] = {}
    contexts: dict[str, dict] = {}
    for d in dirs:
        proto, _, sha = load_protocol(d / "protocol.yaml")
        ctx = read_json_object(d / "context.json") if (d / "context.json").is_file() else {}
        if ctx.get("protocol_sha256") not in (None, sha):
            raise ConfigError(f"{d}: protocol.yaml differs from the one that ran (hash {ctx['protocol_sha256'][:12]})")
        pilot = read_table(d / "pilot.csv") if (d / "pilot.csv").is_file() else None
        protos[proto.name] = proto
        results[proto.name] = verdicts_from_tables(proto, read_table(d / "trials.csv"), pilot,
                                                   quick=bool(ctx.get("quick")))
        contexts[proto.name] = dict(ctx, protocol_sha256=sha, dir=d)
        current = _shipped_sha(proto.name)
        if current is not None and current != sha:  # the shipped protocol was revised after this run
            for c in results[proto.name]["claims"]:
                c["stale"] = True
    alpha = min((p.alpha for p in protos.values()), default=0.05)
    finish(protos, results, alpha)
    if write:
        for name, r in results.items():
            ctx = dict(contexts[name])
            d = ctx.pop("dir")
            proto = protos[name]
            payload = {"study": name, "title": proto.title, "claim": proto.claim, "citation": proto.citation,
                       "regime": proto.regime, **ctx, "alpha": alpha,
                       "holm_over": sorted(protos) if len(protos) > 1 else [name],
                       "seeds": {"final": proto.seeds.final, "pilot": proto.seeds.pilot},
                       "selection": r["selection"], "ladders": r["ladders"], "verdicts": r["claims"]}
            write_text(d / "verdicts.json", json.dumps(payload, indent=2, default=str) + "\n")
            write_text(d / "report.md", study_markdown(proto, dict(payload, dir=d)))
    return results


def _shipped_sha(name: str) -> str | None:
    """The SHA-256 of the shipped ``studies/<name>.yaml``, or ``None`` for a study that is not shipped."""
    from .protocol import shipped

    if name not in shipped():
        return None
    return load_protocol(name)[2]


def load(root) -> list[dict]:
    """The ledger's primary claims from ``root`` (recomputed from the tables, nothing written)."""
    res = refresh(root, write=False)
    return [c for r in res.values() for c in r["claims"] if c["primary"]]


def _row(c: dict) -> list[str]:
    return [c["study"], c["claim"], _num(c["estimate"]), f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}]",
            f"{c['sesoi']:g}" + (f" (margin {c['margin']:g})" if c.get("margin") else "")
            + (" (log ratio)" if c.get("log") else ""), str(c["n"]),
            f"{c['p_holm']:.2g}" if c.get("p_holm") is not None else "",
            c["verdict"] + (" (earlier protocol: rerun)" if c.get("stale") else "")]


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
             f"Regime: {proto.regime}", "",
             f"Protocol SHA-256 `{payload['protocol_sha256']}`; code commit `{payload.get('commit', 'unknown')}`"
             + (f" (checkout at the end: `{payload['commit_at_end']}`)" if payload.get("commit_at_end") else "")
             + "; "
             f"final seeds {proto.seeds.final}; pilot seeds {proto.seeds.pilot or 'none'}"
             + ("; quick mode (pilot estimates, not verdicts)" if payload.get("quick") else "") + ".", ""]
    if payload.get("measurements"):
        lines += ["Measured: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                           for k, v in payload["measurements"].items()), ""]
    rows = [_row(c) + [c.get("note") or ""] for c in payload["verdicts"]]
    lines += ["## Verdicts", "", "Every verdict below is in the regime above.", "",
              _md(LEDGER_HEADERS + ["note"], rows)]
    if payload.get("ladders"):
        lines += ["## Ladders (largest rung with every rung up to it supported)", ""]
        lines += [f"- {k}: {v if v is not None else 'none'}" for k, v in payload["ladders"].items()] + [""]
    if payload.get("selection"):
        lines += ["## Choices made on the pilot seeds", ""]
        for k, v in payload["selection"].items():
            means = ", ".join(f"{a}: {m:.4g}" for a, m in v["pilot_means"].items())
            cands = list(v["pilot_means"])
            edge = (" It is the last candidate listed, so the best setting may lie beyond the candidates."
                    if len(cands) > 2 and v["arm"] == cands[-1] else
                    " It is the first candidate listed, so the best setting may lie before the candidates."
                    if len(cands) > 2 and v["arm"] == cands[0] else "")
            lines.append(f"- {k}: **{v['arm']}** (pilot means of {v['metric']}: {means}).{edge}")
        lines.append("")
    figs = sorted((Path(payload["dir"]) / "figures").glob("*.png")) if payload.get("dir") else []
    if figs:
        lines += ["## Figures (final seeds; median and 25-75% band)", ""]
        lines += [f"![{f.stem}](figures/{f.name})" for f in figs] + [""]
    lines += ["Statistics: paired t intervals over seeds, Holm adjustment across the ledger's primary claims "
              "(see docs/studies.md).", ""]
    return "\n".join(lines)
