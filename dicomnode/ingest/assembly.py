"""Study assembly: a study is ready for analysis after a quiet period without instances.

Each stored instance bumps ``received_generation`` and pushes ``ready_at``; the end of an
association pushes ``ready_at`` again. A ready study whose generation is ahead of the one
last queued gets an analysis job, so instances arriving late re-run the analysis.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicomnode.db.models import Study
from dicomnode.db.session import as_utc
from dicomnode.jobs import enqueue


def association_ended(
    session: Session, study_uids: Iterable[str], now: datetime, quiet_seconds: float
) -> None:
    """Restart the quiet period of the studies an association sent (release or abort)."""
    uids = list(study_uids)
    if not uids:
        return
    session.execute(
        update(Study)
        .where(Study.study_instance_uid.in_(uids))
        .values(ready_at=now + timedelta(seconds=quiet_seconds))
    )
    session.commit()


def queue_ready_studies(session: Session, now: datetime) -> list[int]:
    """Create an analysis job for every study whose quiet period is over; returns study ids."""
    candidates = session.execute(
        select(Study.id, Study.received_generation).where(
            Study.received_generation > Study.queued_generation, Study.ready_at <= now
        )
    ).all()
    queued = []
    for study_id, generation in candidates:
        # Conditional update: a concurrent assembler (or a new instance) makes this a no-op.
        claimed = session.execute(
            update(Study)
            .where(Study.id == study_id, Study.received_generation == generation)
            .where(Study.queued_generation < generation)
            .values(queued_generation=generation, analysis_status="queued")
        ).rowcount
        if claimed:
            enqueue(session, "analyse", study_id, {"generation": generation}, now=now)
            queued.append(study_id)
    session.commit()
    return queued


def next_ready_at(session: Session) -> datetime | None:
    """When the next study waiting for its quiet period becomes ready (None: none waits), so
    that the assembly check can run then instead of up to one polling period later."""
    due = session.scalar(
        select(func.min(Study.ready_at)).where(Study.received_generation > Study.queued_generation)
    )
    return None if due is None else as_utc(due)
