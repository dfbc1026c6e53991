"""TCP keepalive on the listener's connections, so that a peer that vanished is noticed.

A modality that loses power, a cable pulled, a NAT or firewall that forgets an idle
connection: no FIN or RST ever comes, and a connection waiting for the peer's next PDU
would wait until the network timeout, or for good where nothing reads or times it. With
keepalive the kernel probes a connection idle for ``IDLE_SECONDS``, every
``INTERVAL_SECONDS``, and after ``PROBES`` unanswered probes reports it broken (about two
minutes in all): the read fails, the association ends and its slots are freed. The probes
also keep NAT and firewall state alive during long pauses between studies.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("dicomnode.ingest")

IDLE_SECONDS = 60
INTERVAL_SECONDS = 10
PROBES = 6


def enable_keepalive(sock: socket.socket) -> None:
    """Turn keepalive on for ``sock`` with this node's timings, as far as the platform
    has the options (Linux has all three; elsewhere the system's timings apply)."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        ("TCP_KEEPIDLE", IDLE_SECONDS),
        ("TCP_KEEPINTVL", INTERVAL_SECONDS),
        ("TCP_KEEPCNT", PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            options.append((socket.IPPROTO_TCP, option, value))
    try:
        for level, option, value in options:
            sock.setsockopt(level, option, value)
    except OSError as exc:
        # The connection may already be gone; it is served (or closed) as before.
        log.debug("TCP keepalive not set on a DICOM connection: %s", exc)
