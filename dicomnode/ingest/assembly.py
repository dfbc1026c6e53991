"""Study assembly: a study is ready for analysis after a quiet period without instances.

Each stored instance bumps ``received_generation`` and pushes ``ready_at``; the end of an
association pushes ``ready_at`` again. A ready study whose generation is ahead of the one
last queued gets an analysis job, so instances arriving late re-run the analysis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicomnode.db.models import Study
from dicomnode.db.session import as_utc, utcnow
from dicomnode.jobs.queue import enqueue


def quiet_period_end(last: datetime, quiet_seconds: float) -> datetime:
    """When a study whose last instance or association ended at ``last`` becomes ready:
    the ``ready_at`` that index rows and association ends write."""
    return last + timedelta(seconds=quiet_seconds)


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
        .values(ready_at=quiet_period_end(now, quiet_seconds))
    )
    session.commit()


def queue_ready_studies(session: Session, now: datetime) -> list[int]:
    """Create an analysis job for every study whose quiet period is over; returns study ids."""
    # In id order: each update below locks its study's row until the commit, and on PostgreSQL
    # the others locking several studies (jobs.queue.lock_studies) go in id order too.
    candidates = session.execute(
        select(Study.id, Study.received_generation)
        .where(Study.received_generation > Study.queued_generation, Study.ready_at <= now)
        .order_by(Study.id)
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


class ReadyTimes:
    """The ends of quiet periods that this process's index writer has just written, so that
    the assembly check runs when one ends instead of polling for them."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._earliest: datetime | None = None

    def written(self, ready_at: datetime) -> None:
        """A study's quiet period now ends at ``ready_at`` (or later)."""
        with self._changed:
            if self._earliest is None or ready_at < self._earliest:
                self._earliest = ready_at
                self._changed.notify_all()

    def clear(self) -> None:
        """Forget what was written so far (an assembly check is about to read it)."""
        with self._changed:
            self._earliest = None

    def wait(self, until: datetime, longest: float) -> None:
        """Until ``until``, or sooner, when a quiet period written meanwhile ends first; never
        longer than ``longest`` seconds (should the wall clock be set back meanwhile)."""
        give_up = time.monotonic() + longest
        with self._changed:
            while True:
                target = until if self._earliest is None else min(until, self._earliest)
                left = min((target - utcnow()).total_seconds(), give_up - time.monotonic())
                if left <= 0:
                    return
                self._changed.wait(left)
