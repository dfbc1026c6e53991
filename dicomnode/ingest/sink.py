"""Where a listener hands the rows of what it stored: the sink, its tickets, and the line
protocol to the supervisor's index writer.

A C-STORE is answered once its file is durable; its rows follow from the index writer
(:mod:`dicomnode.ingest.indexer`). Under ``dicomnode serve`` that writer runs in the
supervisor, and each listener reaches it through a socket pair (:class:`RemoteIndex`), one
JSON object per line:

- listener to supervisor: ``{"seq": n, "arrival": {...}}`` or
  ``{"seq": n, "ended": [study UIDs], "at": ISO time}`` (an association ended), and
  ``{"hurry": n}`` (a release waits for the rows up to ``n``: write them without waiting
  for more to share their transaction);
- supervisor to listener: ``{"written": n}`` (everything up to ``n`` is committed) and
  ``{"healthy": false}`` / ``{"healthy": true}`` when the database stops or resumes
  taking rows.

This module imports nothing of the database layer, so a listener under ``serve`` loads
none of it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from dicomnode.ingest.arrival import Arrival

# A release waits at most this long for the association's rows (database down: the rows
# stay queued and the files are in the spool either way); well below the peers' timeouts
# for the A-RELEASE-RP (dcmtk and pynetdicom: 30 s).
RELEASE_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class AssociationEnded:
    """An association that sent these studies was released or aborted."""

    study_uids: tuple[str, ...]
    at: datetime


Item = Arrival | AssociationEnded


class IndexSink(Protocol):
    """Where a listener hands the rows of what it stored."""

    @property
    def healthy(self) -> bool: ...

    def add(self, item: Item) -> int:
        """Queue ``item``; a ticket for :meth:`wait`."""
        ...

    def wait(self, ticket: int, timeout: float) -> bool:
        """Until the rows of ``ticket`` (and everything before it) are committed."""
        ...

    def flush(self, timeout: float) -> bool:
        """Until everything added so far is committed."""
        ...

    def close(self) -> None: ...


class _Tickets:
    """Sequence numbers handed out and the highest one written, with a wait."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._next = 0
        self._written = 0

    def next(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def last(self) -> int:
        with self._lock:
            return self._next

    def is_written(self, ticket: int) -> bool:
        with self._lock:
            return self._written >= ticket

    def written(self, ticket: int) -> None:
        with self._lock:
            if ticket > self._written:
                self._written = ticket
                self._lock.notify_all()

    def wait(self, ticket: int, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self._written >= ticket, timeout)


class TicketedSink(ABC):
    """What both sinks share: tickets handed out by ``add``, waited for (the writer is
    hurried first: it lets rows gather for a moment unless someone waits)."""

    def __init__(self) -> None:
        self._tickets = _Tickets()

    def wait(self, ticket: int, timeout: float) -> bool:
        if self._tickets.is_written(ticket):
            return True
        self._hurry(ticket)
        return self._tickets.wait(ticket, timeout)

    def flush(self, timeout: float) -> bool:
        return self.wait(self._tickets.last(), timeout)

    @abstractmethod
    def _hurry(self, ticket: int) -> None:
        """Ask the writer to write up to ``ticket`` now."""


def encode_item(item: Item, seq: int) -> bytes:
    """One line to the supervisor: ``item`` with its sequence number."""
    if isinstance(item, Arrival):
        message = {"seq": seq, "arrival": item.to_json()}
    else:
        message = {"seq": seq, "ended": list(item.study_uids), "at": item.at.isoformat()}
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_item(message: dict) -> Item:
    """The item of a line that :func:`encode_item` wrote (parsed from JSON)."""
    if "arrival" in message:
        return Arrival.from_json(message["arrival"])
    return AssociationEnded(tuple(message["ended"]), datetime.fromisoformat(message["at"]))


class RemoteIndex(TicketedSink):
    """An :class:`IndexSink` whose writer is the supervisor's, over a socket pair."""

    def __init__(self, channel: socket.socket):
        super().__init__()
        self._channel = channel
        self._send_lock = threading.Lock()
        self._healthy = True
        threading.Thread(target=self._read, name="index-replies", daemon=True).start()

    @property
    def healthy(self) -> bool:
        return self._healthy

    def add(self, item: Item) -> int:
        with self._send_lock:
            ticket = self._tickets.next()
            # Raises OSError if the supervisor is gone: the C-STORE is then not acknowledged.
            self._channel.sendall(encode_item(item, ticket))
        return ticket

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._channel.shutdown(socket.SHUT_WR)

    def _hurry(self, ticket: int) -> None:
        # The supervisor gone: the wait times out, as it would have without the hurry.
        with self._send_lock, contextlib.suppress(OSError):
            self._channel.sendall(b'{"hurry":%d}\n' % ticket)

    def _read(self) -> None:
        with self._channel.makefile("rb") as replies:
            for line in replies:
                message = json.loads(line)
                if "written" in message:
                    self._tickets.written(message["written"])
                elif "healthy" in message:
                    self._healthy = bool(message["healthy"])
        self._healthy = False  # the supervisor is gone: nothing can be indexed
