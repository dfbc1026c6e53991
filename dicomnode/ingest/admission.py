"""Who may associate with the listener, and how many at once.

A connection is counted as it is accepted (its peer address, the node's open connections)
and closed unserved over a limit; an association request is checked against the allow-list
of peers (calling AE title, peer address), the called AE title, the associations per peer
address and the node's associations (all listener processes together), and rejected with
an A-ASSOCIATE-RJ that says why. Each count is given back once, when its connection ends.
The listener (:mod:`dicomnode.ingest.scp`) calls :class:`AdmissionControl` from its event
handlers and server hooks; the counts themselves live in :mod:`dicomnode.ingest.addresses`
and :mod:`dicomnode.ingest.slots`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pynetdicom import evt

from dicomnode import metrics
from dicomnode.config import Peer, Settings
from dicomnode.ingest.addresses import (
    AddressSlots,
    AddressTableFull,
    Admission,
    address_key,
    connection_limit,
    node_connection_limit,
    table_size,
)
from dicomnode.ingest.slots import AssociationSlots

log = logging.getLogger("dicomnode.ingest")

# How often at most a listener logs the connections it closed at accept, for each reason (a
# host that opens them in a loop would otherwise write a line per connection).
CONNECTION_REFUSALS_LOG_SECONDS = 10.0


def peer_allowed(
    peers: list[Peer], calling_ae: str, address: str, require_known: bool = False
) -> bool:
    """Allow-list check: an empty list accepts everyone unless ``require_known``; a peer
    without host matches any host."""
    if not peers:
        return not require_known
    calling_ae = calling_ae.strip()
    return any(p.ae_title == calling_ae and p.host in ("", address) for p in peers)


def called_ae_accepted(ae_title: str, called_ae: str, required: bool) -> bool:
    """Whether an association calling ``called_ae`` is for this node: any title unless
    ``required`` (``[node] require_called_ae``); spaces around titles are not significant."""
    return not required or called_ae.strip() == ae_title.strip()


def _reject(event: evt.Event, reason: int, refusal: str) -> None:
    """Reject an association permanently, by the service user, for ``reason`` (PS3.8
    9.3.4: 0x03 calling AE title, 0x07 called AE title not recognised), counted under the
    refusals metric's ``refusal``."""
    metrics.count_rejection(refusal)
    event.assoc.acse.send_reject(0x01, 0x01, reason)
    # As pynetdicom's own rejections do: let the DUL send the A-ASSOCIATE-RJ before the
    # socket closes, or the peer sees an abort instead of the reason.
    event.assoc.kill()


def _reject_over_limit(event: evt.Event, limit: str) -> None:
    """Reject an association for a local limit (``limit``, the refusals metric's reason):
    rejected transient, service provider (presentation related function), local limit
    exceeded (PS3.8 9.3.4), as pynetdicom's own maximum_associations check answers; the
    sender may try again later."""
    metrics.count_rejection(limit)
    event.assoc.acse.send_reject(0x02, 0x03, 0x02)
    event.assoc.kill()


class AdmissionControl:
    """One listener's admission of connections and associations, and the counts each holds
    until it ends."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        *,
        slots: AssociationSlots | None = None,
        connections: AssociationSlots | None = None,
        addresses: AddressSlots | None = None,
    ):
        """``settings``: the listener's settings as they are now (a reload replaces them);
        ``slots``, ``connections``, ``addresses``: as for ``StorageSCP``."""
        self._settings = settings
        node = settings().node
        # [node] max_associations as the node started (restart-only, serve.RESTART_ONLY): the
        # shared tables and pynetdicom's own limit are sized by it once.
        self.max_associations = node.max_associations
        self.slots = slots
        self.connections = connections
        if addresses is None:
            addresses = AddressSlots.in_process(table_size(node.max_associations))
        self.addresses = addresses
        self._open_connections: set[int] = set()
        self._counted: set[int] = set()
        # The peer address each association counts against (address_key), until it ends.
        self._address_counted: dict[int, bytes] = {}
        # The same for each open connection, by the peer's (address, port): a connection is
        # counted in the accepting thread, before its association exists.
        self._connection_counted: dict[tuple[str, int], bytes] = {}
        # Connections closed at accept since the last line logged about them, and when, by
        # the line's message: one reason's lines do not hide the first of another's.
        self._refused_connections: dict[str, int] = {}
        self._refusals_logged: dict[str, float] = {}
        self._lock = threading.Lock()

    # Associations -----------------------------------------------------------------

    def admit_association(self, event: evt.Event, calling_ae: str, own_ae: str) -> bool:
        """Check and count the association requested (EVT_REQUESTED) by ``calling_ae``, this
        listener answering as ``own_ae``; False when it has been rejected."""
        requestor = event.assoc.requestor
        address = requestor.address
        settings = self._settings()
        node = settings.node
        if not peer_allowed(settings.peers, calling_ae, address, node.require_known_peers):
            log.warning(
                "association rejected: calling AE %r from %s is not an allowed peer",
                calling_ae,
                address,
            )
            # Rejected permanent, service user, calling AE title not recognised.
            _reject(event, 0x03, "unknown_peer")
            return False
        called_ae = str(requestor.primitive.called_ae_title).strip()
        if not called_ae_accepted(own_ae, called_ae, node.require_called_ae):
            log.warning(
                "association rejected: calling AE %r from %s called %r, not this node's %r",
                calling_ae,
                address,
                called_ae,
                own_ae,
            )
            # Rejected permanent, service user, called AE title not recognised.
            _reject(event, 0x07, "called_ae")
            return False
        # Before the node-wide count: a peer over its own limit never takes a node slot,
        # not even for the moment of the check.
        if not self._count_address(event, calling_ae, address):
            return False
        if self.slots is not None:
            if not self.slots.acquire(self.max_associations):
                log.warning(
                    "association rejected: calling AE %r from %s, node serves "
                    "[node] max_associations already",
                    calling_ae,
                    address,
                )
                self._release_address(id(event.assoc))
                _reject_over_limit(event, "association_limit")
                return False
            with self._lock:
                self._counted.add(id(event.assoc))
        return True

    def _count_address(self, event: evt.Event, calling_ae: str, address: str) -> bool:
        """Count the association against its peer's IP address; False when it is rejected
        because that address holds ``[node] max_associations_per_address`` already."""
        limit = self._settings().node.max_associations_per_address
        try:
            key = address_key(address)
            admitted = self.addresses.acquire(key, limit)
        except AddressTableFull:
            if not limit:
                return True  # no limit to keep: served uncounted
            log.warning(
                "association rejected: calling AE %r from %s, this listener counts "
                "associations from %d different addresses already, its most (a restart "
                "makes room)",
                calling_ae,
                address,
                self.addresses.entries,
            )
            _reject_over_limit(event, "address_limit")
            return False
        except (OSError, ValueError) as exc:
            # Served rather than refused: the count is a protection, not the service.
            log.error(
                "association from %s not counted for [node] max_associations_per_address: %s",
                address,
                exc,
            )
            return True
        if not admitted:
            log.warning(
                "association rejected: calling AE %r from %s, that address holds "
                "[node] max_associations_per_address (%d) already",
                calling_ae,
                address,
                limit,
            )
            _reject_over_limit(event, "address_limit")
            return False
        with self._lock:
            self._address_counted[id(event.assoc)] = key
        return True

    def _release_address(self, assoc_id: int) -> None:
        with self._lock:
            key = self._address_counted.pop(assoc_id, None)
        if key is None:
            return
        try:
            self.addresses.release(key)
        except OSError:
            log.exception("could not release a peer address's association count")

    # Connections ------------------------------------------------------------------

    def admit_connection(self, client_address: tuple) -> bool:
        """Count a connection just accepted against its peer's IP address and the node;
        False (it is closed unserved) when that address has ``connection_limit`` of ``[node]
        max_associations_per_address`` open already, when the node has
        ``node_connection_limit`` of ``[node] max_associations`` open already (all listener
        processes together), or when this listener's table has no entry left for a new
        address. Runs in the accepting thread (the server's ``admit_connection`` hook)."""
        node = self._settings().node
        limit = connection_limit(node.max_associations_per_address)
        node_limit = node_connection_limit(self.max_associations)
        address, port = client_address[0], client_address[1]
        try:
            key = address_key(address)
            admitted = self.addresses.connect(key, limit, node_limit)
        except AddressTableFull:
            # Closed, not served uncounted: an address not counted escapes both caps. Under
            # the node's cap the table cannot fill (table_size); should it all the same (counts
            # lost to an error), a restart empties it.
            self._log_refused_connection(
                Admission.NODE_LIMIT.value,
                "connection from %s closed unserved: this listener's table of peer addresses "
                "is full (%d addresses); a restart makes room",
                address,
                self.addresses.entries,
            )
            return False
        except (OSError, ValueError) as exc:
            # Served rather than refused: the count is a protection, not the service.
            log.error(
                "connection from %s not counted for [node] max_associations_per_address: %s",
                address,
                exc,
            )
            return True
        if admitted is Admission.ADDRESS_LIMIT:
            self._log_refused_connection(
                admitted.value,
                "connection from %s closed unserved: that address has %d connections open "
                "already (twice [node] max_associations_per_address)",
                address,
                limit,
            )
            return False
        if admitted is Admission.NODE_LIMIT:
            self._log_refused_connection(
                admitted.value,
                "connection from %s closed unserved: the node has %d connections open "
                "already (twice [node] max_associations, all listeners together)",
                address,
                node_limit,
            )
            return False
        with self._lock:
            self._connection_counted[(address, port)] = key
        return True

    def _log_refused_connection(self, reason: str, message: str, *args: object) -> None:
        """Count a connection closed at accept under the refusals metric's ``reason``, and
        log ``message`` (a format) unless that message went out less than
        CONNECTION_REFUSALS_LOG_SECONDS ago, with how many were closed so since."""
        metrics.REFUSALS.labels(reason).inc()
        now = time.monotonic()
        with self._lock:
            refused = self._refused_connections.get(message, 0) + 1
            logged = self._refusals_logged.get(message, 0.0)
            if logged and now - logged < CONNECTION_REFUSALS_LOG_SECONDS:
                self._refused_connections[message] = refused
                return
            self._refused_connections[message] = 0
            self._refusals_logged[message] = now
        log.warning(message + "; %d closed so since the last such line", *args, refused)

    def release_connection(self, client_address: tuple) -> None:
        """Count the connection from ``client_address`` (admitted by ``admit_connection``)
        less, once: at its association's end, or when it fails before one took it over (the
        server's ``connection_failed`` hook)."""
        with self._lock:
            key = self._connection_counted.pop((client_address[0], client_address[1]), None)
        if key is None:
            return
        try:
            self.addresses.disconnect(key)
        except OSError:
            log.exception("could not release a peer address's connection count")

    def on_opened(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN: SharedSocketServer counted the connection when it accepted it; it
        is released when it closes."""
        if self.connections is not None:
            with self._lock:
                self._open_connections.add(id(event.assoc))

    def on_closed(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: the connection's counts are freed."""
        self.release(event.assoc)

    def release(self, assoc) -> None:
        """Free what ``assoc``'s connection counts (its peer address, its node slot, the
        connection its listener serves), once: at its connection's close, or when its
        thread ends, whichever comes first (the reactor calls this through the server's
        ``association_ended``, also where pynetdicom closes a connection without an event
        or an exception ends the thread)."""
        self._release_address(id(assoc))
        requestor = assoc.requestor
        self.release_connection((requestor.address, requestor.port))
        with self._lock:
            counted = id(assoc) in self._counted
            self._counted.discard(id(assoc))
            opened = id(assoc) in self._open_connections
            self._open_connections.discard(id(assoc))
        if counted and self.slots is not None:
            self.slots.release()
        if opened and self.connections is not None:
            self.connections.release()
