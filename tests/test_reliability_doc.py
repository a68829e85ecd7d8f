"""docs/reliability.md stays true: every test it names exists, and its counts match its table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"


def _rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            rows.append(cells)
    return rows


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_every_named_test_exists():
    rows = _rows()
    assert rows, "no rows parsed from docs/reliability.md"
    for row in rows:
        ref = row[-1].strip("`")
        file, _, name = ref.partition("::")
        assert (REPO / file).is_file(), ref
        assert name in _test_names(REPO / file), ref


def test_counts_match_the_table():
    rows = _rows()
    text = DOC.read_text()
    tried = int(re.search(r"Cases tried: (\d+)", text).group(1))
    errors = int(re.search(r"Clear one-line errors: (\d+)", text).group(1))
    kills = int(re.search(r"kill -9 trials survived with identical outputs: (\d+)", text).group(1))
    assert tried == len(rows)
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert errors == sum(r[-2] == "error" for r in rows)
    trials = 0
    for r in rows:
        if r[-2].startswith("kill -9"):
            m = re.search(r"\((\d+) trials\)", r[-2])
            trials += int(m.group(1)) if m else 1
    assert kills == trials
