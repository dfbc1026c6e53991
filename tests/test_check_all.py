"""``dicomnode check-config`` reports every problem: main file, cards, ONNX files, paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_problem_is_reported_with_file_line_and_key(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    # A card whose ONNX file is missing, and a card that is not valid TOML.
    shutil.copy(REPO / "models" / "cxr_pneumothorax_demo.toml", cards / "orphan.toml")
    (cards / "broken.toml").write_text("[model\nname = 1\n")
    # An ensemble card (no ONNX of its own) whose member cards are not there.
    shutil.copy(REPO / "models" / "cxr_tb_ensemble_demo.toml", cards / "ensemble.toml")
    (tmp_path / "blocker").write_text("a file, not a folder")
    config = tmp_path / "dicomnode.toml"
    config.write_text(
        f'[storage]\npath = "{tmp_path / "blocker" / "storage"}"\n\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n\n'
        f'[models]\nfolders = ["{cards}"]\n'
    )
    result = _check(config)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("configuration")]
    assert len(errors) == 4, result.stderr
    assert re.search(
        rf"{re.escape(str(config))}:2: \[storage\.path\] .*not a folder", result.stderr
    )
    assert re.search(
        r"orphan\.toml:\d+: \[model\.onnx\] ONNX file .* does not exist", result.stderr
    )
    assert re.search(r"broken\.toml:\d+: .*not valid TOML", result.stderr)
    assert re.search(
        r"ensemble\.toml:\d+: \[ensemble\.members\] ensemble members without a loadable card",
        result.stderr,
    )


def test_shipped_configuration_passes() -> None:
    result = _check(REPO / "conf" / "dicomnode.toml")
    assert result.returncode == 0, result.stderr
    shipped = len(list((REPO / "models").glob("*.toml")))
    assert f"OK ({shipped} model card(s)" in result.stdout
