"""The temporary folders ``dicomnode serve`` makes (its listeners' slot files, the Prometheus
files of its processes): named with serve's process id, with a file in each that says whose
it is, so that a serve that starts removes those of a serve that is gone.

A serve stopped by SIGKILL (or the OOM killer, or a power cut with a persistent /tmp) cannot
remove its own folders: outside systemd's PrivateTmp they piled up in /tmp, one pair per
kill. A folder is removed only when all of it says dicomnode made it for a process that no
longer exists: its name, its owner (this user), and its owner file (the same process id,
this host); a process of that id that is alive, whatever it is, keeps it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from dicomnode.jobs.queue import process_alive

RUN_PREFIX = "dicomnode-run-"
METRICS_PREFIX = "dicomnode-metrics-"
# In each folder: "<process id> <host name>" of the serve that made it.
OWNER_FILE = "serve.owner"
# What tempfile.mkdtemp(prefix=f"{prefix}{pid}-") names a folder.
_NAME = re.compile(r"^dicomnode-(?:run|metrics)-(\d+)-[A-Za-z0-9_]+$")


def make_run_folder(prefix: str) -> Path:
    """A new folder in the temporary folder, named ``prefix`` and this process's id, with
    its owner file (what :func:`remove_stale_folders` looks for)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    (folder / OWNER_FILE).write_text(_owner(os.getpid()), encoding="ascii")
    return folder


def remove_stale_folders(temporary: Path | None = None) -> list[Path]:
    """Remove the folders of :func:`make_run_folder` in ``temporary`` (by default the
    temporary folder) whose serve process is gone; returns them."""
    removed = []
    for folder in sorted(Path(temporary or tempfile.gettempdir()).glob("dicomnode-*-*")):
        match = _NAME.match(folder.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if _made_by_serve(folder, pid) and not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


def _owner(pid: int) -> str:
    return f"{pid} {socket.gethostname()}\n"


def _made_by_serve(folder: Path, pid: int) -> bool:
    """Whether ``folder`` is a folder (not a link) of this user whose owner file names
    ``pid`` on this host (another host or container sharing the folder: not ours to judge)."""
    try:
        status = folder.lstat()
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
            return False
        owner = folder / OWNER_FILE
        if owner.is_symlink():
            return False
        return owner.read_text(encoding="ascii") == _owner(pid)
    except (OSError, UnicodeDecodeError):
        return False
