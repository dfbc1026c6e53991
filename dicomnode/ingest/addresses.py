"""Associations and connections per peer address, counted over all listener processes.

``[node] max_associations`` bounds the node; without a bound per address one host (a
misconfigured PACS that opens a connection per instance, a scanner that retries in a loop,
a hostile caller) could hold every slot and lock every other modality out. And a connection
is served by threads of its own from the moment it is accepted, long before its association
request (if one ever comes): a host that opens connections and sends nothing would hold
threads and descriptors by the hundred until each timed out. So each address has two
counts: its associations, taken at the association request against
``max_associations_per_address`` (over it: A-ASSOCIATE-RJ), and its open connections, taken
as the connection is accepted, in the accepting thread, against :func:`connection_limit`
(over it: closed before any thread serves it). Many addresses (500 hosts, or one host with
many IP addresses) could still each hold their share, so the open connections of the whole
node are capped too, at :func:`node_connection_limit` (checked in the same locked read):
a connection accepted beyond it is closed unserved whatever its address.

The counts live in a small file that every listener process shares, as the node-wide
counters do (:mod:`dicomnode.ingest.slots`): each listener owns a table of ``(address,
associations, connections)`` entries, and an address's counts are the sums over all tables
(the node's open connections: the sum of every entry's), read and changed under an
exclusive ``flock``, and a lock of each process's own (flock does not exclude the threads
that share one descriptor from each other). A lock held by a process that dies is released
by the kernel; the supervisor empties a dead listener's table before restarting it.
Counting costs one lock and one small read per accepted connection, one per association
request and one per connection end, nothing per PDU.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import struct
import tempfile
import threading
import weakref
from pathlib import Path

from dicomnode.ingest.slots import locked

# The file's header: how many entries each listener's table has.
_HEADER = struct.Struct("<I")
# One entry: the peer's address as 16 bytes (IPv4 as IPv4-mapped IPv6), its associations
# and its open connections; an entry whose counts are both 0 is free.
_ENTRY = struct.Struct("<16sII")
_ASSOCIATIONS, _CONNECTIONS = 0, 1
# Open connections allowed per address, per association allowed: a peer at its association
# limit can still connect and be told why it is refused (an A-ASSOCIATE-RJ, which senders log
# and retry on) rather than see its connection closed.
CONNECTIONS_PER_ASSOCIATION = 2
# Entries beyond those the node-wide connection cap can fill (table_size): room for an
# address whose association is counted while its connection's count failed (an OSError:
# served uncounted). (max_associations is restart-only: listeners keep the value they
# started with, which sized the tables.)
SPARE_ENTRIES = 64
_IPV4_MAPPED = b"\0" * 10 + b"\xff\xff"


class AddressTableFull(RuntimeError):
    """Every entry of this listener's table is taken: more distinct peers at once than the
    node-wide connection cap lets in (plus spares), so counts were lost to errors."""


class Admission(enum.Enum):
    """What :meth:`AddressSlots.connect` made of a connection; true only when admitted. The
    values of the refusals are their ``dicomnode_refusals_total`` reasons."""

    ADMITTED = "admitted"
    ADDRESS_LIMIT = "connection_limit"  # its address has connection_limit open already
    NODE_LIMIT = "node_connection_limit"  # the node has node_connection_limit open already

    def __bool__(self) -> bool:
        return self is Admission.ADMITTED


def connection_limit(max_associations_per_address: int) -> int:
    """Most connections open at once from one address (0: no limit, as for associations)."""
    return CONNECTIONS_PER_ASSOCIATION * max_associations_per_address


def node_connection_limit(max_associations: int) -> int:
    """Most connections open at once on the whole node (all listener processes together):
    as per address, room for a sender at the node's association limit to be told so."""
    return CONNECTIONS_PER_ASSOCIATION * max_associations


def table_size(max_associations: int) -> int:
    """Entries per listener for a node started with ``max_associations``: enough that its
    table cannot fill under the node-wide connection cap. An entry is taken by an address's
    first connection counted here and freed when its last count here is given back; an
    association is counted on its connection's entry, after it and until before its end, so
    every taken entry holds at least one open connection, and the node has at most
    :func:`node_connection_limit` open (checked and taken under one lock), all of them on one
    listener at worst. ``SPARE_ENTRIES`` more cover what that reasoning leaves out (see
    there); past them, :class:`AddressTableFull`."""
    return node_connection_limit(max_associations) + SPARE_ENTRIES


def address_key(address: str) -> bytes:
    """The 16 bytes that identify a peer's IP address; an IPv4 peer seen on a dual-stack
    socket (``::ffff:10.0.0.5``) is the same peer as ``10.0.0.5``. ValueError if
    ``address`` is not an IP address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return ip.packed
    v4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip
    return _IPV4_MAPPED + v4.packed  # type: ignore[union-attr]


def create_address_slots(path: Path, listeners: int, entries: int) -> None:
    """Write an address-slots file with an empty table of ``entries`` per listener."""
    path.write_bytes(_HEADER.pack(entries) + bytes(_ENTRY.size * entries * listeners))


class AddressSlots:
    """One listener's view of the shared per-address association counts."""

    def __init__(self, path: Path, index: int):
        self.path = path
        self.index = index
        self._fd = os.open(path, os.O_RDWR)
        # Closed once nothing can use it any more: association threads may still release
        # counts after their listener has stopped.
        self._closer = weakref.finalize(self, os.close, self._fd)
        self._threads = threading.Lock()
        (self.entries,) = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))

    @classmethod
    def in_process(cls, entries: int) -> AddressSlots:
        """Counts for this process alone (a listener that shares its port with no other)."""
        with tempfile.NamedTemporaryFile(prefix="dicomnode-addresses-") as file:
            create_address_slots(Path(file.name), 1, entries)
            # The open descriptor keeps the file after its name is removed.
            return cls(Path(file.name), 0)

    def _own_offset(self, slot: int) -> int:
        return _HEADER.size + (self.index * self.entries + slot) * _ENTRY.size

    def _tables(self) -> list[tuple[bytes, int, int]]:
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        return list(_ENTRY.iter_unpack(data[_HEADER.size :]))

    def _own(self, tables: list[tuple[bytes, int, int]]) -> list[tuple[bytes, int, int]]:
        start = self.index * self.entries
        return tables[start : start + self.entries]

    def _take(self, key: bytes, kind: int, limit: int, node_limit: int = 0) -> Admission:
        with locked(self._fd, self._threads):
            tables = self._tables()
            if limit and sum(entry[1 + kind] for entry in tables if entry[0] == key) >= limit:
                return Admission.ADDRESS_LIMIT
            if node_limit and sum(entry[1 + kind] for entry in tables) >= node_limit:
                return Admission.NODE_LIMIT
            own = self._own(tables)
            slot = next((i for i, (a, *counts) in enumerate(own) if any(counts) and a == key), None)
            if slot is None:
                slot = next((i for i, (_, *counts) in enumerate(own) if not any(counts)), None)
                if slot is None:
                    raise AddressTableFull(f"all {self.entries} entries are taken")
                counts = [0, 0]
            else:
                counts = list(own[slot][1:])
            counts[kind] += 1
            os.pwrite(self._fd, _ENTRY.pack(key, *counts), self._own_offset(slot))
            return Admission.ADMITTED

    def _give(self, key: bytes, kind: int) -> None:
        with locked(self._fd, self._threads):
            own = self._own(self._tables())
            for slot, (address, *counts) in enumerate(own):
                if address == key and counts[kind]:
                    counts[kind] -= 1
                    entry = _ENTRY.pack(key, *counts) if any(counts) else bytes(_ENTRY.size)
                    os.pwrite(self._fd, entry, self._own_offset(slot))
                    return

    def acquire(self, key: bytes, limit: int) -> bool:
        """Count one more association from ``key`` here unless the node already serves
        ``limit`` from it (0: no limit); AddressTableFull if this listener has no free entry."""
        return bool(self._take(key, _ASSOCIATIONS, limit))

    def release(self, key: bytes) -> None:
        """Count one association from ``key`` less here."""
        self._give(key, _ASSOCIATIONS)

    def connect(self, key: bytes, limit: int, node_limit: int = 0) -> Admission:
        """Count one more open connection from ``key`` here unless the node already has
        ``limit`` open from it, or ``node_limit`` open in all (0: no limit); which of them
        refused it, if one did. AddressTableFull if this listener has no free entry."""
        return self._take(key, _CONNECTIONS, limit, node_limit)

    def disconnect(self, key: bytes) -> None:
        """Count one open connection from ``key`` less here."""
        self._give(key, _CONNECTIONS)

    def count(self, key: bytes) -> int:
        """Associations from ``key`` over all listeners."""
        return sum(entry[1] for entry in self._tables() if entry[0] == key)

    def connections(self, key: bytes) -> int:
        """Open connections from ``key`` over all listeners."""
        return sum(entry[2] for entry in self._tables() if entry[0] == key)

    def all_connections(self) -> int:
        """Open connections over all addresses and listeners: the node's."""
        return sum(entry[2] for entry in self._tables())

    def reset(self) -> None:
        """Empty this listener's table (its process is gone)."""
        with locked(self._fd, self._threads):
            os.pwrite(self._fd, bytes(_ENTRY.size * self.entries), self._own_offset(0))

    def close(self) -> None:
        self._closer()
