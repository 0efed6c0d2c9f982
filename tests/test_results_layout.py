"""benchmarks/results/: one folder per date and card, file names without history, one RESULTS.md row per file."""

from __future__ import annotations

import json
import re
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
FOLDER = re.compile(r"(\d{4}-\d{2}-\d{2})_(cpu-\d+-cores|(\d+)x([A-Za-z0-9]+))")
HISTORY = re.compile(r"run\d|_cut|_limit|latest|_old|_new|_v\d", re.I)


def recorded(data: object, key: str) -> set[str]:
    """Every value of ``key`` anywhere in a JSON document."""
    found: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            if k == key and isinstance(v, str):
                found.add(v)
            found |= recorded(v, key)
    elif isinstance(data, list):
        for v in data:
            found |= recorded(v, key)
    return found


def test_results_are_filed_by_date_and_card_and_indexed_once() -> None:
    files = sorted(p.relative_to(BENCHMARKS / "results") for p in (BENCHMARKS / "results").rglob("*") if p.is_file())
    assert files
    index = (BENCHMARKS / "RESULTS.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|", index, flags=re.M)
    assert sorted(rows) == sorted(str(f) for f in files), "RESULTS.md's raw-results table: one row per file"
    for f in files:
        assert len(f.parts) == 2 and f.suffix == ".json", f
        folder = FOLDER.fullmatch(f.parts[0])
        assert folder, f"{f}: expected <YYYY-MM-DD>_<N>x<card> or <YYYY-MM-DD>_cpu-<n>-cores"
        assert not HISTORY.search(f.name), f"{f}: a name says what a file holds, not its history"
        data = json.loads((BENCHMARKS / "results" / f).read_text())
        assert recorded(data, "date") <= {folder[1]}, f"{f}: recorded dates {recorded(data, 'date')}"
        if folder[4]:
            cards = recorded(data, "card")
            assert all(folder[4] in card for card in cards), f"{f}: recorded cards {cards}"
