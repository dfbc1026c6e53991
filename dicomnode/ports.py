"""Local TCP ports: pick a free one, wait until a started process listens on one.

Used where a node, a dcmtk ``storescp`` or an Orthanc is started as a child process on this
machine (benchmarks, tests) and the caller has to know when its DICOM or web port accepts.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_for_port(
    port: int,
    process: subprocess.Popen,
    timeout: float = 60.0,
    log: Path | None = None,
) -> None:
    """Return once ``port`` on the loopback interface accepts a connection.

    Raises RuntimeError if ``process`` exits first (with the last 3000 characters of its
    ``log`` file, if given) and TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            args = process.args
            command = args if isinstance(args, str | bytes) else " ".join(map(str, args))
            message = f"{command} exited with status {process.returncode}"
            if log is not None:
                message += f":\n{log.read_text(errors='replace')[-3000:]}"
            raise RuntimeError(message)
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")
