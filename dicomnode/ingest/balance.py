"""One listening socket shared by the listener processes; the least busy one accepts.

With SO_REUSEPORT each listener had its own socket and the kernel chose one by a hash of
the peer's address and port: four senders at once landed 2-2, 3-1 or 4-0 on two
listeners, and a listener serving three associations is three times slower per
association (one GIL). Here the supervisor binds one socket and every listener inherits
it. All of them wake when a connection waits; one that serves more connections than
another leaves it to that one for up to ``YIELD_SECONDS`` (the other may be busy), and
accepts it itself if it is still waiting then. The connection counts are
:class:`~dicomnode.ingest.slots.AssociationSlots` counters, one per listener.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.ingest.slots import AssociationSlots

# How long a busier listener leaves a waiting connection to a less busy one.
YIELD_SECONDS = 0.02
_LOOK_AGAIN = 0.002
BACKLOG = 128


def listening_socket(host: str, port: int) -> socket.socket:
    """The node's DICOM socket, bound and listening, for the listeners to inherit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.create_server((host, port), family=family, backlog=BACKLOG)
    # Every listener wakes for a connection; those that lose the race to accept it must
    # get EAGAIN, not block.
    server.setblocking(False)
    return server


class SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on an inherited listening socket (``listening_fd``),
    accepting a connection only if no other listener serves fewer (``connections``).
    ``AE.make_server(server_class=SharedSocketServer, listening_fd=..., connections=...)``."""

    def __init__(
        self, *args: Any, listening_fd: int, connections: AssociationSlots | None, **kwargs: Any
    ):
        # Before pynetdicom's constructor, which binds.
        self.listening_fd = listening_fd
        self.connections = connections
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = socket.socket(fileno=os.dup(self.listening_fd))
        # Shared by all listeners: those that lose the race to accept get EAGAIN.
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """The supervisor's socket listens already."""

    def server_close(self) -> None:
        """Close this process's descriptor only: ``shutdown`` (pynetdicom's way) would stop
        the socket listening for every listener."""
        self.socket.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Count the connection here, in the accepting thread, before its association is
        made: counted only when the association starts (in another thread, after copying
        the presentation contexts: milliseconds on a slow machine), a burst of senders went
        to whichever listener woke first, which still counted none. The listener releases
        the count when the connection closes (``AdmissionControl``, admission.py)."""
        if self.connections is not None:
            self.connections.add()
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """The connection failed before an association took it over: not counted any more."""
        if self.connections is not None:
            self.connections.release()
        super().handle_error(request, client_address)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        self._leave_to_less_busy()
        return super().get_request()

    def _leave_to_less_busy(self) -> None:
        """Return when this listener should accept; BlockingIOError when another did."""
        if self.connections is None:
            return
        deadline = time.monotonic() + YIELD_SECONDS
        while time.monotonic() < deadline:
            counts = self.connections.counters()
            if counts[self.connections.index] <= min(counts):
                return
            waiting, _, _ = select.select([self.socket], [], [], _LOOK_AGAIN)
            if not waiting:
                # socketserver ignores an OSError from get_request: nothing to serve here.
                raise BlockingIOError("a less busy listener accepted the connection")
