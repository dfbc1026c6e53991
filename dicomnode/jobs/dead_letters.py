"""Dead-lettered jobs as an admin sees them, and their retry (the REST API and the CLI).

A job is dead-lettered after ``[worker] max_attempts`` failures, or at once when no retry can
succeed (e.g. its destination is no longer configured); ``last_error`` says why. Once the
cause is fixed (destination back, model replaced) an admin retries it: it is queued again
with a fresh attempt budget, an analysis's study goes back to queued, and the retry is
audited with who asked.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.models import Job, Study
from dicomnode.jobs.queue import retry
from dicomnode.worklist import audit


def jobs_in_state(
    session: Session,
    state: str,
    kind: str | None = None,
    destination: str | None = None,
    limit: int | None = None,
) -> list[tuple[Job, str]]:
    """Jobs in ``state`` (newest first) with their study's Study Instance UID; only those of
    ``kind`` and, for exports, of ``destination`` when given."""
    query = (
        select(Job, Study.study_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == state)
        .order_by(Job.id.desc())
    )
    if kind is not None:
        query = query.where(Job.kind == kind)
    if destination is None:
        return [(job, uid) for job, uid in session.execute(query.limit(limit)).all()]
    # The destination lies in the JSON payload: exports only, matched here.
    rows = session.execute(query.where(Job.kind == "export")).all()
    matching = [(job, uid) for job, uid in rows if job_destination(job) == destination]
    return matching[:limit] if limit is not None else matching


def job_destination(job: Job) -> str:
    """An export job's destination name ('' for other kinds)."""
    return str((job.payload or {}).get("destination", ""))


def retry_dead(session: Session, job: Job, actor: str, now: datetime) -> None:
    """Queue the dead job ``job`` again, audited as ``actor``'s (the caller commits)."""
    if job.state != "dead":
        raise ValueError(f"job {job.id} is {job.state}, not dead")
    study = session.get(Study, job.study_id)
    retry(session, job, now)
    if job.kind == "analyse" and study is not None:
        study.analysis_status = "queued"
    audit.record(
        session,
        actor,
        "retry_job",
        now,
        study_instance_uid=study.study_instance_uid if study else "",
        detail=f"job {job.id} {job.kind}",
    )
