"""Durable job queue in the database: leases, retries with backoff, dead letters.

Workers on any host that shares the database claim jobs. PostgreSQL uses
``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite serialises writers, so a plain select inside
the (immediate) write transaction is enough. A job whose lease expired, because its
worker died, is claimed again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from dicomnode.db.models import Job
from dicomnode.db.session import utcnow

BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 600.0


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
    return job


def claim(
    session: Session,
    owner: str,
    kinds: Sequence[str],
    lease_seconds: float,
    now: datetime | None = None,
) -> Job | None:
    """Lease the oldest runnable job of ``kinds`` to ``owner``; commits; None if none is due."""
    now = now or utcnow()
    runnable = or_(
        and_(Job.state == "queued", Job.run_after <= now),
        and_(Job.state == "leased", Job.lease_expires_at < now),
    )
    query = (
        select(Job)
        .where(Job.kind.in_(kinds), runnable)
        .order_by(Job.run_after, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    job = session.scalars(query).first()
    if job is None:
        session.commit()
        return None
    job.state = "leased"
    job.lease_owner = owner
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    job.attempts += 1
    session.commit()
    return job


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
    session: Session, job: Job, now: datetime | None = None, owner: str | None = None
) -> bool:
    """Mark a leased job done (commits); False if ``owner`` lost the lease meanwhile."""
    if _lease_lost(session, job, owner):
        return False
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
    max_attempts: int,
    now: datetime | None = None,
    owner: str | None = None,
    backoff_base: float = BACKOFF_BASE_SECONDS,
) -> bool:
    """Record a failure: retry later with backoff, or dead-letter after ``max_attempts``.

    Commits; False if ``owner`` lost the lease meanwhile (the new holder decides).
    """
    if _lease_lost(session, job, owner):
        return False
    now = now or utcnow()
    job.last_error = reason[:2000]
    job.lease_expires_at = None
    if job.attempts >= max_attempts:
        job.state = "dead"
        job.finished_at = now
    else:
        job.state = "queued"
        job.run_after = now + timedelta(seconds=backoff_seconds(job.attempts, backoff_base))
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
