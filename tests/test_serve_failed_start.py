"""A start that fails leaves nothing behind: ``dicomnode serve`` refused for its
configuration or its database removes the Prometheus folder it made in the temporary
folder (under systemd's Restart=on-failure, one failed start every 5 s)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

from dicomnode.ports import free_port


def _serve(config: Path, temporary: Path) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items()}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)  # serve makes its own
    environment["TMPDIR"] = str(temporary)
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=config.parent,
        env=environment,
    )


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        pytest.param(
            lambda text, folder: text.replace("[web]\n", "[web]\nbogus = 1\n"),
            2,
            "[web.bogus] unknown setting",
            id="invalid-file",
        ),
        pytest.param(
            lambda text, folder: text.replace(
                f'path = "{folder / "storage"}"', f'path = "{folder / "a-file" / "storage"}"'
            ),
            2,
            "[storage.path]",
            id="check-refused",
        ),
        pytest.param(
            lambda text, folder: text.replace(
                f"sqlite:///{folder / 'db.sqlite'}",
                f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x",
            ),
            1,
            "database unreachable",
            id="database-down",
        ),
    ],
)
def test_a_failed_start_leaves_no_metrics_folder(tmp_path: Path, change, status, message) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config, _, _ = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    config.write_text(change(config.read_text(), tmp_path))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = _serve(config, temporary)
    assert result.returncode == status, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert list(temporary.glob("dicomnode-*")) == []


def test_a_listener_that_does_not_start_stops_serve_with_one_line(tmp_path: Path) -> None:
    """serve starts its web server and workers while its listener processes start: one that
    exits instead of listening is one ERROR line, and serve stops everything and exits with
    status 1 (under systemd: a failed start, restarted), leaving no process or folder."""
    hook = tmp_path / "hook"
    hook.mkdir()
    # Every listener process exits at once (sitecustomize runs at each interpreter's start).
    (hook / "sitecustomize.py").write_text(
        "import os, sys\nif 'listener' in sys.argv:\n    os._exit(3)\n"
    )
    config, _, _ = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(hook), "TMPDIR": str(temporary)}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=environment,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "ERROR dicomnode: DICOM listener 0 did not start (exit status 3)" in result.stderr
    assert "Traceback" not in result.stderr
    assert "node ready" not in result.stderr
    assert "stopped" in result.stderr
    assert list(temporary.glob("dicomnode-*")) == []
    left = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def test_a_taken_dicom_port_is_one_error_line(tmp_path: Path) -> None:
    """Another program on the DICOM port: one ERROR line, status 1, nothing left behind;
    no "stopped" after the ERROR line (a failed start is not a stop)."""
    config, port, _ = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    with socket.create_server(("127.0.0.1", port)):
        result = _serve(config, temporary)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].endswith(
        f"ERROR dicomnode: cannot listen for DICOM on 127.0.0.1:{port}: Address already in use"
    ), errors[0]
    assert "stopped" not in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert list(temporary.glob("dicomnode-*")) == []


def test_a_taken_web_port_is_one_error_line(tmp_path: Path) -> None:
    """Another program on the web port: as for the DICOM port, one ERROR line of serve's
    before any listener or worker starts, status 1, nothing left behind. uvicorn bound it
    itself once the listeners and workers ran: "worklist page on" first, then uvicorn's own
    "[Errno 98] error while attempting to bind", "stopped" and status 3."""
    config, _, web_port = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    with socket.create_server(("127.0.0.1", web_port)):
        result = _serve(config, temporary)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].endswith(
        f"ERROR dicomnode: cannot serve the web page on 127.0.0.1:{web_port}: "
        "Address already in use"
    ), errors[0]
    assert "worklist page on" not in result.stderr, result.stderr[-3000:]
    assert "stopped" not in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert list(temporary.glob("dicomnode-*")) == []
    left = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
