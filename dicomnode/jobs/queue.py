"""Durable job queue in the database: leases, retries with backoff, dead letters.

Workers on any host that shares the database claim jobs, the most urgent kind first
(:data:`KIND_PRIORITY`: critical-result notifications and analyses, which set the worklist
priority, then the transfers of result objects already written, then the writing of result
objects), then the oldest. PostgreSQL uses
``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite serialises writers, so a plain select inside
the (immediate) write transaction is enough. A running job's worker renews its lease
(:func:`renew`, :mod:`dicomnode.jobs.leases`); a job whose lease expired, because its worker
died or hangs, is claimed again. Idle workers wait on a
:class:`~dicomnode.jobs.waiting.JobSignal` (PostgreSQL ``LISTEN``/``NOTIFY``; on SQLite a
datagram to each worker's socket, :mod:`dicomnode.jobs.wakeups`) and otherwise sleep until
the next job is due (:func:`next_due`) instead of polling the queue.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, event, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from dicomnode.db.models import Job, Study
from dicomnode.db.session import READ_ONLY, as_utc, utcnow
from dicomnode.jobs.wakeups import wake_all, wake_folder

BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 600.0
# How long a job that waits on another (see :class:`Postponed`) stays out of the queue.
POSTPONE_SECONDS = 1.0
# Claim order by kind (lower first): a study's triage never waits behind earlier studies'
# result objects (``results``) or their transfers (``export``). Exports, short, go before
# results, long: a study's objects reach the PACS as soon as they are written, not after
# every queued study's objects are. Unknown kinds come last.
KIND_PRIORITY = {"notify": 0, "analyse": 1, "export": 2, "results": 3}
# PostgreSQL NOTIFY channel on which enqueue wakes idle workers.
CHANNEL = "dicomnode_jobs"
# Where an SQLite session's commit is to wake the idle workers (Session.info key).
_WAKE_FOLDER = "dicomnode.wake_folder"
# Studies locked per statement by lock_studies.
_LOCK_CHUNK = 500


def _wake_workers(session: Session) -> None:
    """Wake the idle workers when the transaction commits: on PostgreSQL a NOTIFY, on SQLite
    a datagram to each worker's socket (sent after the commit, see :func:`_wake_on_commit`)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
        return
    folder = wake_folder(bind.url.database)
    if folder is not None:
        session.info[_WAKE_FOLDER] = folder


@event.listens_for(Session, "after_commit")
def _wake_on_commit(session: Session) -> None:
    folder = session.info.pop(_WAKE_FOLDER, None)
    if folder is not None:
        wake_all(folder)


@event.listens_for(Session, "after_rollback")
def _no_wake_on_rollback(session: Session) -> None:
    session.info.pop(_WAKE_FOLDER, None)


def enqueue(
    session: Session,
    kind: str,
    study_id: int,
    payload: dict | None = None,
    *,
    now: datetime | None = None,
) -> Job:
    """Add a queued job (the caller commits)."""
    now = now or utcnow()
    job = Job(
        kind=kind,
        study_id=study_id,
        payload=payload or {},
        state="queued",
        run_after=now,
        created_at=now,
    )
    session.add(job)
    _wake_workers(session)
    return job


def lock_studies(session: Session, study_ids: Iterable[int]) -> None:
    """Hold the rows of these studies until the transaction ends, for a transaction that
    decides from the jobs it reads whether a study needs another (an admin's retry of a dead
    export or analysis; a results job queuing its exports): two such transactions for one
    study take turns, and the second sees what the first queued. Call it before the reads.

    PostgreSQL: ``SELECT ... FOR UPDATE`` (read committed: each statement after it reads what
    was committed meanwhile), the rows in id order, so that two transactions each locking
    several studies do not deadlock. SQLite: nothing to do, its BEGIN IMMEDIATE serialises
    writers already."""
    ids = sorted(set(study_ids))
    if session.get_bind().dialect.name == "sqlite":
        return
    # In chunks (a statement takes only so many parameters), each in id order.
    for start in range(0, len(ids), _LOCK_CHUNK):
        chunk = ids[start : start + _LOCK_CHUNK]
        session.execute(
            select(Study.id).where(Study.id.in_(chunk)).order_by(Study.id).with_for_update()
        )


def _runnable(now: datetime, jobs: Any = Job) -> ColumnElement[bool]:
    """Queued and due, or leased to a worker whose lease has expired (``jobs``: the table or
    an alias of it)."""
    return or_(
        and_(jobs.state == "queued", jobs.run_after <= now),
        and_(jobs.state == "leased", jobs.lease_expires_at < now),
    )


@dataclass(frozen=True)
class Together:
    """How a kind's jobs are claimed together (e.g. a study's exports to one destination, sent
    over one association): with the job claimed, in the same transaction, its study's other
    runnable jobs of the kind whose ``key`` is the same, up to ``limit`` (oldest first), and
    the queued ones still waiting out a backoff that ``waiting`` admits, if they have not been
    tried more often than the job (e.g. those that failed with it, so that jobs run together
    stay together: each one's backoff, reckoned from its own failure, ends a little apart from
    the others'). Each counts an attempt and is completed or failed on its own.

    ``key`` gives the key's SQL expression for the jobs table or an alias of it (e.g. the
    payload's destination), so that only the jobs taken are locked on PostgreSQL; ``waiting``
    is a condition on the jobs table."""

    key: Callable[[Any], ColumnElement[Any]]
    limit: int
    waiting: ColumnElement[bool] | None = None


def next_due(session: Session, kinds: Sequence[str]) -> datetime | None:
    """When the first job of ``kinds`` can be claimed (queued: its ``run_after``; leased: its
    lease's end), in the past when one can now; None when none is queued or leased. Read
    without SQLite's write lock (an idle worker's look does not hold up the index writer or
    freeze it with a process frozen between two statements). Ends its read transaction."""
    connection = session.connection(execution_options=READ_ONLY)
    when = case((Job.state == "queued", Job.run_after), else_=Job.lease_expires_at)
    soonest = connection.execute(
        select(func.min(when)).where(Job.kind.in_(kinds), Job.state.in_(("queued", "leased")))
    ).scalar()
    session.rollback()
    return None if soonest is None else as_utc(soonest)


def due(session: Session, kinds: Sequence[str], now: datetime | None = None) -> bool:
    """Whether a job of ``kinds`` could be claimed now (see :func:`next_due`)."""
    soonest = next_due(session, kinds)
    return soonest is not None and soonest <= (now or utcnow())


def claim(
    session: Session,
    owner: str,
    kinds: Sequence[str],
    lease_seconds: float,
    now: datetime | None = None,
) -> Job | None:
    """Lease the most urgent runnable job of ``kinds`` to ``owner`` (by :data:`KIND_PRIORITY`,
    then oldest first); commits; None if none is due."""
    claimed = claim_together(session, owner, kinds, lease_seconds, {}, now)
    return claimed[0] if claimed else None


def claim_together(
    session: Session,
    owner: str,
    kinds: Sequence[str],
    lease_seconds: float,
    together: Mapping[str, Together],
    now: datetime | None = None,
) -> list[Job]:
    """Lease the most urgent runnable job of ``kinds`` to ``owner`` (by :data:`KIND_PRIORITY`,
    then oldest first) and, if its kind is claimed :class:`Together`, the jobs that go with
    it, in one transaction; commits; the job first, then those (none when none is due).

    Another worker never takes one of a group of jobs while it is being claimed: on SQLite the
    transaction holds the write lock from its start (BEGIN IMMEDIATE, before the claim's first
    read), so claims run one at a time; on PostgreSQL a job of such a kind is claimed only
    when it is the oldest runnable job of its group, so that a worker that skips the group's
    oldest job (locked by the claim under way) skips its whole group."""
    now = now or utcnow()
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        if connection.get_execution_options().items() >= READ_ONLY.items():
            raise RuntimeError("a claim needs a write transaction (SQLite: BEGIN IMMEDIATE)")
        groups = []
    else:
        groups = [
            _oldest_of_group(kind, rule, now) for kind, rule in together.items() if kind in kinds
        ]
    query = (
        select(Job)
        .where(Job.kind.in_(kinds), _runnable(now), *groups)
        .order_by(
            case(KIND_PRIORITY, value=Job.kind, else_=len(KIND_PRIORITY)), Job.run_after, Job.id
        )
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    job = session.scalars(query).first()
    if job is None:
        session.commit()
        return []
    _lease(job, owner, lease_seconds, now)
    claimed = [job]
    rule = together.get(job.kind)
    if rule is not None:
        claimed += _lease_alike(session, job, owner, lease_seconds, rule, now)
    session.commit()
    return claimed


def _oldest_of_group(kind: str, rule: Together, now: datetime) -> ColumnElement[bool]:
    """Not of ``kind``, or the oldest runnable job of its group (study and key).

    One uncorrelated subquery, evaluated once per claim: the oldest runnable job of each
    group of ``kind``, found among the runnable jobs (through ``ix_jobs_claim``) as the claim's
    own sort finds them. A correlated "no older runnable job of its group" cost each runnable
    row a walk through its study's jobs, done ones included: 2 to 10 s per claim, write lock
    held on SQLite, with a re-analysed study's 1,200 done exports beside 1,200 queued."""
    runnable = aliased(Job)
    oldest = (
        select(func.min(runnable.id))
        .where(runnable.kind == kind, _runnable(now, runnable))
        .group_by(runnable.study_id, rule.key(runnable))
    )
    return or_(Job.kind != kind, Job.id.in_(oldest))


def _lease_alike(
    session: Session, job: Job, owner: str, lease_seconds: float, rule: Together, now: datetime
) -> list[Job]:
    """Lease to ``owner`` the jobs that go with its claimed ``job`` (see :class:`Together`)."""
    runnable = _runnable(now)
    if rule.waiting is not None:
        # Only those with fewer attempts than the job claimed (counted with this claim): the
        # jobs of its last attempt, each with its own backoff. One tried more often waits out
        # its own: taken along by each due job of a larger group (a CT's 53 exports to a
        # destination that was down), the first 31 were tried with every claim of the rest,
        # 77 attempts in a minute.
        runnable = or_(
            runnable, and_(Job.state == "queued", rule.waiting, Job.attempts < job.attempts)
        )
    claimed = aliased(Job)
    key = select(rule.key(claimed)).where(claimed.id == job.id).scalar_subquery()
    query = (
        select(Job)
        .where(
            Job.kind == job.kind,
            Job.study_id == job.study_id,
            Job.id != job.id,
            rule.key(Job) == key,
            runnable,
        )
        .order_by(Job.id)
        .limit(rule.limit)
        .with_for_update(skip_locked=True)
    )
    taken = list(session.scalars(query))
    for other in taken:
        _lease(other, owner, lease_seconds, now)
    return taken


def _lease(job: Job, owner: str, lease_seconds: float, now: datetime) -> None:
    job.state = "leased"
    job.lease_owner = owner
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    job.attempts += 1


def renew(
    session: Session,
    owner: str,
    job_ids: Iterable[int],
    lease_seconds: float,
    now: datetime | None = None,
) -> int:
    """Extend to ``now + lease_seconds`` the leases that ``owner`` still holds of the jobs
    ``job_ids`` (those it runs), in one UPDATE; commits; returns how many were renewed.

    A job another worker took over (its lease ran out first) is left alone: the running
    worker finds that out when it records the job's outcome. On PostgreSQL a row locked now
    (its own job thread recording the outcome) is skipped, not waited for: the renewal never
    holds up a job thread nor deadlocks with one that locks several jobs; it is renewed next
    time if it still runs. On SQLite the UPDATE is the transaction's only statement (the
    write lock is held for it alone)."""
    ids = sorted(set(job_ids))
    if not ids:
        return 0
    # The transaction begun first (on SQLite BEGIN IMMEDIATE may wait for the write lock):
    # the lease runs from when it is written, not from before that wait.
    session.connection()
    now = now or utcnow()
    mine = and_(Job.id.in_(ids), Job.lease_owner == owner, Job.state == "leased")
    if session.get_bind().dialect.name != "sqlite":  # SQLite: BEGIN IMMEDIATE, nothing to skip
        mine = Job.id.in_(
            select(Job.id).where(mine).order_by(Job.id).with_for_update(skip_locked=True)
        )
    renewed = session.execute(
        update(Job)
        .where(mine)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return renewed


def queued_seconds(job: Job) -> float:
    """Seconds the job has been due (to its claim, when called as it is claimed)."""
    return max(0.0, (utcnow() - as_utc(job.run_after)).total_seconds())


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_orphaned(
    session: Session,
    host: str,
    alive: Callable[[int], bool] = process_alive,
    now: datetime | None = None,
) -> list[int]:
    """End the leases of jobs held by worker processes of ``host`` that are gone (killed,
    crashed, the machine restarted), so that they are taken over now rather than when the
    lease runs out (``[worker] lease_seconds``, a minute by default); commits; returns the
    jobs' ids. Owners are ``host:pid``; a pid that lives again as another process keeps its
    job until the lease ends, as before.

    Only leases still running when read are ended, so that of the workers that start after a
    crash only the first returns (and logs) the jobs: the others read the leases it ended
    (SQLite: its BEGIN IMMEDIATE puts their reads after its commit; PostgreSQL: rows it
    holds are skipped, and one it committed meanwhile is read as it left it), each ended at
    a time before their reads, since the clock is this host's: ``now`` is taken after it."""
    prefix = f"{host}:"
    query = select(Job).where(
        Job.state == "leased", Job.lease_owner.startswith(prefix, autoescape=True)
    )
    held = list(session.scalars(query.with_for_update(skip_locked=True)))
    now = now or utcnow()
    released = []
    for job in held:
        pid = job.lease_owner.removeprefix(prefix)
        running = job.lease_expires_at is None or as_utc(job.lease_expires_at) > now
        if running and pid.isdigit() and not alive(int(pid)):
            job.lease_expires_at = now
            released.append(job.id)
    if released:
        _wake_workers(session)  # idle ones sleep until these leases' old ends
    session.commit()
    return released


def hasten(
    session: Session, kind: str, alike: Callable[[Job], bool], now: datetime | None = None
) -> int:
    """Make the queued jobs of ``kind`` that have failed before and that ``alike`` admits due
    now instead of at the end of their backoff (e.g. the exports to a destination that
    answers again); commits; returns how many."""
    now = now or utcnow()
    query = select(Job).where(
        Job.kind == kind, Job.state == "queued", Job.attempts > 0, Job.run_after > now
    )
    waiting = [job for job in session.scalars(query) if alike(job)]
    for job in waiting:
        job.run_after = now
    if waiting:
        _wake_workers(session)  # idle ones sleep until these jobs' old times
    session.commit()
    return len(waiting)


def _lease_lost(session: Session, job: Job, owner: str | None) -> bool:
    """True when ``owner`` no longer holds the job (its lease expired and another took it)."""
    if owner is None:
        return False
    current = session.execute(
        select(Job.lease_owner, Job.state).where(Job.id == job.id).with_for_update()
    ).one()
    if current.lease_owner == owner and current.state == "leased":
        return False
    session.rollback()
    return True


def complete(
    session: Session,
    job: Job,
    now: datetime | None = None,
    owner: str | None = None,
    seconds: dict[str, float] | None = None,
) -> bool:
    """Mark a leased job done (commits); False if ``owner`` lost the lease meanwhile.

    ``seconds`` (time per stage) is kept in the job's payload under ``"seconds"``.
    """
    if _lease_lost(session, job, owner):
        return False
    if seconds is not None:
        job.payload = {**job.payload, "seconds": {k: round(v, 6) for k, v in seconds.items()}}
    job.state = "done"
    job.finished_at = now or utcnow()
    job.lease_expires_at = None
    session.commit()
    return True


def backoff_seconds(attempts: int, base: float = BACKOFF_BASE_SECONDS) -> float:
    """Exponential backoff after the ``attempts``-th failure: 2, 4, 8, ... capped."""
    return min(BACKOFF_MAX_SECONDS, base * 2 ** max(0, attempts - 1))


def fail(
    session: Session,
    job: Job,
    reason: str,
    max_attempts: int | None,
    now: datetime | None = None,
    owner: str | None = None,
    backoff_base: float = BACKOFF_BASE_SECONDS,
) -> bool:
    """Record a failure: retry later with backoff, or dead-letter after ``max_attempts``
    (None: never; the backoff stops growing at :data:`BACKOFF_MAX_SECONDS`).

    Commits; False if ``owner`` lost the lease meanwhile (the new holder decides).
    """
    if _lease_lost(session, job, owner):
        return False
    now = now or utcnow()
    job.last_error = reason[:2000]
    job.lease_expires_at = None
    if max_attempts is not None and job.attempts >= max_attempts:
        job.state = "dead"
        job.finished_at = now
    else:
        job.state = "queued"
        job.run_after = now + timedelta(seconds=backoff_seconds(job.attempts, backoff_base))
        _wake_workers(session)  # idle ones sleep until its lease's end, or their poll
    session.commit()
    return True


def dead_letter(
    session: Session,
    job: Job,
    reason: str,
    now: datetime | None = None,
    owner: str | None = None,
) -> bool:
    """Dead-letter a leased job now, whatever attempts it has left: no retry can succeed until
    an admin fixes the cause (e.g. its export's destination is no longer configured) and
    retries it. Commits; False if ``owner`` lost the lease meanwhile."""
    if _lease_lost(session, job, owner):
        return False
    _bury(job, reason, now or utcnow())
    session.commit()
    return True


def dead_letter_queued(
    session: Session,
    kind: str,
    alike: Callable[[Job], bool],
    reason_of: Callable[[Job], str],
    now: datetime | None = None,
) -> list[Job]:
    """Dead-letter now the queued jobs of ``kind`` that ``alike`` admits, each with its
    ``reason_of``, due or waiting out a backoff (jobs leased to a worker are left to it);
    commits; returns them, oldest first."""
    now = now or utcnow()
    query = (
        select(Job)
        .where(Job.kind == kind, Job.state == "queued")
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
    )
    buried = [job for job in session.scalars(query) if alike(job)]
    for job in buried:
        _bury(job, reason_of(job), now)
    session.commit()
    return buried


def _bury(job: Job, reason: str, now: datetime) -> None:
    job.state = "dead"
    job.last_error = reason[:2000]
    job.finished_at = now
    job.lease_expires_at = None


class Postponed(Exception):
    """Raised by a job that must wait for another (e.g. a study's newer analysis) before it
    can decide what to do; the worker puts it back with :func:`postpone`."""

    def __init__(self, reason: str, seconds: float = POSTPONE_SECONDS):
        super().__init__(reason)
        self.seconds = seconds


def postpone(
    session: Session,
    job: Job,
    seconds: float,
    now: datetime | None = None,
    owner: str | None = None,
) -> bool:
    """Queue a leased job again ``seconds`` from now without using one of its attempts.

    Commits; False if ``owner`` lost the lease meanwhile.
    """
    if _lease_lost(session, job, owner):
        return False
    job.state = "queued"
    job.attempts = max(0, job.attempts - 1)
    job.run_after = (now or utcnow()) + timedelta(seconds=seconds)
    job.lease_expires_at = None
    _wake_workers(session)  # idle ones sleep until its lease's end, or their poll
    session.commit()
    return True


def retry(session: Session, job: Job, now: datetime | None = None) -> None:
    """Queue a dead-lettered job again with a fresh attempt budget (the caller commits)."""
    job.state = "queued"
    job.attempts = 0
    job.run_after = now or utcnow()
    job.finished_at = None
    job.lease_owner = ""
    job.lease_expires_at = None
    _wake_workers(session)
