"""Every ```python and ```bash block of README.md and docs/*.md runs as written.

Convention (the docs rely on it):

- a python block runs as a standalone script in a fresh process; a bash block runs with ``bash -e``;
- the working directory is a fresh temporary directory in which ``configs`` and ``studies`` are symlinks
  to the repository's, with the interpreter's ``bin`` directory first on ``PATH`` (so ``sgdlab`` and
  ``python`` are the project's);
- a block whose immediately preceding line is ``<!-- skip: REASON -->`` is not run, and one preceded by
  ``<!-- slow -->`` runs only under ``-m slow``;
- output examples and anything not meant to run go in ```text blocks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->$")
SLOW = re.compile(r"^<!--\s*slow\s*-->$")
TIMEOUT_S = 300


@dataclass
class CodeBlock:
    path: Path
    line: int          # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[CodeBlock]:
    """The fenced blocks of a Markdown file with their markers (``lang`` is the fence's info string)."""
    lines = path.read_text().splitlines()
    blocks: list[CodeBlock] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{start + 1}: unclosed code fence")
        prev = lines[start - 1].strip() if start > 0 else ""
        skip = SKIP.match(prev)
        blocks.append(CodeBlock(path, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                                skip=skip.group(1) if skip else None, slow=bool(SLOW.match(prev))))
        i = j + 1
    return blocks


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _params():
    out = []
    for path in doc_files():
        for b in parse_blocks(path):
            if b.lang not in ("python", "bash"):
                continue
            marks = []
            if b.skip:
                marks.append(pytest.mark.skip(reason=b.skip))
            elif b.slow:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(b, id=b.id, marks=marks))
    return out


@pytest.mark.parametrize("block", _params())
def test_block_runs(block: CodeBlock, tmp_path):
    for name in ("configs", "studies"):
        if (ROOT / name).exists():
            (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    if block.lang == "python":
        script = tmp_path / "block.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-e", "-c", block.code]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, (f"{block.id} ({block.lang}) exited {r.returncode}\n--- code\n{block.code}"
                               f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")


def test_parser_reads_markers(tmp_path):
    """The parser finds blocks, their 1-based fence lines, languages and skip/slow markers."""
    doc = tmp_path / "x.md"
    doc.write_text("# t\n<!-- skip: needs CIFAR -->\n```bash\necho a\n```\n\n<!-- slow -->\n```python\n"
                   "print(1)\n```\n```text\nout\n```\n```python\nx = 1\n```\n")
    b = parse_blocks(doc)
    assert [(x.line, x.lang, x.skip, x.slow) for x in b] == [
        (3, "bash", "needs CIFAR", False), (8, "python", None, True), (11, "text", None, False),
        (14, "python", None, False)]
    assert b[0].code == "echo a\n" and b[3].code == "x = 1\n"


def test_readme_quickstart_is_skipped_and_matches_ci():
    """The README's Quickstart block is the command sequence that CI runs."""
    readme = parse_blocks(ROOT / "README.md")
    quick = next(b for b in readme if b.lang == "bash")
    assert quick.skip, "the Quickstart block installs the project: it must be marked skip"
    ci = (ROOT / ".ci" / "run").read_text()
    for needle in ("python3 -m venv .venv", "pip install --quiet torch==2.13.0", 'pip install --quiet -e ".[dev]"',
                   ".venv/bin/python -m pytest -q"):
        assert needle in ci
    lines = quick.code.strip().splitlines()
    assert lines[0].startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
    assert '.venv/bin/pip install -e ".[dev]"' in lines[0] and lines[0].endswith("sgdlab study all --quick")
    assert lines[1] == ".venv/bin/python -m pytest -q"
