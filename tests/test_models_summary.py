"""`dicomnode models list`: every shipped card shows its task, input, findings and a held-out
metric, and says it is a research demo; --markdown prints the README's table."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from dicomnode.models.registry import discover_cards
from dicomnode.models.summary import headline_metrics, list_line, markdown_table

CARDS = discover_cards([REPO / "models"])


def test_every_shipped_card_has_a_headline_held_out_metric() -> None:
    assert len(CARDS) >= 2
    for card in CARDS:
        assert headline_metrics(card) != "no held-out metrics on the card", card.model.name
        line = list_line(card)
        assert line.startswith(f"{card.model.name} {card.model.version} [{card.model.task}")
        assert line.endswith("(research demo, not for clinical use)")


def test_models_list_cli_and_the_readme_table_agree() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "dicomnode", "models", "list", "--markdown",
         "--config", str(REPO / "conf" / "dicomnode.toml")],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    table = markdown_table(CARDS)
    assert table in listed and "not for clinical use" in listed
    # The README shows the same table: regenerate it with the command above when cards change.
    assert table in (REPO / "README.md").read_text()
