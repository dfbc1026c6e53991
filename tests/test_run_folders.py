"""The temporary folders of a ``dicomnode serve`` killed with SIGKILL (its run folder, its
Prometheus folder) are removed by the next serve that starts; those of a process that is
alive, and folders dicomnode did not make, are kept. Before, each kill left them in /tmp
for good."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from conftest import launch_node, stop_process, write_config

from dicomnode.runfolders import METRICS_PREFIX, OWNER_FILE, RUN_PREFIX


def _folders(temporary: Path) -> set[str]:
    """The names of dicomnode's folders in ``temporary`` (other programs write there too)."""
    return {path.name for path in temporary.glob("dicomnode-*")}


def _kinds(names: set[str]) -> list[str]:
    """Which of serve's folders ``names`` are, by their prefix."""
    return sorted(
        prefix
        for name in names
        for prefix in (RUN_PREFIX, METRICS_PREFIX)
        if name.startswith(prefix)
    )


def _serve(folder: Path, temporary: Path) -> subprocess.Popen:
    """A running serve (one listener, no workers) in a process group of its own."""
    folder.mkdir()
    config, port, web_port = write_config(folder, f"sqlite:///{folder / 'db.sqlite'}", listeners=1)
    # In ``temporary``; its own Prometheus folder (an empty setting is none).
    environment = {"TMPDIR": str(temporary), "PROMETHEUS_MULTIPROC_DIR": ""}
    process, _ = launch_node(folder, config, port, web_port, env=environment, new_session=True)
    return process


def test_the_folders_of_a_killed_serve_are_removed_at_the_next_start(tmp_path: Path) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    killed = _serve(tmp_path / "killed", temporary)
    try:
        made = _folders(temporary)
        assert _kinds(made) == [METRICS_PREFIX, RUN_PREFIX], made
        # kill -9: serve removes nothing; its listener goes with it (its process group).
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
    assert _folders(temporary) == made  # left behind
    # A process that is alive keeps a folder as serve makes them; folders dicomnode did not
    # make (no owner file, or a name of another shape) are kept whoever made them.
    alive = subprocess.Popen(["sleep", "600"])
    try:
        live = temporary / f"{RUN_PREFIX}{alive.pid}-abcd1234"
        live.mkdir()
        (live / OWNER_FILE).write_text(f"{alive.pid} {socket.gethostname()}\n")
        unowned = temporary / f"{RUN_PREFIX}{killed.pid}-efgh5678"
        unowned.mkdir()
        other = temporary / "dicomnode-run-notours"
        other.mkdir()
        kept = {live.name, unowned.name, other.name}
        restarted = _serve(tmp_path / "restarted", temporary)
        try:
            now = _folders(temporary)
        finally:
            stop_process(restarted)
    finally:
        alive.kill()
        alive.wait()
    assert not made & now, now  # the killed serve's folders are gone
    assert kept <= now, now
    # Besides those, the restarted serve's own.
    assert _kinds(now - kept) == [METRICS_PREFIX, RUN_PREFIX], now
    assert all(str(restarted.pid) in name for name in now - kept), now
