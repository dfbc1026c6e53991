"""Resource limits of the listener: free-disk watermark, database down, association count, PDU."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from sqlalchemy.orm import Session, sessionmaker
from test_scp import Node, secondary_capture, start_node

from dicomnode.db.session import make_engine, make_sessionmaker
from dicomnode.ingest import sink


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(tmp_path, sessions, {"max_associations": 2, "max_pdu": 16384})


def test_low_disk_answers_out_of_resources_and_recovers(node: Node) -> None:
    storage = node.scp.settings.storage
    storage.min_free_bytes = 1 << 62  # more than any disk has: "below the watermark"
    ds = secondary_capture()
    assert node.store(ds) == 0xA700
    assert node.instances(str(ds.SOPInstanceUID)) == 0
    assert not list(node.storage.rglob("*.dcm"))
    storage.min_free_bytes = 0  # space returned
    assert node.store(ds) == 0x0000
    assert node.instances(str(ds.SOPInstanceUID)) == 1


def test_database_down_acknowledged_rows_wait_new_instances_refused(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink, "RELEASE_WAIT_SECONDS", 0.5)
    # Nothing listens on port 1: every connection is refused at once.
    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2")
    working = node.scp.sessions
    node.scp.sessions = make_sessionmaker(down)
    first, second = secondary_capture(), secondary_capture()
    try:
        # The first instance is durable before the writer finds the database down: it is
        # acknowledged, its row waits (the file is in the spool).
        assert node.store(first) == 0x0000
        deadline = time.monotonic() + 10
        while node.scp.index.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not node.scp.index.healthy
        # From then on new instances are refused, not acknowledged, not stored.
        assert node.store(second) == 0xA700
        assert not list(node.storage.rglob(f"{second.SOPInstanceUID}.dcm"))
    finally:
        node.scp.sessions = working
    # The database is back: the waiting row is written and the sender's retry succeeds.
    assert node.instances(str(first.SOPInstanceUID)) == 1
    assert node.scp.index.healthy
    assert node.store(second) == 0x0000
    assert node.instances(str(second.SOPInstanceUID)) == 1
    down.dispose()


def test_association_limit_and_max_pdu(node: Node) -> None:
    first, second = node.associate(), node.associate()
    try:
        assert first.is_established and second.is_established
        # pynetdicom's acceptor advertises our receive limit to the requestor.
        assert first.acceptor.maximum_length == 16384
        third = node.associate()
        assert third.is_rejected  # local limit exceeded (transient, service provider)
    finally:
        first.release()
        second.release()
    # An association counts until its connection closes, which the requestor does after the
    # release (up to ~10 ms after release() returns here).
    wait_for(
        lambda: not any(a.is_acceptor for a in node.scp.ae.active_associations),
        timeout=10,
        interval=0.01,
        what="the released associations' connections to close",
    )
    ds = secondary_capture()
    assert node.store(ds) == 0x0000  # slots free again


def _stalled_connection(node: Node, header_length: int, sent: bytes) -> socket.socket:
    """A connection that sends a PDU header announcing ``header_length`` bytes, then ``sent``."""
    peer = socket.create_connection(("127.0.0.1", node.port), timeout=30)
    peer.sendall(struct.pack(">BBI", 1, 0, header_length) + sent)
    return peer


def _closed_by_the_node(peer, within: float) -> bool:
    """Whether the node closes ``peer``'s connection within ``within`` seconds."""
    peer.settimeout(within)
    try:
        while peer.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        peer.close()


def _one_warning_each(caplog: pytest.LogCaptureFixture, count: int, words: str) -> None:
    """``count`` WARNING lines with ``words``, and no ERROR or traceback (before, pynetdicom's
    'Connection closed before the entire PDU was received' ERROR with a traceback followed
    the node's line)."""
    loud = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert [level for level, _ in loud] == ["WARNING"] * count, loud
    assert all(words in line for _, line in loud), loud
    assert "Traceback" not in caplog.text


def test_connections_stalled_inside_a_pdu_are_closed_and_free_their_slots(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that stops in the middle of a PDU (a hostile one, or a modality that lost power)
    left the listener's read blocked for good, its association slot taken: two such
    connections refused every sender after them, whatever [[peers]] said."""
    # The read's timeout is the network timeout; a connection whose association request never
    # came whole then ends at the ACSE timeout (30 s and 60 s by default).
    node.scp.ae.network_timeout = node.scp.ae.acse_timeout = 1.0
    with caplog.at_level(logging.INFO):
        stalled = [_stalled_connection(node, 1000, b"\0" * 10) for _ in range(2)]
        assert all(_closed_by_the_node(peer, within=15) for peer in stalled)
        wait_for(
            lambda: not any(a.is_acceptor for a in node.scp.ae.active_associations),
            timeout=10,
            interval=0.05,
            what="the stalled connections' associations to end",
        )
        assert node.store(secondary_capture()) == 0x0000
    _one_warning_each(caplog, 2, "did not arrive in full within the ACSE timeout")


def test_a_pdu_longer_than_the_node_receives_closes_the_connection(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener read a PDU of whatever length the peer announced (up to 4 GiB) into
    memory; now one longer than the node advertises (or than an association request can be)
    closes the connection at once."""
    with caplog.at_level(logging.INFO):
        peer = _stalled_connection(node, 0xFFFFFFF0, b"\0" * 65536)
        assert _closed_by_the_node(peer, within=5)
        assert node.store(secondary_capture()) == 0x0000
    _one_warning_each(caplog, 1, "it announced a PDU of 4294967280 bytes")
