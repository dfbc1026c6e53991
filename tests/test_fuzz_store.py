"""Fuzz the C-STORE handler with mutated encodings (Hypothesis): no exception escapes, every
status is a proper refusal or a success whose file reads back. ``benchmarks/fuzz_store.py``
runs the same harness for 1,000 cases."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from fuzz_store import run  # noqa: E402


def test_store_handler_survives_200_mutated_datasets(tmp_path: Path) -> None:
    harness = run(tmp_path, cases=200)
    assert harness.crashes == []
    assert harness.cases >= 200
    # The mutations reach both outcomes: refusals and (harmless edits) successes.
    assert harness.statuses.get(0xC000, 0) > 100
    assert harness.statuses.get(0x0000, 0) > 0
