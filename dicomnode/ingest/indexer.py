"""Index rows written behind the acknowledgement, in batches, by one writer thread.

A C-STORE is answered once its file is durable in the spool (fsync, rename, folder fsync);
the instance's study, series and instance rows follow within :data:`GATHER_SECONDS` from an
:class:`IndexWriter`, which writes whatever has queued up meanwhile in one transaction (at
once when a release waits for them). Nothing acknowledged depends on those rows: a row that
was queued but not written when the node stopped is rebuilt from its file by the spool
re-index at start-up (:func:`dicomnode.ingest.recover.recover_spool`).

Under ``dicomnode serve`` the writer runs in the supervisor (:class:`IndexService`), so
the listener processes, which serve every association in one interpreter, spend no time
on the database and load none of its code; each listener reaches it through a socket pair
(:class:`~dicomnode.ingest.sink.RemoteIndex`, which describes the lines).

A listener refuses new instances with 0xA700 while the database is not taking rows, and
answers an A-RELEASE-RQ only once the association's rows are committed (or after
:data:`~dicomnode.ingest.sink.RELEASE_WAIT_SECONDS`), so a sender that has released sees
its instances indexed. An in-process :class:`~dicomnode.ingest.scp.StorageSCP` (tests,
tools) has its own writer thread (:class:`LocalIndex`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, bindparam, event, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db.models import Instance
from dicomnode.db.session import make_engine, make_sessionmaker
from dicomnode.db.writer_lock import WriterLock
from dicomnode.ingest import assembly
from dicomnode.ingest.arrival import Arrival
from dicomnode.ingest.index import (
    add_rows,
    drop_second_copy,
    forget_instance,
    index_arrival,
    indexed_copy_gone,
)
from dicomnode.ingest.sink import AssociationEnded, Item, TicketedSink, decode_item
from dicomnode.outage import database_reason

log = logging.getLogger("dicomnode.ingest")

# Rows written in one transaction at most.
BATCH = 256
# Between tries while the database refuses the rows.
RETRY_SECONDS = 1.0
# How long the first queued row waits for others to share its transaction, unless someone
# waits for it (a release, a flush): a transaction of one row costs 0.5-0.9 ms of CPU here,
# one of several 0.13-0.28 ms a row (benchmarks/README.md, 2026-12-06).
GATHER_SECONDS = 0.02


# Built once (building and caching a statement per batch costs more than running it).
_INSTANCES = Instance.__table__
_KNOWN_INSTANCES = select(_INSTANCES.c.sop_instance_uid, _INSTANCES.c.path).where(
    _INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True))
)


def write_items(session: Session, items: list[Item], settings: Settings) -> None:
    """Write the rows of ``items`` in their order: each run of arrivals in one transaction
    (one by one if that fails on a constraint), each association end after what came
    before it."""
    quiet_seconds = settings.assembly.quiet_seconds
    run: list[Arrival] = []
    for item in [*items, None]:
        if isinstance(item, Arrival):
            run.append(item)
            continue
        if run:
            _write_arrivals(session, run, quiet_seconds, settings)
            run = []
        if isinstance(item, AssociationEnded):
            assembly.association_ended(session, item.study_uids, item.at, quiet_seconds)


def _write_arrivals(
    session: Session, arrivals: list[Arrival], quiet_seconds: float, settings: Settings
) -> None:
    uids = [arrival.facts.sop_instance_uid for arrival in arrivals]
    known = dict(session.connection().execute(_KNOWN_INSTANCES, {"uids": uids}).all())
    fresh: list[Arrival] = []
    lost: list[Arrival] = []
    for arrival in arrivals:
        # Duplicates (a resent study) and repeats within the batch write nothing.
        first = known.get(arrival.facts.sop_instance_uid)
        if first is None:
            known[arrival.facts.sop_instance_uid] = arrival.path
            fresh.append(arrival)
        elif first != arrival.path:
            # Under another study or series (the path is the UIDs'): a second copy, removed,
            # unless the indexed file was lost, or lies under another storage folder (one the
            # node was moved or copied from, which may go): then this copy is indexed as what
            # it says it is (removing it too would lose an instance the sender was told is
            # stored).
            if indexed_copy_gone(first) or not Path(first).is_relative_to(settings.storage_path):
                known[arrival.facts.sop_instance_uid] = arrival.path
                lost.append(arrival)
                fresh.append(arrival)
            else:
                drop_second_copy(arrival.facts.sop_instance_uid, arrival.path)
    if lost:
        # Committed apart: the fallback below rolls the batch's rows back.
        for arrival in lost:
            forget_instance(session.connection(), arrival.facts.sop_instance_uid)
        session.commit()
        for arrival in lost:
            log.warning(
                "instance %s received again under another study or series; its indexed file "
                "is gone, so it is indexed anew as it came (%s)",
                arrival.facts.sop_instance_uid,
                arrival.path,
            )
    try:
        add_rows(session, fresh, quiet_seconds, settings.worklist)
        session.commit()
    except IntegrityError:
        # Another process created the same study or series meanwhile: one at a time, each
        # with index_arrival's own retries.
        session.rollback()
        for arrival in fresh:
            index_arrival(session, arrival, quiet_seconds, settings.worklist)


class IndexWriter:
    """A thread writing queued items in batches; after each commit it calls the items'
    ``done`` callbacks, then ``on_batch``, then ``on_ready`` with the earliest end of a
    quiet period the batch may have set (for the assembly check).

    A batch is written :data:`GATHER_SECONDS` after its first item was queued, when
    :data:`BATCH` items wait, or at once after :meth:`hurry` (someone waits for the rows).

    ``sessions`` and ``settings`` are read for every batch (a reload or a test may swap
    them). While the database refuses the rows the writer retries every
    :data:`RETRY_SECONDS` and reports ``healthy`` False to ``on_health``; a connection lost
    in the middle of a batch is first replaced at once (:meth:`_write_batch`), so that one
    dropped server process refuses no instance.
    """

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        settings: Callable[[], Settings],
        on_health: Callable[[bool], None] = lambda healthy: None,
        on_batch: Callable[[], None] = lambda: None,
        on_ready: Callable[[datetime], None] = lambda ready_at: None,
    ):
        self._sessions = sessions
        self._settings = settings
        self._on_health = on_health
        self._on_batch = on_batch
        self._on_ready = on_ready
        self._lock = threading.Condition()
        self._queue: list[tuple[Item, Callable[[], None] | None]] = []
        self._since = 0.0  # when the first item now queued was queued (monotonic)
        self._hurried = False
        self._in_flight = 0
        self._stopping = False
        self.healthy = True
        self._writer_lock: WriterLock | None = None
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Item, done: Callable[[], None] | None = None) -> None:
        with self._lock:
            self._queue.append((item, done))
            if len(self._queue) == 1:
                self._since = time.monotonic()
                self._lock.notify_all()
            elif len(self._queue) == BATCH:
                self._lock.notify_all()

    def hurry(self) -> None:
        """Write what is queued now, without waiting for more (someone waits for it)."""
        with self._lock:
            self._hurried = True
            self._lock.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, waiting up to ``timeout`` (the database may be down), and
        stop; what is left is written from the spool at the next start."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._queue and not self._in_flight, timeout)
            left = len(self._queue) + self._in_flight
        if left:
            log.warning(
                "%d index row(s) not written at stop; the spool re-index at the next start "
                "writes them from their files",
                left,
            )

    def _take(self) -> list[tuple[Item, Callable[[], None] | None]]:
        with self._lock:
            self._in_flight = 0
            self._lock.notify_all()
            while not self._queue and not self._stopping:
                self._lock.wait()
            deadline = self._since + GATHER_SECONDS
            while not (self._hurried or self._stopping or len(self._queue) >= BATCH):
                if (left := deadline - time.monotonic()) <= 0:
                    break
                self._lock.wait(left)
            batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            # A hurry for items left for the next batch still holds.
            self._hurried = self._hurried and bool(self._queue)
            self._in_flight = len(batch)
            return batch

    def _run(self) -> None:
        # Not niced: a niced writer left busy cores to the receiving threads, but while other
        # processes (a worker's inference) kept the cores busy it got almost no CPU, holding
        # the interpreter lock as it waited, and releases waited seconds for their rows
        # (benchmarks/README.md, 2026-12-06).
        while batch := self._take():
            items = [item for item, _done in batch]
            while not self._write(items):
                time.sleep(RETRY_SECONDS)
            for _item, done in batch:
                if done is not None:
                    done()
            self._on_batch()
            self._on_ready(_earliest_ready_at(items, self._settings().assembly.quiet_seconds))

    def _write(self, items: list[Item]) -> bool:
        """Write a batch; False while the database is unavailable (the batch is retried).

        A row the database refuses for itself (a constraint, a value it cannot store) must
        not hold up the others: the batch is then written one item at a time, and an item
        that still fails is logged and left out (its file stays in the spool)."""
        try:
            refused = self._try_write(items)
            if refused is not None:
                log.error(
                    "index batch of %d failed (%s); writing its items one at a time",
                    len(items),
                    database_reason(refused),
                )
                for item in items:
                    if (refused := self._try_write([item])) is not None:
                        log.error(
                            "cannot index %s (%s); its file stays in the spool",
                            _describe(item),
                            database_reason(refused),
                        )
        except (DBAPIError, OSError) as exc:
            return self._unavailable(exc, len(items))
        if not self.healthy:
            log.info("database available again: index rows written")
            self._set_health(True)
        return True

    def _try_write(self, items: list[Item]) -> Exception | None:
        """Write ``items``; the exception if the database refused the rows themselves (a
        constraint, a value it cannot store: :func:`refused_for_itself`); any other database
        error (unreachable, read-only after a failover, tables or privileges missing)
        propagates: no row can be written, so none is left out."""
        try:
            self._write_batch(items)
        except Exception as exc:
            if not refused_for_itself(exc):
                raise
            return exc
        return None

    def _write_batch(self, items: list[Item]) -> None:
        """Write ``items``, once more on a new connection if the database dropped this one
        (a restarted or terminated server process, a failover): only a second failure says
        the database is unavailable. Writing a batch again is safe: instances already
        committed are known and skipped."""
        sessions = self._sessions()
        if self._writer_lock is None:
            self._writer_lock = WriterLock.for_engine(sessions.kw.get("bind"))
        try:
            with self._writer_lock.held(), sessions() as session:
                write_items(session, items, self._settings())
        except DBAPIError as exc:
            # The pool's pre-ping finds a connection that died while idle in the pool; this
            # is one that died while it was in use, between that check and the commit.
            if not exc.connection_invalidated:
                raise
            log.warning(
                "database connection lost while writing %d index row(s) (%s); writing them "
                "again on a new connection",
                len(items),
                database_reason(exc),
            )
            with self._writer_lock.held(), sessions() as session:
                write_items(session, items, self._settings())

    def _unavailable(self, exc: Exception, count: int) -> bool:
        if self.healthy:
            log.error(
                "database unavailable: %d index row(s) wait, new instances are refused "
                "until it is back: %s",
                count,
                database_reason(exc),
            )
            self._set_health(False)
        return False

    def _set_health(self, healthy: bool) -> None:
        self.healthy = healthy
        self._on_health(healthy)


def refused_for_itself(exc: Exception) -> bool:
    """Whether a failed write was refused for its rows (an integrity constraint, a value the
    database cannot store, or a value the node could not turn into a row), not because the
    database takes no rows at all (every other database error, or the file system refusing
    the writers' lock file: then every row waits)."""
    if isinstance(exc, DBAPIError):
        return isinstance(exc, (IntegrityError, DataError))
    return not isinstance(exc, OSError)


def _earliest_ready_at(items: list[Item], quiet_seconds: float) -> datetime:
    """The earliest end of a quiet period that writing ``items`` may have set."""
    moments = [item.received_at if isinstance(item, Arrival) else item.at for item in items]
    return assembly.quiet_period_end(min(moments), quiet_seconds)


def _describe(item: Item) -> str:
    if isinstance(item, Arrival):
        return f"instance {item.facts.sop_instance_uid}"
    return "the end of an association"


class LocalIndex(TicketedSink):
    """An :class:`IndexSink` with its writer thread in this process."""

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        settings: Callable[[], Settings],
    ):
        super().__init__()
        self._writer = IndexWriter(sessions, settings)
        self._add_lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        return self._writer.healthy

    def add(self, item: Item) -> int:
        # Tickets are handed out in queue order, so "written up to n" is exact.
        with self._add_lock:
            ticket = self._tickets.next()
            self._writer.submit(item, lambda: self._tickets.written(ticket))
        return ticket

    def close(self) -> None:
        self._writer.close()

    def _hurry(self, ticket: int) -> None:
        self._writer.hurry()


class _Channel:
    """The supervisor's end of one listener's socket pair."""

    def __init__(self, sock: socket.socket):
        self.socket = sock
        self.lock = threading.Lock()  # one line at a time
        self.owed = 0  # the highest sequence number committed
        self.told = 0  # the highest one sent back

    def send(self, message: dict) -> None:
        with self.lock, contextlib.suppress(OSError):
            self.socket.sendall(json.dumps(message).encode() + b"\n")

    def committed(self, seq: int) -> None:
        self.owed = max(self.owed, seq)

    def tell(self) -> None:
        """Send back the highest sequence number committed, if not yet sent."""
        owed = self.owed
        if owed > self.told:
            self.told = owed
            self.send({"written": owed})


class IndexService:
    """The supervisor's writer, fed by each listener's socket pair."""

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        settings: Callable[[], Settings],
        on_ready: Callable[[datetime], None] = lambda ready_at: None,
    ):
        """``on_ready``: told after each batch when a quiet period it wrote may end."""
        self._channels: set[_Channel] = set()
        self._lock = threading.Lock()
        self._writer = IndexWriter(sessions, settings, self._broadcast_health, self._tell, on_ready)

    def channel(self) -> socket.socket:
        """A new socket pair: this side is served here, the returned side goes to a
        listener (inheritable, for ``pass_fds``; close it here once the child has it)."""
        mine, theirs = socket.socketpair()
        theirs.set_inheritable(True)
        channel = _Channel(mine)
        with self._lock:
            self._channels.add(channel)
        threading.Thread(
            target=self._serve, args=(channel,), name="index-channel", daemon=True
        ).start()
        return theirs

    def close(self) -> None:
        self._writer.close()

    def _serve(self, channel: _Channel) -> None:
        if not self._writer.healthy:
            channel.send({"healthy": False})
        try:
            with channel.socket.makefile("rb") as requests:
                for line in requests:
                    message = json.loads(line)
                    if "hurry" in message:
                        self._writer.hurry()
                        continue
                    seq = message["seq"]
                    self._writer.submit(
                        decode_item(message), lambda seq=seq: channel.committed(seq)
                    )
        except (OSError, ValueError, KeyError) as exc:
            log.error("index channel of a listener broke: %s", exc)
        finally:
            # The listener is gone; its rows stay queued, nothing more is sent back.
            with self._lock:
                self._channels.discard(channel)
            with channel.lock:
                channel.socket.close()

    def _channels_now(self) -> list[_Channel]:
        with self._lock:
            return list(self._channels)

    def _tell(self) -> None:
        for channel in self._channels_now():
            channel.tell()

    def _broadcast_health(self, healthy: bool) -> None:
        for channel in self._channels_now():
            channel.send({"healthy": healthy})


def relaxed_commits(engine: Engine) -> Engine:
    """On SQLite, ingest commits (the index writer's) that return before the log is flushed.

    An acknowledged instance's file is already durable (fsync + rename + folder fsync);
    SQLite loses such a commit only with the machine (power cut, kernel crash), so also
    with this process, and the spool re-index at the next start rebuilds the row from its
    file (:func:`dicomnode.ingest.recover.recover_spool`). Later synchronous commits
    (workers) flush everything before them, so nothing a worker did can outlive the row it
    read.

    PostgreSQL keeps synchronous commits: there an unflushed commit is lost when the
    database server crashes or restarts on its own, while this node goes on running, so no
    re-index would follow and the instances would be missing from their studies until the
    node restarted.
    """
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _no_log_flush(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def ingest_sessions(url: str) -> sessionmaker[Session]:
    """Sessions for the index writer, the supervisor's or a stand-alone listener's (schema
    already upgraded by the supervisor)."""
    return make_sessionmaker(relaxed_commits(make_engine(url)))
