"""``dicomnode demo`` runs a node, sends phantoms by C-STORE and ends with the critical on top."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from conftest import free_port


def run_demo(cwd: Path, *options: str, env: dict[str, str] | None = None) -> str:
    """Run ``dicomnode demo`` with its output in a pipe (not a terminal); return stdout."""
    port, web_port = free_port(), free_port()
    ports = ["--port", str(port), "--web-port", str(web_port)]
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode", "demo", *ports, *options],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"http://127.0.0.1:{web_port}/worklist" in result.stdout
    return result.stdout


def test_demo_puts_pneumothorax_studies_on_top(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    # Normal, pneumothorax, normal: neither arrival order nor its reverse puts the
    # pneumothorax first.
    out = run_demo(tmp_path, "--studies", "3", "--folder", str(folder))
    assert "password" in out
    assert "3/3 analysed" in out
    final = out.split("final worklist (reading order):", 1)[1].strip().splitlines()[1:]
    assert len(final) == 3
    phantoms = [line.split()[3] for line in final]
    assert phantoms == ["pneumothorax", "normal", "normal"], final
    assert final[0].split()[1] == "CRITICAL" and "CRITICAL" not in final[1] + final[2]
    # Not a terminal: status lines as they change, the table once, at the end (it was
    # printed on every change, some ten times for four studies).
    assert out.count("PRIORITY") == 1, out
    assert "sent 3/3 studies by C-STORE" in out
    # A folder of one's own is kept, and the demo does not say otherwise.
    assert f"node log: {folder / 'node.log'}" in out and "removed" not in out
    # The node was stopped at the end.
    assert "stopped" in (folder / "node.log").read_text()


def test_demo_says_its_temporary_folder_goes_at_exit(tmp_path: Path) -> None:
    """Without --folder or --keep the node log the demo names is removed when it ends: the
    files line says so (it named the path alone, for a file that was gone)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = run_demo(tmp_path, "--studies", "1", env=env)
    (files,) = re.findall(r"files: +(\S+) +\(node log: (\S+)\)\n(.*)\n", out)
    folder, log, note = files
    assert Path(log) == Path(folder) / "node.log"
    assert Path(folder).parent == tmp_path
    assert "removed when the demo ends; --keep or --folder keeps them" in note
    assert not Path(folder).exists()
    assert out.count("PRIORITY") == 1, out


def test_demo_keeps_its_temporary_folder_when_it_fails(tmp_path: Path) -> None:
    """A failed demo names its node log and keeps it: the temporary folder was removed at
    exit, so the log the failure message pointed at was gone."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    # The DICOM port bound but not listening: the demo's check finds nothing answering
    # there, the node cannot bind it and exits at start.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        ports = ["--port", str(port), "--web-port", str(free_port())]
        result = subprocess.run(
            [sys.executable, "-m", "dicomnode", "demo", "--studies", "1", *ports],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
        )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo failed: the demo node exited" in result.stderr, result.stderr
    (log,) = re.findall(r"see (\S+) \(kept\)", result.stderr)
    assert Path(log).name == "node.log" and Path(log).parent.parent == tmp_path
    assert f"cannot listen for DICOM on 127.0.0.1:{port}" in Path(log).read_text()
