"""The README's claims-ledger table is generated: it must equal `sgdlab ledger --markdown` on results/."""

from pathlib import Path

from sgdlab.experiments.ledger import ledger_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_ledger_matches_results():
    text = (ROOT / "README.md").read_text()
    start, end = "<!-- ledger:start -->", "<!-- ledger:end -->"
    assert start in text and end in text, "README.md lacks the ledger markers"
    table = text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"
    assert table == ledger_markdown(ROOT / "results"), (
        "README.md's ledger differs from `sgdlab ledger --markdown`; paste that command's output between the markers")


def test_a_result_under_a_revised_protocol_is_marked(tmp_path):
    import hashlib
    import json
    import shutil

    import pytest

    from sgdlab.experiments.ledger import load

    found = sorted(d for d in (ROOT / "results").iterdir() if (d / "trials.csv").is_file())
    if not found:
        pytest.skip("no committed results to copy")
    src = found[0]
    for edit in (False, True):
        dst = tmp_path / str(edit) / src.name
        shutil.copytree(src, dst)
        if edit:  # the copy that ran differs from the shipped protocol of the same name
            text = (dst / "protocol.yaml").read_text() + "# revised\n"
            (dst / "protocol.yaml").write_text(text)
            ctx = json.loads((dst / "context.json").read_text())
            ctx["protocol_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            (dst / "context.json").write_text(json.dumps(ctx))
            amend = dst / "amendments.yaml"
            if amend.is_file():  # post-hoc readings name the run they read
                old = hashlib.sha256((src / "protocol.yaml").read_bytes()).hexdigest()
                amend.write_text(amend.read_text().replace(old, ctx["protocol_sha256"]))
        claims = load(dst.parent)
        assert claims
        shipped_text = (ROOT / "studies" / f"{src.name}.yaml").read_text()
        same = (dst / "protocol.yaml").read_text() == shipped_text
        assert all(bool(c.get("stale")) == (not same) for c in claims)
        assert not edit or all(c.get("stale") for c in claims)


def test_recompute_on_a_truncated_table_names_its_line(tmp_path, capsys):
    import shutil

    import pytest

    from sgdlab.cli import main

    src = ROOT / "results" / "srs"
    if not (src / "trials.csv").is_file():
        pytest.skip("no committed srs results to copy")
    dst = Path(shutil.copytree(src, tmp_path / "srs"))
    (dst / "trials.csv").write_bytes((src / "trials.csv").read_bytes()[:150])
    assert main(["ledger", "--results", str(tmp_path), "--recompute"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sgdlab: error: {dst / 'trials.csv'}:") and err.count("\n") == 1
    assert "Traceback" not in err
