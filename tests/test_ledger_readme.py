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
