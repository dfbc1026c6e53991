"""Connections that are not DICOM, or not valid DICOM, at the listener: a port scanner or a
load balancer's HTTP health probe, a PDU of an unknown type, a malformed A-ASSOCIATE-RQ.

Each is answered as the DICOM Upper Layer's state machine says (an unrecognised or invalid
PDU in Sta2: AA-1, A-ABORT) and closed at once, not when a timeout runs out (the ACSE and
network timeouts here are 30 s and 60 s, the defaults); the log has one WARNING naming the
peer, no ERROR and no traceback (probes would fill the error log); and the node still
answers a real peer afterwards.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session, sessionmaker
from test_scp import echoscu, start_node

from dicomnode.ingest.reactor import EventDrivenAssociation

# Generous for a loaded CI: the node closes these at once; before, they stayed open until
# the 60 s network timeout.
CLOSED_WITHIN = 5.0


def _associate_rq_with_garbage() -> bytes:
    """An A-ASSOCIATE-RQ whose variable items cannot be decoded (an item of type 0xEE whose
    length runs past the PDU)."""
    fixed = struct.pack(">HH16s16s32s", 1, 0, b"DICOMNODE".ljust(16), b"SCANNER".ljust(16), b"")
    body = fixed + b"\xee\x00\xff\xff" + b"garbage"
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


JUNK = {
    # What a load balancer's health check or a browser sends to the DICOM port.
    "http-get": b"GET / HTTP/1.1\r\nHost: dicomnode:11112\r\nUser-Agent: probe/1.0\r\n\r\n",
    # A PDU type that PS3.8 does not define (0x01-0x07 are), with a body of 4 bytes.
    "unknown-pdu-type": struct.pack(">BBL", 0x09, 0, 4) + b"abcd",
    "malformed-associate-rq": _associate_rq_with_garbage(),
}


def _closed_within(connection: socket.socket, seconds: float) -> float:
    """Seconds until the node closed ``connection`` (read to its end: an A-ABORT may come
    first); fails if it is still open after ``seconds``."""
    started = time.monotonic()
    while True:
        left = seconds - (time.monotonic() - started)
        if left <= 0:
            pytest.fail(f"the connection is still open after {seconds} s")
        connection.settimeout(left)
        try:
            if connection.recv(65536) == b"":
                return time.monotonic() - started
        except ConnectionResetError:
            return time.monotonic() - started
        except TimeoutError:
            pytest.fail(f"the connection is still open after {seconds} s")


def _wait_for_the_association_thread_to_end() -> None:
    """The connection's association thread ends (not at the 30 s ACSE timeout): whatever it
    logs is in by then."""
    wait_for(
        lambda: not any(isinstance(t, EventDrivenAssociation) for t in threading.enumerate()),
        timeout=CLOSED_WITHIN,
        what="the connection's association thread ended",
    )


@pytest.mark.parametrize("kind", JUNK)
def test_a_junk_connection_is_closed_at_once_with_one_warning(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    for node in start_node(
        tmp_path, sessions, {"acse_timeout_seconds": 30, "network_timeout_seconds": 60}
    ):
        with caplog.at_level(logging.INFO):
            connection = socket.create_connection(("127.0.0.1", node.port))
            peer = "{}:{}".format(*connection.getsockname())
            try:
                connection.sendall(JUNK[kind])
                _closed_within(connection, CLOSED_WITHIN)
            finally:
                connection.close()
            # The association's thread, which waited for an association request, ends too.
            _wait_for_the_association_thread_to_end()
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.levelname for r in loud] == ["WARNING"], [r.getMessage() for r in loud]
        (warning,) = loud
        assert f"connection from {peer} closed" in warning.getMessage()
        assert warning.exc_info is None
        assert "Traceback" not in caplog.text
        # The listener still serves a real peer.
        assert echoscu(node.port, "DICOMNODE").returncode == 0


def _associate_rq() -> bytes:
    """A valid A-ASSOCIATE-RQ from SCANNER to DICOMNODE proposing Verification."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = "SCANNER"
    request.called_ae_title = "DICOMNODE"
    context = build_context(Verification)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    request.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return pdu.encode()


def _read_pdu(connection: socket.socket) -> tuple[int, bytes]:
    """The next PDU from the node: its type and body."""
    connection.settimeout(CLOSED_WITHIN)
    header = b""
    while len(header) < 6:
        header += connection.recv(6 - len(header)) or pytest.fail("closed by the node")
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        body += connection.recv(length - len(body)) or pytest.fail("closed by the node")
    return pdu_type, body


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("when", ["before-request", "associated"])
def test_a_peer_that_goes_away_in_the_middle_of_a_pdu_gets_one_warning(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
    when: str,
    reset: bool,
) -> None:
    """A PDU header announcing 1,000 bytes, 10 of them, and the peer closes the connection
    (or resets it): before, pynetdicom's 'Connection closed before the entire PDU was
    received' (with a traceback when reset) or 'The received PDU is shorter than expected'
    ERROR. The peer going away is no error of the node: one WARNING naming it."""
    for node in start_node(
        tmp_path, sessions, {"acse_timeout_seconds": 30, "network_timeout_seconds": 60}
    ):
        with caplog.at_level(logging.INFO):
            connection = socket.create_connection(("127.0.0.1", node.port))
            peer = "{}:{}".format(*connection.getsockname())
            try:
                pdu_type = 0x01  # an A-ASSOCIATE-RQ
                if when == "associated":
                    connection.sendall(_associate_rq())
                    assert _read_pdu(connection)[0] == 0x02  # A-ASSOCIATE-AC
                    pdu_type = 0x04  # a P-DATA-TF
                connection.sendall(struct.pack(">BBL", pdu_type, 0, 1000) + b"0123456789")
                # Mostly read by the node by then; a reset that comes first (the read of the
                # header fails instead) is the peer going away all the same.
                time.sleep(0.2)
                if reset:
                    linger = struct.pack("ii", 1, 0)
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            finally:
                connection.close()
            _wait_for_the_association_thread_to_end()
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.levelname for r in loud] == ["WARNING"], [r.getMessage() for r in loud]
        (warning,) = loud
        assert f"connection from {peer} closed by the peer" in warning.getMessage()
        assert warning.exc_info is None
        assert "Traceback" not in caplog.text
        assert echoscu(node.port, "DICOMNODE").returncode == 0


def test_an_invalid_pdu_within_an_association_gets_its_a_abort_and_no_reset(
    tmp_path: Path, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """A DICOM peer that sends a PDU of an unknown type within an association, and then more
    it had in flight, is owed the A-ABORT (AA-8): the node does not close the moment it has
    sent it (what the peer sends next then meets a closed socket, Linux resets the
    connection, and the A-ABORT still unread at the peer is lost), but goes on as PS3.8 and
    pynetdicom do (Sta13; the association ends on the abort): the peer reads its A-ABORT,
    and one WARNING."""
    for node in start_node(
        tmp_path, sessions, {"acse_timeout_seconds": 30, "network_timeout_seconds": 60}
    ):
        with caplog.at_level(logging.INFO):
            connection = socket.create_connection(("127.0.0.1", node.port))
            peer = "{}:{}".format(*connection.getsockname())
            try:
                connection.sendall(_associate_rq())
                assert _read_pdu(connection)[0] == 0x02  # A-ASSOCIATE-AC
                connection.sendall(JUNK["unknown-pdu-type"])
                connection.sendall(b"more of what the peer had in flight" * 10)
                time.sleep(0.5)  # the node has answered, and closed if it closes at once
                connection.sendall(b"and more")
                time.sleep(0.5)
                assert _read_pdu(connection)[0] == 0x07  # the A-ABORT, not a reset
            finally:
                connection.close()
            _wait_for_the_association_thread_to_end()
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.levelname for r in loud] == ["WARNING"], [r.getMessage() for r in loud]
        assert f"connection from {peer} aborted: it sent what is not a valid DICOM PDU" in (
            loud[0].getMessage()
        )
        assert "Traceback" not in caplog.text
        assert echoscu(node.port, "DICOMNODE").returncode == 0
