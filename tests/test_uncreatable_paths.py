"""A storage folder (or SQLite database folder) that cannot be made is a configuration error,
in ``check-config`` and in ``serve`` before anything starts, as a read-only or not-a-folder
path is. Under /proc, which says it is writable to root and then refuses every folder,
check-config printed OK (and a warning that the file system has 0 bytes), and serve printed
its web address before its listeners died with two FileNotFoundError tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import write_config

NOWHERE = Path("/proc/dicomnode-test-nope")


def _run(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(cwd / "metrics")}
    (cwd / "metrics").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", *arguments],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=environment,
    )


def _reason(folder: Path) -> str:
    """What is said of ``folder``: as root /proc looks writable, and mkdir says why not."""
    if os.geteuid() == 0:
        return f"cannot create {folder}: No such file or directory"
    return "/proc is not writable by this user"


def _line(config: Path, start: str) -> int:
    """The number of ``config``'s line that starts with ``start``."""
    lines = config.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.startswith(start))


def _config(tmp_path: Path, database: str) -> Path:
    config, _, _ = write_config(tmp_path, database)
    text = config.read_text()
    storage = f'path = "{tmp_path / "storage"}"'
    assert storage in text
    config.write_text(text.replace(storage, f'path = "{NOWHERE / "storage"}"'))
    return config


def test_check_config_refuses_folders_that_cannot_be_made(tmp_path: Path) -> None:
    config = _config(tmp_path, f"sqlite:///{NOWHERE / 'db' / 'dicomnode.db'}")
    result = _run("check-config", str(config), cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("configuration")]
    storage, database = _line(config, "path = "), _line(config, "url = ")
    assert errors == [
        f"configuration error: {config}:{storage}: [storage.path] {_reason(NOWHERE / 'storage')}",
        f"configuration error: {config}:{database}: [database.url] {_reason(NOWHERE / 'db')}",
    ], result.stderr
    assert "OK" not in result.stdout
    assert "0 bytes" not in result.stderr


def test_serve_refuses_a_storage_folder_that_cannot_be_made_before_starting(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    result = _run("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"configuration error: {config}:{_line(config, 'path = ')}: [storage.path] "
        f"{_reason(NOWHERE / 'storage')}"
    ], result.stderr[-3000:]
    assert not (tmp_path / "db.sqlite").exists()  # refused before anything started
