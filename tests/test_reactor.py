"""The listener's event-driven association reactors (dicomnode.ingest.reactor)."""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import dcmtk, source_digest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, build_role, fsm
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification
from pynetdicom.transport import (
    AssociationServer,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)
from sqlalchemy.orm import Session, sessionmaker
from test_scp import Node, secondary_capture, start_node

from dicomnode.ingest import reactor
from dicomnode.ingest.reactor import WakingDUL, WholeReadSocket

# The pynetdicom code that reactor.py replaces, as of the version it was written against.
# A new pynetdicom that changes any of it fails here: compare the new code with reactor.py,
# carry the change over, then update the digest.
REPLACED = {
    DULServiceProvider.run_reactor: "e3a10eb3a0931e48",
    DULServiceProvider.stop_dul: "28a7e0be126e7b30",
    Association._run_reactor: "f28838c5559e462a",
    RequestHandler._create_association: "05c8d12b79863cdb",
    AssociationSocket.recv: "6bc20a33b1b7cfe7",
    # What WakingDUL.send_data_now does in the association thread instead.
    fsm.DT_1: "82e5c5d4114534fa",
    # What BlockingAcceptor's serve_forever and shutdown do without polling.
    AssociationServer.shutdown: "e8e2c3a41009886d",
    socketserver.BaseServer.serve_forever: "02a47d7c62be32dd",
    # What WakingDUL wraps (no read while events wait), the ERROR lines of an invalid PDU
    # that its log filter matches, and the abort actions it follows with AA-2 at once.
    DULServiceProvider._is_transport_event: "8725ed03bb8fbdef",
    DULServiceProvider._read_pdu_data: "19f2d4e38c13c835",
    fsm.AA_1: "8495a4665f7ad3c9",
    fsm.AA_2: "a58069d8299198e0",
    fsm.AA_8: "06c83317f08831fd",
}


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(tmp_path, sessions)


@pytest.mark.parametrize("replaced", list(REPLACED), ids=lambda f: f.__qualname__)
def test_replaced_pynetdicom_code_is_the_reviewed_version(replaced) -> None:
    assert source_digest(replaced) == REPLACED[replaced], (
        f"pynetdicom's {replaced.__qualname__} changed: review dicomnode/ingest/reactor.py"
    )


def test_idle_association_does_not_poll(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's loops wake 1,000 times a second each; these wait for data or a TICK."""
    waits = {"dul": 0, "association": 0}
    dul_wait = WakingDUL._wait
    get_msg = DIMSEServiceProvider.get_msg

    def counted_wait(self, reader):
        waits["dul"] += 1
        dul_wait(self, reader)

    def counted_get_msg(self, block=False):
        if isinstance(self.assoc, reactor.EventDrivenAssociation):
            waits["association"] += 1
        return get_msg(self, block)

    monkeypatch.setattr(WakingDUL, "_wait", counted_wait)
    monkeypatch.setattr(DIMSEServiceProvider, "get_msg", counted_get_msg)
    assoc = node.associate()
    assert assoc.is_established
    try:
        served = node.scp.ae.active_associations
        assert served and all(isinstance(a, reactor.EventDrivenAssociation) for a in served)
        time.sleep(0.2)
        before = dict(waits)
        time.sleep(1.0)
        # One wake per TICK (20 a second) and a few more; polling would be ~1,000.
        assert 1 <= waits["dul"] - before["dul"] <= 100, waits
        assert waits["association"] - before["association"] <= 100, waits
        # And the association still works after its reactors have idled.
        assert assoc.send_c_store(secondary_capture()).Status == 0x0000
    finally:
        assoc.release()


def test_responses_are_not_held_back_by_the_idle_wait(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued response wakes the DUL at once: 40 C-ECHOs take far less than 40 TICKs."""
    # A long TICK, so that responses held back until the next one (~20 s in all) and a
    # loaded machine's slow but prompt ones (~1 s) are far apart.
    tick = 1.0
    monkeypatch.setattr(reactor, "TICK", tick)
    started = time.monotonic()
    done = subprocess.run(
        [dcmtk("echoscu"), "--repeat", "40", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 40 * tick / 4, f"40 echoes took {elapsed:.2f} s"


def test_pdus_that_complete_no_message_do_not_wake_the_association_reactor(
    tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance in many PDUs wakes the association thread once it is whole, not per PDU."""
    looks = {"association": 0, "pdus": 0}
    get_msg = DIMSEServiceProvider.get_msg
    receive = reactor.QuickStoreDIMSE.receive_primitive

    def counted_get_msg(self, block=False):
        if isinstance(self.assoc, reactor.EventDrivenAssociation):
            looks["association"] += 1
        return get_msg(self, block)

    def counted_receive(self, primitive):
        looks["pdus"] += 1
        receive(self, primitive)

    monkeypatch.setattr(DIMSEServiceProvider, "get_msg", counted_get_msg)
    monkeypatch.setattr(reactor.QuickStoreDIMSE, "receive_primitive", counted_receive)
    # Few timer wakes however slow the machine (events still wake it at once).
    monkeypatch.setattr(reactor, "TICK", 1.0)
    # Pixel data of 128 KiB in PDUs of at most 16 KiB: at least 8 PDUs an instance.
    started = start_node(tmp_path, sessions, node_settings={"max_pdu": 16384})
    node = next(started)
    try:
        assoc = node.associate()
        assert assoc.is_established
        instances = 5
        try:
            before = dict(looks)
            for _ in range(instances):
                image = secondary_capture()
                image.Rows = image.Columns = 256
                image.BitsAllocated = image.BitsStored = 16
                image.HighBit = 15
                image.PixelData = bytes(256 * 256 * 2)
                assert assoc.send_c_store(image).Status == 0x0000
            pdus = looks["pdus"] - before["pdus"]
            woken = looks["association"] - before["association"]
        finally:
            assoc.release()
    finally:
        started.close()
    assert pdus >= 8 * instances, looks
    # A look for the message, one after serving it, and a TICK's now and then.
    assert woken <= 3 * instances, (woken, pdus)


def test_store_responses_leave_from_the_association_thread(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-STORE response is sent by the thread that made it, not handed to the DUL thread
    (which a nudge would wake); an echo's response still goes through the DUL."""
    senders: list[str] = []
    nudges = {"count": 0}
    send = WakingDUL._send
    nudge = WakingDUL.nudge

    def recorded_send(self, pdu):
        senders.append(threading.current_thread().name)
        send(self, pdu)

    def counted_nudge(self):
        nudges["count"] += 1
        nudge(self)

    monkeypatch.setattr(WakingDUL, "_send", recorded_send)
    monkeypatch.setattr(WakingDUL, "nudge", counted_nudge)
    assoc = node.associate()
    assert assoc.is_established
    try:
        senders.clear()
        before = nudges["count"]
        for _ in range(5):
            assert assoc.send_c_store(secondary_capture()).Status == 0x0000
        stores = list(senders)
        store_nudges = nudges["count"] - before
        senders.clear()
        assert assoc.send_c_echo().Status == 0x0000
        echo = list(senders)
    finally:
        assoc.release()
    assert len(stores) == 5 and all(name.startswith("AcceptorThread@") for name in stores), stores
    assert store_nudges == 0
    assert len(echo) == 1 and not echo[0].startswith("AcceptorThread@"), echo


def test_release_ends_the_association_promptly(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DUL's stop is announced, not found by its next TICK: 20 associations in turn."""
    # A long TICK, as above: a release response held back until the next one makes 20
    # releases take ~40 s.
    tick = 2.0
    monkeypatch.setattr(reactor, "TICK", tick)
    started = time.monotonic()
    for _ in range(20):
        assoc = node.associate()
        assert assoc.is_established
        assoc.release()
        assert assoc.is_released
    assert time.monotonic() - started < 20 * tick / 4


def _contexts_as_values(contexts) -> list[tuple]:
    return [
        (cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role)
        for cx in contexts
    ]


def test_associations_share_the_servers_contexts_and_leave_them_unchanged(node: Node) -> None:
    """No deep copy of the 171 supported contexts per association (40 ms of CPU each): every
    association negotiates against the server's own objects, so negotiation, roles included,
    must leave them as they were for the next one."""
    server = node.scp._server
    assert server is not None
    before = _contexts_as_values(server.contexts)
    for _ in range(2):
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(SecondaryCaptureImageStorage, ImplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1",
            node.port,
            ae_title="DICOMNODE",
            ext_neg=[build_role(SecondaryCaptureImageStorage, scu_role=True, scp_role=True)],
        )
        assert assoc.is_established
        try:
            assert len(assoc.accepted_contexts) == 3
            # Answered: the node's side is established too (the requestor is told so by the
            # A-ASSOCIATE-AC, which a loaded machine's node may send before it marks itself).
            assert assoc.send_c_store(secondary_capture()).Status == 0x0000
            # (The last round's association counts until its connection has closed.)
            (served,) = [a for a in node.scp.ae.active_associations if a.is_established]
            shared = served.acceptor.supported_contexts
            assert shared is not server.contexts  # its own list ...
            assert all(a is b for a, b in zip(shared, server.contexts, strict=True))  # ... of them
        finally:
            assoc.release()
    assert _contexts_as_values(server.contexts) == before


def test_an_idle_association_is_aborted_after_the_network_timeout(node: Node) -> None:
    """The idle timer is still watched: a sender that goes quiet is cut off."""
    node.scp.ae.network_timeout = 1
    assoc = node.associate()  # this side's own network timeout is 10 s
    assert assoc.is_established
    deadline = time.monotonic() + 8  # 1 s and a TICK, with room for a loaded machine
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "the node kept an idle association past its network timeout"


def test_a_connection_that_never_asks_is_closed_after_the_acse_timeout(node: Node) -> None:
    """The ARTIM timer is still watched: a TCP connection without an A-ASSOCIATE-RQ."""
    node.scp.ae.acse_timeout = 1
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the node
        assert time.monotonic() - started < 5


def _reader(connection: socket.socket) -> WholeReadSocket:
    transport = WholeReadSocket.__new__(WholeReadSocket)
    transport.socket = connection
    return transport


def test_whole_read_socket_reads_exactly_what_is_asked() -> None:
    ours, theirs = socket.socketpair()
    payload = os.urandom(300_000) + b"next"
    sender = threading.Thread(target=theirs.sendall, args=(payload,))
    sender.start()
    try:
        transport = _reader(ours)
        assert transport.recv(300_000) == payload[:300_000]
        assert transport.recv(4) == b"next"
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_a_huge_declared_pdu_length_takes_memory_only_as_data_arrive() -> None:
    """A hostile peer declares a 4 GiB PDU and sends 3 MB: the read costs megabytes."""
    ours, theirs = socket.socketpair()
    payload = os.urandom(3_000_000)
    sender = threading.Thread(target=lambda: (theirs.sendall(payload), theirs.close()))
    tracemalloc.start()
    try:
        sender.start()
        received = _reader(ours).recv(0xFFFFFFFF)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sender.join()
        ours.close()
    assert received == payload
    assert peak < 4 * len(payload), f"peak {peak / 1e6:.0f} MB"


def test_whole_read_socket_returns_what_came_before_the_connection_broke() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"abc")
    theirs.close()
    try:
        received = _reader(ours).recv(10)
        assert received == b"abc"
        assert isinstance(received, bytearray)
    finally:
        ours.close()


def test_an_acceptor_shut_down_before_it_serves_returns_quietly() -> None:
    """A listener stopped as it starts: shutdown() comes before the acceptor thread's
    serve_forever(), which then returns at once instead of selecting on closed sockets."""

    class Acceptor(reactor.BlockingAcceptor, ThreadedAssociationServer):
        pass

    ae = AE()
    ae.add_supported_context(Verification)
    server = Acceptor(ae, ("127.0.0.1", 0), "ACCEPTOR", ae.supported_contexts)
    ae._servers.append(server)
    started = time.monotonic()
    server.shutdown()
    server.serve_forever()
    assert time.monotonic() - started < 1.0
    assert server.socket.fileno() == -1 and not ae._servers
