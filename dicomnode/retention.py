"""Retention: delete old studies, but only those reported and fully exported, with no job
of theirs queued or running.

A study's rows are deleted first, then the files they named, one by one, then the folders
left empty. Never a whole folder: an instance of the study that arrives meanwhile (a file
the rows do not name) stays, with its folder, and its rows make a new study. The decision is
made again for each study in the transaction that deletes it, with its rows locked first
(PostgreSQL: the index writer's rows for the study wait for it; SQLite: one writer at a
time): what the index writer or a worker committed before then counts (a job queued for the
study keeps it), and what the index writer writes after files its instances under a new
study.

A re-sent instance of the study (the same SOP Instance UID, at the same path) must not be
taken for a duplicate of a file that is then removed: retention holds the deletion lock of
:mod:`dicomnode.ingest.deletion` for each study, and renames the files to tombstones before
it commits (back if it does not), so that a listener after it finds no file and stores what
it received; the tombstones are unlinked after the commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, exists, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Instance, Job, ResultObject, Series, Study
from dicomnode.db.session import utcnow
from dicomnode.ingest import deletion
from dicomnode.jobs.dead_letters import export_covered

log = logging.getLogger("dicomnode.retention")


def _unfinished_job() -> ColumnElement[bool]:
    """A job of the study still to do: any job queued or running (an analysis again after
    new images, a critical-result notification), or a results or export job that is not
    done (a results job queues exports). A dead-lettered export keeps its study until it is
    retried and sent, unless another export of its object to its destination is done (a
    later results job sent it; one queued or running keeps the study itself)."""
    # export_covered() looks at the job of this subquery (correlated to it).
    return exists().where(
        Job.study_id == Study.id,
        or_(Job.state.in_(("queued", "leased")), Job.kind.in_(("results", "export"))),
        Job.state != "done",
        ~and_(Job.kind == "export", Job.state == "dead", export_covered()),
    )


def _expired(now: datetime, days: float) -> list[ColumnElement[bool]]:
    return [
        Study.received_at < now - timedelta(days=days),
        Study.reading_status == "reported",
        ~_unfinished_job(),
    ]


def expired_studies(session: Session, now: datetime, days: float) -> list[Study]:
    """Studies received more than ``days`` ago, reported, with no job still to do
    (:func:`_unfinished_job`)."""
    return list(session.scalars(select(Study).where(*_expired(now, days))))


def purge_expired(session: Session, storage: Path, now: datetime, days: float) -> int:
    """Delete the rows and files of expired studies; returns how many were deleted."""
    if days <= 0:
        return 0
    candidates = [study.id for study in expired_studies(session, now, days)]
    session.rollback()  # each study is decided again in its own transaction
    deleted = 0
    for study_id in candidates:
        try:
            deleted += _purge_study(session, storage, study_id, now, days)
        except deletion.StorageBusy as busy:
            # Listeners storing without a gap: the rest waits for the next run.
            log.warning("retention: %s; study_id=%d and later ones next time", busy, study_id)
            break
    return deleted


def _purge_study(
    session: Session, storage: Path, study_id: int, now: datetime, days: float
) -> bool:
    """Delete one study's rows if it is still expired, then the files they named; False
    when it is kept. Listeners wait meanwhile (:func:`dicomnode.ingest.deletion.deleting`)."""
    with deletion.deleting(storage):
        return _purge_locked(session, storage, study_id, now, days)


def _purge_locked(
    session: Session, storage: Path, study_id: int, now: datetime, days: float
) -> bool:
    # The study's series first, then the study, as the index writer takes them (an instance
    # into a series, then its study's update): it waits for this transaction, and after it
    # files what it writes under a new study. SQLite ignores FOR UPDATE: BEGIN IMMEDIATE.
    session.execute(select(Series.id).where(Series.study_id == study_id).with_for_update())
    study = session.scalars(
        select(Study).where(Study.id == study_id, *_expired(now, days)).with_for_update()
    ).one_or_none()
    if study is None:  # changed since (a job queued, its reading status): kept
        session.rollback()
        return False
    instances = session.scalars(
        select(Instance.path).join(Series).where(Series.study_id == study_id)
    ).all()
    results = session.scalars(
        select(ResultObject.path).where(ResultObject.study_id == study_id)
    ).all()
    uid, received_at = study.study_instance_uid, study.received_at
    files = _files(storage, uid, list(instances), list(results))
    tombs: list[Path] = []
    try:
        session.delete(study)
        session.flush()
        # Before the commit: a listener after it stores the instance again (no file there).
        tombs = _tombstones(files)
        session.commit()
    except BaseException:
        session.rollback()
        for tomb in tombs:
            deletion.revive(tomb)
        raise
    _remove_files(storage, uid, files, tombs)
    log.info("retention: study_id=%d deleted (received %s)", study_id, received_at)
    return True


def _in_storage(name: str, folder: Path, uid: str) -> Path | None:
    """Where the file a row names lies now: ``folder``/<study>/<series>/<sop>.dcm (a storage
    folder moved or restored elsewhere since the row was written included); None for a name
    of another shape or study."""
    parts = Path(name).parts
    if len(parts) < 3 or parts[-3] != uid:
        return None
    return folder.joinpath(*parts[-3:])


def _files(storage: Path, uid: str, instances: list[str], results: list[str]) -> list[Path]:
    """Where the files the study's rows name lie now (instances, then result objects)."""
    found = [_in_storage(name, storage, uid) for name in instances]
    found += [_in_storage(name, storage / "results", uid) for name in results]
    return [path for path in found if path is not None]


def _tombstones(files: list[Path]) -> list[Path]:
    """Rename ``files`` to their tombstones (those there); the tombstones. On an error the
    ones made so far are renamed back, and it is raised."""
    tombs: list[Path] = []
    try:
        for path in files:
            tomb = deletion.tombstone(path)
            if tomb is not None:
                tombs.append(tomb)
    except OSError:
        for tomb in tombs:
            deletion.revive(tomb)
        raise
    return tombs


def _remove_files(storage: Path, uid: str, files: list[Path], tombs: list[Path]) -> None:
    """Remove the tombstones of the files the deleted rows named, then the study's folders
    left empty: a file no row named (an instance that arrived meanwhile) keeps its folders."""
    folders = {storage / uid, storage / "results" / uid}
    folders.update(path.parent for path in files)
    failed: list[str] = []
    for tomb in tombs:
        try:
            tomb.unlink(missing_ok=True)
        except OSError as exc:
            failed.append(exc.strerror or str(exc))
    if failed:
        log.warning(
            "retention: %d file(s) of a deleted study not removed: %s", len(failed), failed[0]
        )
    # Series folders, then the study's; rmdir leaves a folder that is not empty.
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


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
