"""One peer address cannot hold every association, and a vanished peer is noticed.

``[node] max_associations_per_address`` over real associations (pynetdicom and dcmtk
peers, the node's real listener in-process and under ``dicomnode serve`` with two listener
processes), the counts freed however an association ends, the open connections of one
address, and of the whole node over many addresses, capped from their accept (silent ones,
that never send an association request, included), and TCP keepalive on the connections
the listener accepts.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningNode, dcmtk, start_node, stop_node, wait_for, write_config
from prometheus_client import REGISTRY
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session, sessionmaker
from test_ingest_scale import children
from test_reload import _config
from test_scp import Node, secondary_capture
from test_scp import start_node as start_scp
from test_tls import _certificates

from dicomnode.config import load_settings
from dicomnode.ingest import keepalive
from dicomnode.ingest.addresses import (
    SPARE_ENTRIES,
    AddressSlots,
    AddressTableFull,
    Admission,
    address_key,
    connection_limit,
    create_address_slots,
    node_connection_limit,
    table_size,
)
from dicomnode.ingest.reactor import EventDrivenRequestHandler, WakingDUL
from dicomnode.models.registry import discover_cards
from dicomnode.serve import LIVE_NODE_KEYS
from dicomnode.serve import Node as RunningConfig

# Rejected transient, service provider (presentation related function), local limit exceeded.
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
OTHER_HOST = "127.0.0.2"


def _loopback_alias_usable() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((OTHER_HOST, 0))
        return True
    except OSError:
        return False


needs_other_host = pytest.mark.skipif(
    not _loopback_alias_usable(), reason=f"cannot send from {OTHER_HOST} on this host"
)


class Attempt:
    """One association request from ``source`` and the A-ASSOCIATE-RJ it got, if any."""

    def __init__(self, port: int, source: str = "127.0.0.1", calling_ae: str = "MODALITY"):
        self.rejection: tuple[int, int, int] | None = None
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        self.assoc: Association = ae.associate(
            "127.0.0.1",
            port,
            ae_title="DICOMNODE",
            bind_address=(source, 0),
            evt_handlers=[(evt.EVT_ACSE_RECV, self._received)],
        )
        if not self.assoc.is_established and self.assoc.ident is not None:
            # associate() also returns once the socket closes, which the node does right after
            # its A-ASSOCIATE-RJ: the association's thread may not have read the RJ yet (seen
            # once in a clean-clone run: rejection None, pynetdicom's "Association Rejected"
            # logged after). It ends once it has.
            self.assoc.join(timeout=10)

    def _received(self, event: evt.Event) -> None:
        primitive = event.primitive
        if getattr(primitive, "result", None) in (0x01, 0x02):
            self.rejection = (primitive.result, primitive.result_source, primitive.diagnostic)

    @property
    def established(self) -> bool:
        return self.assoc.is_established

    def echo(self) -> int:
        return self.assoc.send_c_echo().Status


def _established(port: int, count: int, source: str = "127.0.0.1") -> list[Attempt]:
    held = [Attempt(port, source) for _ in range(count)]
    assert all(attempt.established for attempt in held)
    return held


def _reloaded(node: Node, **node_keys: object) -> None:
    """Give the running listener its settings with ``node_keys`` of [node] changed, as a
    reload does."""
    settings = node.scp.settings.model_copy(deep=True)
    settings.node = settings.node.model_copy(update=node_keys)
    node.scp.settings = settings


def _released(node: Node, address: str = "127.0.0.1") -> None:
    """Wait until the node counts no association from ``address`` (the requestor closes the
    connection up to ~10 ms after release() returns)."""
    key = address_key(address)
    wait_for(lambda: node.scp.admission.addresses.count(key) == 0, timeout=10, interval=0.01)


def _other_host_served(port: int) -> None:
    """An association from OTHER_HOST is accepted and answers a C-ECHO."""
    other = Attempt(port, OTHER_HOST)
    assert other.established
    assert other.echo() == 0x0000
    other.assoc.release()


def _limit_served_again(node: Node) -> None:
    """Two associations from this address are accepted (the limit, 2, is free again)."""
    for attempt in _established(node.port, 2):
        attempt.assoc.release()


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_scp(tmp_path, sessions, {"max_associations_per_address": 2})


# The limit over real associations -----------------------------------------------------


@needs_other_host
def test_one_address_over_its_limit_is_rejected_while_another_is_served(node: Node) -> None:
    held = _established(node.port, 2)
    try:
        over = Attempt(node.port)
        assert over.assoc.is_rejected
        assert over.rejection == LOCAL_LIMIT_EXCEEDED
        other = Attempt(node.port, OTHER_HOST)
        assert other.established, "another host was refused with the first one's limit"
        assert other.echo() == 0x0000
        other.assoc.release()
        assert held[0].echo() == 0x0000  # those served go on
    finally:
        for attempt in held:
            attempt.assoc.release()
    _released(node)
    _limit_served_again(node)


def test_dcmtk_sees_the_rejection_as_transient_local_limit_exceeded(node: Node) -> None:
    held = _established(node.port, 2)
    port = str(node.port)
    try:
        result = subprocess.run(
            [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", port],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        for attempt in held:
            attempt.assoc.release()
    said = (result.stdout + result.stderr).lower()
    assert result.returncode != 0
    assert "association rejected" in said
    assert "rejected transient" in said
    assert "service provider (presentation related" in said
    assert "local limit exceeded" in said


def test_rejected_requests_take_no_count_and_ended_ones_give_theirs_back(node: Node) -> None:
    """Abort, the node's network timeout and release each free their association's count;
    the requests refused in between never took one."""
    key = address_key("127.0.0.1")
    held = _established(node.port, 2)
    for _ in range(3):
        assert Attempt(node.port).rejection == LOCAL_LIMIT_EXCEEDED
    held[0].assoc.abort()
    wait_for(lambda: node.scp.admission.addresses.count(key) == 1, timeout=10, interval=0.01)
    # The node cuts its associations off once they idle for its network timeout.
    _reloaded(node, network_timeout_seconds=1.0)
    idle = Attempt(node.port)
    assert idle.established
    wait_for(lambda: idle.assoc.is_aborted and held[1].assoc.is_aborted, timeout=10)
    _released(node)
    _limit_served_again(node)


def test_an_association_whose_connection_fails_inside_the_node_gives_its_count_back(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in the node's DUL thread: pynetdicom sends an A-ABORT and closes the
    socket without EVT_CONN_CLOSE, which alone freed the counts."""
    original = WakingDUL._is_transport_event
    failing = {"now": False}

    def breaks(self: WakingDUL) -> bool:
        if failing["now"] and self.assoc.is_established:
            raise RuntimeError("a fault in the DUL thread")
        return original(self)

    monkeypatch.setattr(WakingDUL, "_is_transport_event", breaks)
    # Its traceback is expected here.
    monkeypatch.setattr(logging.getLogger("pynetdicom.dul"), "disabled", True)
    held = _established(node.port, 2)
    failing["now"] = True
    wait_for(lambda: all(a.assoc.is_aborted for a in held), timeout=10, interval=0.05)
    failing["now"] = False
    _released(node)
    _limit_served_again(node)


def test_a_reload_applies_the_limit_to_new_associations(node: Node) -> None:
    held = _established(node.port, 2)
    try:
        settings = node.scp.settings.model_copy(deep=True)
        settings.node.max_associations_per_address = 0  # no limit
        node.scp.settings = settings  # what a reload does
        extra = Attempt(node.port)
        assert extra.established
        extra.assoc.release()
        # The extra one's connection may still be closing.
        key = address_key("127.0.0.1")
        wait_for(
            lambda: node.scp.admission.addresses.connections(key) == 2, timeout=10, interval=0.01
        )
        settings = settings.model_copy(deep=True)
        settings.node.max_associations_per_address = 2
        node.scp.settings = settings
        assert Attempt(node.port).rejection == LOCAL_LIMIT_EXCEEDED
        # And to new connections: at 1, the two open are all the address may have.
        settings = settings.model_copy(deep=True)
        settings.node.max_associations_per_address = 1
        node.scp.settings = settings
        closed = Attempt(node.port)
        assert not closed.established and closed.rejection is None
    finally:
        for attempt in held:
            attempt.assoc.release()


def test_the_limit_is_a_live_key_of_a_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert "max_associations_per_address" in LIVE_NODE_KEYS
    config = _config(tmp_path)
    settings = load_settings(config)
    assert settings.node.max_associations_per_address == 16
    running = RunningConfig(config, settings, discover_cards(settings.model_folders), None)
    config.write_text(
        config.read_text().replace("[node]\n", "[node]\nmax_associations_per_address = 3\n", 1)
    )
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        assert running.reload()
    assert running.settings.node.max_associations_per_address == 3
    assert "takes effect at the next restart" not in caplog.text


def test_a_reload_of_max_associations_waits_for_the_restart(small_node: Node) -> None:
    """max_associations is restart-only: the tables were sized by it, and a reload that
    lowered it took effect for the connection cap alone (a raised one filled the tables)."""
    assert "max_associations" not in LIVE_NODE_KEYS
    settings = small_node.scp.settings.model_copy(deep=True)
    settings.node.max_associations = 1  # a cap of 2 connections, were it applied
    small_node.scp.settings = settings  # what a reload does
    silent = _silent(small_node.port, node_connection_limit(2))
    try:
        wait_for(
            lambda: small_node.scp.admission.addresses.all_connections() == len(silent),
            timeout=10,
            interval=0.01,
            what="every connection within the cap of the node as it started counted",
        )
        assert not any(_closed_by_node(c) for c in silent)
    finally:
        for connection in silent:
            connection.close()


def _closed_at_accept(reason: str) -> float:
    """Connections closed at accept so far for ``reason`` (dicomnode_refusals_total)."""
    return REGISTRY.get_sample_value("dicomnode_refusals_total", {"reason": reason}) or 0.0


@needs_other_host
def test_a_listener_with_no_entry_left_closes_a_new_address_rather_than_serve_it_uncounted(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A new address's connection was served uncounted when the listener's table was full
    (more distinct addresses than it was sized for: counts lost to errors), escaping the
    caps on connections. It is closed unserved, with a line that says a restart makes room."""
    node.scp.admission.addresses = AddressSlots.in_process(1)
    before = _closed_at_accept("node_connection_limit")
    first = Attempt(node.port)
    try:
        assert first.established
        with caplog.at_level(logging.WARNING, logger="dicomnode.ingest"):
            refused = Attempt(node.port, OTHER_HOST)
        assert not refused.established
        assert refused.rejection is None, "its connection was served"
        assert _closed_at_accept("node_connection_limit") == before + 1
        assert "table of peer addresses is full" in caplog.text
        assert "a restart makes room" in caplog.text
        assert first.echo() == 0x0000  # the address counted goes on
    finally:
        first.assoc.release()
    _released(node)
    wait_for(lambda: node.scp.admission.addresses.all_connections() == 0, timeout=10, interval=0.01)
    _other_host_served(node.port)


# Connections that never associate -------------------------------------------------------


def _silent(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` TCP connections to the node that send nothing."""
    return [
        socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        for _ in range(count)
    ]


def _closed_by_node(connection: socket.socket) -> bool:
    """Whether the node closed ``connection`` (it never sends on one that sent nothing)."""
    connection.setblocking(False)
    try:
        return connection.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _loopback_hosts(count: int) -> list[str]:
    """``count`` loopback addresses besides 127.0.0.1 (Linux routes all of 127/8 to lo)."""
    return [f"127.0.0.{number}" for number in range(2, 2 + count)]


def _silent_from_each(port: int, hosts: list[str]) -> list[socket.socket]:
    """One silent connection to the node from each of ``hosts``."""
    return [connection for host in hosts for connection in _silent(port, 1, host)]


def _echoscu(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _storescu(port: int, folder: Path) -> subprocess.CompletedProcess:
    """dcmtk's storescu sends one Secondary Capture instance (written to ``folder``)."""
    path = folder / "instance.dcm"
    secondary_capture().save_as(path, enforce_file_format=True)
    arguments = ["-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(path)]
    return subprocess.run(
        [dcmtk("storescu"), *arguments],
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_other_host
def test_silent_connections_beyond_the_cap_are_closed_and_given_back_when_they_go(
    node: Node, tmp_path: Path
) -> None:
    """A host that opens connections and sends nothing held a thread (two, with the DUL)
    for each until the ACSE timeout, uncounted: hundreds from one address. Its open
    connections are capped from their accept, at twice its association limit (2 here)."""
    key = address_key("127.0.0.1")
    cap = connection_limit(2)
    silent = _silent(node.port, 3 * cap)
    try:
        wait_for(
            lambda: sum(_closed_by_node(c) for c in silent) == 2 * cap,
            timeout=10,
            interval=0.05,
            what="the connections over the cap closed",
        )
        assert node.scp.admission.addresses.connections(key) == cap
        assert node.scp.admission.addresses.count(key) == 0  # none of them is an association
        # A real sender from that address is refused while they stay open,
        assert not Attempt(node.port).established
        assert _echoscu(node.port).returncode != 0
        # another host is served as before,
        _other_host_served(node.port)
    finally:
        for connection in silent:
            connection.close()
    # and once they are gone, the address's counts are given back and it is served again.
    wait_for(lambda: node.scp.admission.addresses.connections(key) == 0, timeout=10, interval=0.01)
    echo = _echoscu(node.port)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    store = _storescu(node.port, tmp_path)
    assert store.returncode == 0, store.stdout + store.stderr
    assert len(node.files()) == 1


@pytest.fixture
def small_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    """A node of max_associations 2: its connection cap is 4."""
    yield from start_scp(tmp_path, sessions, {"max_associations": 2})


@needs_other_host
def test_silent_connections_from_many_addresses_are_capped_for_the_node(
    small_node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each address within its own cap, many addresses (hundreds of hosts, or one host with
    many IP addresses) held a thread or two for each silent connection until the ACSE
    timeout. The node's open connections are capped at twice max_associations (2 here),
    whatever their address; those beyond are closed as they are accepted."""
    cap = node_connection_limit(2)
    before = _closed_at_accept("node_connection_limit")
    with caplog.at_level(logging.WARNING, logger="dicomnode.ingest"):
        silent = _silent_from_each(small_node.port, _loopback_hosts(cap + 2))
        try:
            wait_for(
                lambda: sum(_closed_by_node(c) for c in silent) == 2,
                timeout=10,
                interval=0.05,
                what="the connections over the node's cap closed",
            )
            assert small_node.scp.admission.addresses.all_connections() == cap
            assert _closed_at_accept("node_connection_limit") == before + 2
            # A real sender from yet another address is closed too while they stay open.
            closed = Attempt(small_node.port)
            assert not closed.established and closed.rejection is None
            assert _echoscu(small_node.port).returncode != 0
        finally:
            for connection in silent:
                connection.close()
    assert "closed unserved: the node has 4 connections open already" in caplog.text
    # Once they are gone, their counts are given back and senders are served again,
    wait_for(
        lambda: small_node.scp.admission.addresses.all_connections() == 0, timeout=10, interval=0.01
    )
    echo = _echoscu(small_node.port)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    store = _storescu(small_node.port, tmp_path)
    assert store.returncode == 0, store.stdout + store.stderr
    assert len(small_node.files()) == 1
    # and a sender at the node's association limit is still told why.
    held = _established(small_node.port, 2)
    try:
        assert Attempt(small_node.port, OTHER_HOST).rejection == LOCAL_LIMIT_EXCEEDED
    finally:
        for attempt in held:
            attempt.assoc.release()


@needs_other_host
def test_silent_connections_take_no_association_slot_of_the_listener(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """pynetdicom's own limit (max_associations, per listener) counted every connection's
    thread: one host's silent connections had every other sender rejected."""
    limits = {"max_associations": 2, "max_associations_per_address": 2}
    for small in start_scp(tmp_path, sessions, limits):
        # As many as pynetdicom's limit: they filled it. With the two associations, the
        # node's connection cap (twice max_associations) is reached, not passed.
        silent = _silent(small.port, 2)
        try:
            same = Attempt(small.port)
            other = Attempt(small.port, OTHER_HOST)
            assert same.established and other.established
            assert same.echo() == other.echo() == 0x0000
            same.assoc.release()
            other.assoc.release()
        finally:
            for connection in silent:
                connection.close()


def test_a_peer_at_its_association_limit_is_still_told_why(node: Node) -> None:
    """The connection cap leaves room beyond the association limit: a peer that holds its
    associations, and even has silent connections open, gets its A-ASSOCIATE-RJ."""
    held = _established(node.port, 2)
    silent = _silent(node.port, connection_limit(2) - 3)
    try:
        assert Attempt(node.port).rejection == LOCAL_LIMIT_EXCEEDED
        assert not any(_closed_by_node(c) for c in silent)
    finally:
        for connection in silent:
            connection.close()
        for attempt in held:
            attempt.assoc.release()
    _released(node)


def test_silent_connections_are_closed_at_the_acse_timeout_and_give_their_counts_back(
    node: Node,
) -> None:
    key = address_key("127.0.0.1")
    _reloaded(node, acse_timeout_seconds=1.0)  # read as each connection is accepted
    cap = connection_limit(2)
    started = time.monotonic()
    silent = _silent(node.port, cap)
    try:
        wait_for(
            lambda: all(_closed_by_node(c) for c in silent),
            timeout=10,
            interval=0.05,
            what="the silent connections closed by the node",
        )
        assert time.monotonic() - started < 8  # 1 s, and room for a loaded machine; not 30
        wait_for(
            lambda: node.scp.admission.addresses.connections(key) == 0, timeout=10, interval=0.01
        )
    finally:
        for connection in silent:
            connection.close()
    _limit_served_again(node)


def test_a_request_sent_a_byte_at_a_time_is_cut_off_at_the_acse_timeout(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Each byte restarted the socket's timeout (the network timeout, 60 s): a peer that
    sent its association request a byte now and then held the connection and its threads
    for as long as it liked."""
    key = address_key("127.0.0.1")
    _reloaded(node, acse_timeout_seconds=1.0)
    # An A-ASSOCIATE-RQ header announcing 1000 bytes, then the bytes, one every 0.2 s.
    trickle = b"\x01\x00" + (1000).to_bytes(4, "big") + bytes(1000)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port)) as slow:
        with caplog.at_level(logging.WARNING, logger="dicomnode.ingest"):
            for byte in trickle:
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    break  # reset by the node
                if _closed_by_node(slow):
                    break
                slow.setblocking(True)
                assert time.monotonic() - started < 20, "the slow request was never cut off"
                time.sleep(0.2)
        assert time.monotonic() - started < 8  # 1 s, and room for a loaded machine; not 30
    assert "its association request did not arrive in full" in caplog.text
    wait_for(lambda: node.scp.admission.addresses.connections(key) == 0, timeout=10, interval=0.01)
    _limit_served_again(node)


def test_a_connection_that_fails_before_its_association_gives_its_count_back(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection whose serving thread fails before its association exists (no thread
    left to start one, a fault in the handler) is closed and uncounted, not kept."""
    key = address_key("127.0.0.1")

    def fails(self: EventDrivenRequestHandler) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(EventDrivenRequestHandler, "_create_association", fails)
    # socketserver prints the traceback to stderr: expected here.
    silent = _silent(node.port, 2)
    try:
        wait_for(lambda: all(_closed_by_node(c) for c in silent), timeout=10, interval=0.05)
        wait_for(
            lambda: node.scp.admission.addresses.connections(key) == 0, timeout=10, interval=0.01
        )
    finally:
        for connection in silent:
            connection.close()
    monkeypatch.undo()
    _limit_served_again(node)


# Over several listener processes -------------------------------------------------------


def _listener_of(port: int, listeners: list[int], client_port: int) -> int:
    """The listener process holding the node's end of the connection from ``client_port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == port and remote_port == client_port:
                inodes.add(fields[9])
    for pid in listeners:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    raise LookupError(f"no listener holds the connection from port {client_port}")


def _two_listener_node(tmp_path: Path, node_keys: str = "") -> tuple[RunningNode, list[int]]:
    """A node of two listener processes, no worker, and max_associations_per_address 2 (and
    ``node_keys``, lines of [node]); and its listeners' process ids."""
    config, port, web_port = write_config(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    body = config.read_text()
    body = body.replace(
        f"port = {port}\n", f"port = {port}\nmax_associations_per_address = 2\n{node_keys}"
    )
    config.write_text(body.replace("[worker]\ncount = 1\n", "[worker]\ncount = 0\n"))
    running = start_node(tmp_path, config, port, web_port)
    listeners = [p for p, cmd in children(running.process.pid).items() if " listener " in cmd]
    if len(listeners) != 2:
        stop_node(running)
        raise AssertionError(f"{len(listeners)} listener processes, not 2")
    return running, listeners


@needs_other_host
def test_the_limit_holds_over_all_listener_processes(tmp_path: Path) -> None:
    running, listeners = _two_listener_node(tmp_path)
    port = running.port
    try:
        held = _established(port, 2)
        try:
            serving = {_listener_of(port, listeners, a.assoc.requestor.port) for a in held}
            assert serving == set(listeners), "both associations went to one listener"
            over = Attempt(port)
            assert over.rejection == LOCAL_LIMIT_EXCEEDED
            other = Attempt(port, OTHER_HOST)
            assert other.established
            other.assoc.release()
        finally:
            for attempt in held:
                attempt.assoc.release()
        # Counted until each connection closes, shortly after release() returns.
        wait_for(lambda: _accepted_and_released(port), timeout=10, interval=0.05)
        assert "that address holds [node] max_associations_per_address (2)" in (
            running.log.read_text()
        )
    finally:
        stop_node(running)


@needs_other_host
def test_silent_connections_are_capped_over_all_listener_processes(tmp_path: Path) -> None:
    running, listeners = _two_listener_node(tmp_path)
    port = running.port
    try:
        cap = connection_limit(2)
        silent = _silent(port, cap + 2)
        try:
            _two_closed_the_rest_spread(port, listeners, silent)
            assert not Attempt(port).established
            _other_host_served(port)
        finally:
            for connection in silent:
                connection.close()
        wait_for(lambda: _accepted_and_released(port), timeout=10, interval=0.05)
        assert "closed unserved: that address has 4 connections open" in running.log.read_text()
        assert running.process.poll() is None
    finally:
        stop_node(running)


@needs_other_host
def test_the_node_connection_cap_holds_over_all_listener_processes(tmp_path: Path) -> None:
    running, listeners = _two_listener_node(tmp_path, "max_associations = 2\n")
    port = running.port
    try:
        cap = node_connection_limit(2)
        silent = _silent_from_each(port, _loopback_hosts(cap + 2))
        try:
            _two_closed_the_rest_spread(port, listeners, silent)
            closed = Attempt(port)  # from yet another address
            assert not closed.established and closed.rejection is None
        finally:
            for connection in silent:
                connection.close()
        wait_for(lambda: _accepted_and_released(port), timeout=10, interval=0.05)
        assert "closed unserved: the node has 4 connections open" in running.log.read_text()
        assert running.process.poll() is None
    finally:
        stop_node(running)


def _two_closed_the_rest_spread(
    port: int, listeners: list[int], silent: list[socket.socket]
) -> None:
    """Two connections of ``silent`` (two over a cap) are closed by the node, and those it
    keeps are served by every listener process, not one."""
    wait_for(
        lambda: sum(_closed_by_node(c) for c in silent) == 2,
        timeout=10,
        interval=0.05,
        what="the connections over the cap closed",
    )
    kept = [c for c in silent if not _closed_by_node(c)]
    serving = {_listener_of(port, listeners, c.getsockname()[1]) for c in kept}
    assert serving == set(listeners), "all silent connections went to one listener"


def _accepted_and_released(port: int) -> bool:
    attempts = [Attempt(port) for _ in range(2)]
    accepted = [attempt.established for attempt in attempts]
    for attempt in attempts:
        if attempt.established:
            attempt.assoc.release()
    return all(accepted)


# TCP keepalive ----------------------------------------------------------------------------


def test_accepted_connections_have_tcp_keepalive(node: Node) -> None:
    held = Attempt(node.port)
    try:
        assert held.established
        (acceptor,) = [a for a in node.scp.ae.active_associations if a.is_acceptor]
        connection = acceptor.dul.socket.socket
        assert connection.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6
    finally:
        held.assoc.release()


@pytest.fixture
def tls_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[tuple[Node, Path]]:
    certs = _certificates(tmp_path / "tls")
    tls = {
        "enabled": True,
        "cert": str(certs / "server.pem"),
        "key": str(certs / "server.key"),
        "ca": str(certs / "ca.pem"),
    }
    for node in start_scp(tmp_path, sessions, tls=tls):
        yield node, certs


def test_a_silent_peer_does_not_hold_up_the_tls_handshakes_of_others(
    tls_node: tuple[Node, Path],
) -> None:
    """The TLS handshake ran in the listener's accepting thread, on a socket without a
    timeout: a peer that connected and sent nothing (or vanished before its ClientHello)
    stopped the listener accepting anyone, for good. It runs in the connection's own
    thread now, bounded by the network timeout."""
    node, certs = tls_node
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        tls = ["+tls", str(certs / "client.key"), str(certs / "client.pem")]
        command = [dcmtk("echoscu"), "-aec", "DICOMNODE", *tls, "+cf", str(certs / "ca.pem")]
        try:
            result = subprocess.run(
                [*command, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=20
            )
        except subprocess.TimeoutExpired:
            pytest.fail("a connection that sent nothing held up the next TLS peer")
        assert result.returncode == 0, result.stdout + result.stderr
        # The silent one's handshake ends at the network timeout, with a line for the admin.
        _reloaded(node, network_timeout_seconds=1.0)
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        silent.settimeout(10)
        assert silent.recv(1) == b""


def test_keepalive_on_a_closed_socket_does_not_raise() -> None:
    closed = socket.socket()
    closed.close()
    keepalive.enable_keepalive(closed)


# The shared counts ----------------------------------------------------------------------


def test_address_counts_add_up_over_listeners_and_free_a_dead_ones(tmp_path: Path) -> None:
    path = tmp_path / "addresses.slots"
    create_address_slots(path, 2, 3)
    first, second = AddressSlots(path, 0), AddressSlots(path, 1)
    modality, pacs = address_key("10.0.0.5"), address_key("10.0.0.6")
    assert address_key("::ffff:10.0.0.5") == modality  # a dual-stack socket's view of it
    assert first.acquire(modality, 2) and second.acquire(modality, 2)
    assert not first.acquire(modality, 2) and not second.acquire(modality, 2)
    assert second.acquire(pacs, 2)
    assert first.acquire(modality, 0)  # no limit: counted all the same
    assert first.count(modality) == 3
    first.release(modality)
    first.release(modality)
    assert first.count(modality) == 1
    second.reset()  # its process died
    assert first.count(modality) == 0 and first.count(pacs) == 0
    assert first.acquire(modality, 1)
    for number in range(2):
        assert first.acquire(address_key(f"10.0.1.{number}"), 1)
    with pytest.raises(AddressTableFull):
        first.acquire(address_key("10.0.2.1"), 1)
    assert first.acquire(modality, 2)  # an address it counts already needs no new entry


def test_connections_and_associations_of_an_address_are_counted_apart(tmp_path: Path) -> None:
    path = tmp_path / "addresses.slots"
    create_address_slots(path, 2, 2)
    first, second = AddressSlots(path, 0), AddressSlots(path, 1)
    modality = address_key("10.0.0.5")
    assert first.connect(modality, 2) and second.connect(modality, 2)
    assert not first.connect(modality, 2)  # two open over both listeners
    assert first.acquire(modality, 1)  # its association: the same entry, another count
    assert not second.acquire(modality, 1)
    assert (first.connections(modality), first.count(modality)) == (2, 1)
    first.disconnect(modality)
    assert (first.connections(modality), first.count(modality)) == (1, 1)
    first.disconnect(modality)  # none left here: nothing happens
    assert first.connections(modality) == 1
    # The entry stays taken while its association counts, and is free once both are 0.
    assert first.connect(address_key("10.0.0.6"), 2)
    with pytest.raises(AddressTableFull):
        first.connect(address_key("10.0.0.7"), 2)
    first.release(modality)
    assert first.connect(address_key("10.0.0.7"), 2)
    assert connection_limit(0) == 0  # no association limit: no connection limit either


def test_the_node_connection_cap_counts_every_address_over_all_listeners(
    tmp_path: Path,
) -> None:
    path = tmp_path / "addresses.slots"
    create_address_slots(path, 2, table_size(2))
    first, second = AddressSlots(path, 0), AddressSlots(path, 1)
    cap = node_connection_limit(2)
    assert cap == 4
    modality, pacs, scanner, laptop, printer = (address_key(f"10.0.0.{n}") for n in range(5))
    assert first.connect(modality, 4, cap) and first.connect(pacs, 4, cap)
    assert second.connect(scanner, 4, cap) and second.connect(modality, 4, cap)
    assert first.all_connections() == cap
    # The node is full: a new address is refused on either listener, a counted one too,
    assert first.connect(laptop, 4, cap) is Admission.NODE_LIMIT
    assert second.connect(laptop, 4, cap) is Admission.NODE_LIMIT
    assert second.connect(pacs, 4, cap) is Admission.NODE_LIMIT
    # and an address at its own cap is told that first.
    assert first.connect(modality, 2, cap) is Admission.ADDRESS_LIMIT
    assert first.all_connections() == cap and first.connections(laptop) == 0
    assert first.acquire(modality, 2)  # associations have their own node-wide limit
    second.disconnect(modality)
    assert second.connect(laptop, 4, cap) is Admission.ADMITTED
    assert first.connect(printer, 4, cap) is Admission.NODE_LIMIT
    first.disconnect(pacs)
    assert first.connect(printer, 4, cap)
    second.reset()  # its process died: its connections are given back too
    assert first.all_connections() == 2
    assert first.connect(laptop, 0, 0)  # 0: neither cap


def test_a_listeners_table_cannot_fill_under_the_node_connection_cap(tmp_path: Path) -> None:
    """Every connection the node's cap lets in may be one listener's, each from another
    address and with its association: the table without its spare entries holds them all,
    and the one after is refused by the cap, not by a full table."""
    max_associations = 3
    cap = node_connection_limit(max_associations)
    path = tmp_path / "addresses.slots"
    create_address_slots(path, 2, table_size(max_associations) - SPARE_ENTRIES)
    first = AddressSlots(path, 0)
    for number in range(cap):
        host = address_key(f"10.0.1.{number}")
        assert first.connect(host, 0, cap)
        assert first.acquire(host, 0)
    assert first.connect(address_key("10.0.2.1"), 0, cap) is Admission.NODE_LIMIT


def test_threads_of_one_listener_do_not_lose_counts(tmp_path: Path) -> None:
    """A listener's association threads share its descriptor, and flock does not exclude
    one holder of a descriptor from another: without a lock of their own, two threads'
    read-and-write of the same entry interleave and a count is lost."""
    path = tmp_path / "addresses.slots"
    create_address_slots(path, 1, 4)
    slots = AddressSlots(path, 0)
    modality = address_key("10.0.0.5")

    def take(times: int) -> None:
        for _ in range(times):
            slots.acquire(modality, 0)

    workers = [threading.Thread(target=take, args=(300,)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert slots.count(modality) == 8 * 300


@pytest.fixture
def one_association_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_scp(tmp_path, sessions, {"max_associations": 1})


def test_a_released_association_no_longer_counts_while_its_thread_winds_down(
    one_association_node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender at the association limit that releases and at once associates again (a
    modality sending studies back to back) was rejected, "local limit exceeded", while the
    released association's thread was still stopping its DUL (a few ms; seen in a full run).
    Its stop is slowed here, so that the next request surely comes during it."""
    from dicomnode.ingest.reactor import EventDrivenAssociation

    kill = EventDrivenAssociation.kill

    def slowly(self: EventDrivenAssociation) -> None:
        if self.is_released:
            time.sleep(1.0)
        kill(self)

    monkeypatch.setattr(EventDrivenAssociation, "kill", slowly)
    for _ in range(3):
        (first,) = _established(one_association_node.port, 1)
        assert first.echo() == 0x0000
        first.assoc.release()
        (again,) = _established(one_association_node.port, 1)
        assert again.echo() == 0x0000
        again.assoc.release()
