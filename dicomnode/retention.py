"""Retention: delete old studies, but only those reported and fully exported."""

from __future__ import annotations

import logging
import shutil
import threading
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, exists, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job, Study
from dicomnode.db.session import utcnow
from dicomnode.jobs.dead_letters import export_covered

log = logging.getLogger("dicomnode.retention")


def expired_studies(session: Session, now: datetime, days: float) -> list[Study]:
    """Studies received more than ``days`` ago, reported, with no results or export job
    still open (a results job queues exports). A dead-lettered export keeps its study until
    it is retried and sent, unless another export of its object to its destination is done
    (a later results job sent it; one queued or running keeps the study itself)."""
    # export_covered() looks at the job of this subquery (correlated to it).
    unfinished = exists().where(
        Job.study_id == Study.id,
        Job.kind.in_(("results", "export")),
        Job.state != "done",
        ~and_(Job.kind == "export", Job.state == "dead", export_covered()),
    )
    return list(
        session.scalars(
            select(Study).where(
                Study.received_at < now - timedelta(days=days),
                Study.reading_status == "reported",
                ~unfinished,
            )
        )
    )


def purge_expired(session: Session, storage: Path, now: datetime, days: float) -> int:
    """Delete the files and rows of expired studies; returns how many were deleted."""
    if days <= 0:
        return 0
    deleted = 0
    for study in expired_studies(session, now, days):
        folder = storage / study.study_instance_uid
        results = storage / "results" / study.study_instance_uid
        session.delete(study)
        session.commit()
        for path in (folder, results):
            if path.is_dir() and path.resolve().is_relative_to(storage.resolve()):
                shutil.rmtree(path, ignore_errors=True)
        log.info("retention: study_id=%d deleted (received %s)", study.id, study.received_at)
        deleted += 1
    return deleted


def cleaner_loop(
    sessions: sessionmaker[Session],
    settings_of,
    stop: threading.Event,
    period: float = 3600.0,
) -> None:
    """Purge expired studies every ``period`` seconds with the current settings."""
    while True:
        settings = settings_of()
        try:
            with sessions() as session:
                purge_expired(
                    session, settings.storage_path, utcnow(), settings.storage.retention_days
                )
        except Exception:
            log.exception("retention clean-up failed; retrying later")
        if stop.wait(period):
            return
