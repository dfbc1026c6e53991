"""``dicomnode demo`` runs a node, sends phantoms by C-STORE and ends with the critical on top."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import free_port


def test_demo_puts_pneumothorax_studies_on_top(tmp_path: Path) -> None:
    port, web_port = free_port(), free_port()
    folder = tmp_path / "demo"
    # Normal, pneumothorax, normal: neither arrival order nor its reverse puts the
    # pneumothorax first.
    options = ["--studies", "3", "--port", str(port), "--web-port", str(web_port)]
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode", "demo", *options, "--folder", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert f"http://127.0.0.1:{web_port}/worklist" in out and "password" in out
    assert "3/3 analysed" in out
    final = out.split("final worklist (reading order):", 1)[1].strip().splitlines()[1:]
    assert len(final) == 3
    phantoms = [line.split()[3] for line in final]
    assert phantoms == ["pneumothorax", "normal", "normal"], final
    assert final[0].split()[1] == "CRITICAL" and "CRITICAL" not in final[1] + final[2]
    # The node was stopped at the end.
    assert "stopped" in (folder / "node.log").read_text()
