"""Several DICOM listener processes on one port: the supervisor side and the child side.

``dicomnode serve`` binds the DICOM port once and starts ``[node] listeners`` processes
(``dicomnode listener``) that inherit the socket, each running a
:class:`~dicomnode.ingest.scp.StorageSCP`; the least busy one accepts each connection
(:mod:`dicomnode.ingest.balance`), so concurrent senders are served on all cores. A child
talks to its supervisor over its standard streams, one line each:

- child to supervisor: ``ready`` once it listens, ``reloaded`` after each reload;
- supervisor to child: ``reload <settings as JSON>`` (what the supervisor validated);
  end of input (the supervisor is gone) stops the child.

The node-wide association limit and the connections each listener serves are kept in
shared counters files (:mod:`dicomnode.ingest.slots`), the associations per peer address in
another (:mod:`dicomnode.ingest.addresses`, ``ADDRESSES_FILE`` beside the slots file), so
that every limit holds over all listeners together. The index rows of what a listener
stores go to the supervisor's writer over a socket pair (:mod:`dicomnode.ingest.indexer`).

A listener receives into incoming files named after its index
(:func:`~dicomnode.ingest.incoming.listener_prefix`), and removes that index's files when
it starts: those a killed predecessor was receiving into (up to ``[node]
max_instance_bytes`` each), which no other listener touches and nothing else would remove
before the node's next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.config import NodeSettings, Settings, load_settings
from dicomnode.ingest.addresses import AddressSlots, create_address_slots, table_size
from dicomnode.ingest.balance import listening_socket
from dicomnode.ingest.sink import RemoteIndex
from dicomnode.ingest.slots import AssociationSlots, create_slots
from dicomnode.sigint import held, leave_sigint_to_supervisor, start_child
from dicomnode.supervision import TERMINATED, wait_for_exit, wait_to_restart

if TYPE_CHECKING:
    # The supervisor's side only: a listener process loads no database code under serve.
    from dicomnode.ingest.indexer import IndexService

log = logging.getLogger("dicomnode.ingest")

_PR_SET_PDEATHSIG = 1
START_TIMEOUT = 60.0
RELOAD_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# The per-address counts, in the folder of the slots file a listener is given.
ADDRESSES_FILE = "addresses.slots"


# Supervisor side ---------------------------------------------------------------------


class _Child:
    """One listener process and the lines it sent."""

    def __init__(self, command: list[str], pass_fds: tuple[int, ...] = ()):
        self.process = start_child(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            pass_fds=pass_fds,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.ready = False  # it said "ready": it listens
        threading.Thread(target=self._read, name="listener-out", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # end of output: the process is gone

    def expect(self, word: str, timeout: float) -> bool:
        """Wait for the line ``word``; False on timeout or when the process ended."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line == word:
                return True
            if line == "":
                return False

    def send(self, line: str) -> bool:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            return True
        except (OSError, ValueError):
            return False


class ListenerPool:
    """The listener processes of one node; one that dies is restarted with backoff."""

    def __init__(
        self, config: Path, count: int, run_dir: Path, node: NodeSettings, index: IndexService
    ):
        """Bind ``node``'s host and port (OSError if taken) and start ``count`` listeners,
        whose index rows ``index`` writes. When an exception leaves (a SIGTERM or Ctrl-C
        meanwhile included: :mod:`dicomnode.sigint`), the listeners started so far are
        stopped and the socket closed: the caller never gets the pool to stop."""
        self.socket = listening_socket(node.host, node.port)
        self.index = index
        self.slots_path = run_dir / "associations.slots"
        self.connections_path = run_dir / "connections.slots"
        self.addresses_path = run_dir / ADDRESSES_FILE
        self.command = [sys.executable, "-m", "dicomnode", "listener", "--config", str(config)]
        self.restarts = [0] * count
        self.children: list[_Child] = []
        self._lock = threading.Lock()
        try:
            create_slots(self.slots_path, count)
            create_slots(self.connections_path, count)
            create_address_slots(self.addresses_path, count, table_size(node.max_associations))
            for index in range(count):
                with held():
                    self.children.append(self._spawn(index))
        except BaseException:
            self.stop()
            raise

    def _spawn(self, index: int) -> _Child:
        fd = self.socket.fileno()
        channel = self.index.channel()
        try:
            return self._start(index, fd, channel.fileno())
        finally:
            channel.close()  # the child has its own copy

    def _start(self, index: int, fd: int, index_fd: int) -> _Child:
        return _Child(
            [
                *self.command,
                "--index",
                str(index),
                "--slots",
                str(self.slots_path),
                "--connections",
                str(self.connections_path),
                "--socket-fd",
                str(fd),
                "--index-fd",
                str(index_fd),
            ],
            pass_fds=(fd, index_fd),
        )

    @property
    def pids(self) -> list[int]:
        return [child.process.pid for child in self.children]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once every listener listens; RuntimeError if one does not."""
        for index, child in enumerate(self.children):
            if not child.expect("ready", timeout):
                raise RuntimeError(
                    f"DICOM listener {index} did not start (exit status "
                    f"{child.process.poll()}); see its log lines above"
                )
            child.ready = True

    def healthy(self) -> bool:
        """True while every listener has said it listens and runs (a replacement that is
        still starting does not count)."""
        return all(child.ready and child.process.poll() is None for child in self.children)

    def reload(self, settings: Settings) -> bool:
        """Hand the new settings to every listener and wait until each has them."""
        line = "reload " + settings.model_dump_json(by_alias=True)
        with self._lock:
            children = list(self.children)
        sent = [child for child in children if child.send(line)]
        done = [child.expect("reloaded", RELOAD_TIMEOUT) for child in sent]
        return len(sent) == len(children) and all(done)

    def supervise(self, stop: threading.Event) -> None:
        """Restart listeners that exit until ``stop`` (a
        :class:`~dicomnode.supervision.StopEvent`: woken by it, not looking every second)."""
        while not wait_for_exit([child.process for child in self.children], stop):
            for index, child in enumerate(self.children):
                code = child.process.poll()
                if code is None or stop.is_set():
                    continue
                self.restarts[index] += 1
                delay = min(60.0, 2.0 ** min(self.restarts[index], 6))
                if wait_to_restart(log, f"DICOM listener {index}", code, delay, stop):
                    return
                for path in (self.slots_path, self.connections_path):
                    slots = AssociationSlots(path, index)
                    slots.reset()
                    slots.close()
                addresses = AddressSlots(self.addresses_path, index)
                addresses.reset()
                addresses.close()
                replacement = self._spawn(index)
                with self._lock:
                    self.children[index] = replacement
                if replacement.expect("ready", START_TIMEOUT):
                    replacement.ready = True
                else:
                    log.error("DICOM listener %d did not start again", index)

    def stop(self) -> None:
        """SIGTERM every listener (they finish and close), SIGKILL to those left after 10 s
        (all together: systemd's TimeoutStopSec counts on it)."""
        for child in self.children:
            with contextlib.suppress(OSError):
                child.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.socket.close()


# Child side ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the supervisor dies (Linux)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def _control(scp, config: Path, stop: threading.Event) -> None:
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "reload":
            settings = Settings.model_validate_json(argument)
            settings.source = config.resolve()
            scp.settings = settings  # one assignment: an association reads old or new
            print("reloaded", flush=True)
    stop.set()  # end of input: the supervisor is gone


def run_listener(
    config: Path,
    index: int,
    slots: Path | None,
    connections: Path | None = None,
    socket_fd: int | None = None,
    index_fd: int | None = None,
) -> int:
    """The ``dicomnode listener`` process: serve DICOM until SIGTERM or end of input, on
    the supervisor's socket ``socket_fd`` (else its own), handing index rows to the
    supervisor over ``index_fd`` (else writing them itself). Under serve (``slots``) a
    SIGINT is ignored: serve stops its listeners; else it stops the listener as SIGTERM
    does, unless SIGINT came ignored (a shell script's background job), as it stays. The
    exit status: 0, or under serve :data:`~dicomnode.supervision.TERMINATED` after a
    SIGTERM."""
    from dicomnode.ingest.incoming import clear_listener_files
    from dicomnode.ingest.scp import StorageSCP
    from dicomnode.logs import setup_logging

    _die_with_parent()
    # Reloads come as lines from the supervisor; a stray SIGHUP must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = threading.Event()
    terminated = threading.Event()  # stopped by a SIGTERM, not by the end of input

    def on_sigterm(*_: object) -> None:
        terminated.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    if slots is not None:
        leave_sigint_to_supervisor()
    elif signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    settings = load_settings(config)
    setup_logging(settings.log_level, settings.logging.json_lines)
    if slots is not None:
        # Under serve: what a dead listener of this index was receiving (the node's start
        # removed any before the first).
        removed = clear_listener_files(settings.storage_path, index)
        if removed:
            log.warning(
                "DICOM listener %d removed %d incoming file(s) a stopped listener left",
                index,
                removed,
            )
    remote = RemoteIndex(socket.socket(fileno=index_fd)) if index_fd is not None else None
    sessions = None
    if remote is None:
        # Stand-alone: this process writes its rows. Under serve the supervisor does, and
        # this process neither opens nor imports the database layer.
        from dicomnode.ingest.indexer import ingest_sessions

        sessions = ingest_sessions(settings.database_url)
    scp = StorageSCP(
        settings,
        sessions,
        slots=AssociationSlots(slots, index) if slots else None,
        connections=AssociationSlots(connections, index) if connections else None,
        addresses=AddressSlots(slots.parent / ADDRESSES_FILE, index) if slots else None,
        listening_fd=socket_fd,
        index=remote,
    )
    scp.start()
    print("ready", flush=True)
    threading.Thread(target=_control, args=(scp, config, stop), daemon=True).start()
    stop.wait()
    scp.stop()
    # Under serve, a SIGTERM is said in the exit status: serve's supervision tells one it
    # did not send (systemd's KillMode=control-group, a kill) from a crash.
    return TERMINATED if slots is not None and terminated.is_set() else 0
