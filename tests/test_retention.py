"""Retention: only old, reported, fully exported studies lose their files and rows."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from worklist_seed import NOW, add_study

from dicomnode.db.models import Job, Study
from dicomnode.retention import purge_expired

DAY = 24 * 60


def _study(session, storage: Path, name: str, days_ago: float, reading: str, exports: list[str]):
    uid = add_study(session, name, minutes_ago=days_ago * DAY, probability=0.1)
    study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
    study.reading_status = reading
    for state in exports:
        session.add(
            Job(
                kind="export",
                study_id=study.id,
                payload={"destination": "pacs", "result_id": 0},
                state=state,
                run_after=NOW,
                created_at=NOW,
            )
        )
    session.commit()
    for folder in (storage / uid / "1.2", storage / "results" / uid / "1.3"):
        folder.mkdir(parents=True)
        (folder / "1.4.dcm").write_bytes(b"DICM")
    return uid


def test_only_reported_and_exported_old_studies_are_deleted(sessions, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    with sessions() as session:
        gone = _study(session, storage, "GONE", 40, "reported", ["done", "done"])
        unread = _study(session, storage, "UNREAD", 40, "ready", ["done"])
        claimed = _study(session, storage, "CLAIMED", 40, "in_progress", [])
        unexported = _study(session, storage, "QUEUED", 40, "reported", ["done", "queued"])
        dead = _study(session, storage, "DEAD", 40, "reported", ["dead"])
        recent = _study(session, storage, "RECENT", 5, "reported", ["done"])

        assert purge_expired(session, storage, NOW, days=0) == 0
        assert purge_expired(session, storage, NOW, days=30) == 1

        left = set(session.scalars(select(Study.study_instance_uid)))
        assert left == {unread, claimed, unexported, dead, recent}
        assert session.scalar(select(func.count()).select_from(Job)) == 5
    assert not (storage / gone).exists() and not (storage / "results" / gone).exists()
    for uid in left:
        assert (storage / uid / "1.2" / "1.4.dcm").exists()
        assert (storage / "results" / uid / "1.3" / "1.4.dcm").exists()


def test_a_dead_export_whose_object_a_later_export_sent_does_not_keep_its_study(
    sessions, tmp_path: Path
) -> None:
    """A dead-lettered export whose object a later results job queued again for the same
    destination (and sent) keeps its study no longer: its retry is refused, and nothing is
    unsent. While that export waits, or with a dead results job, the study stays."""
    storage = tmp_path / "storage"
    with sessions() as session:
        resent = _study(session, storage, "RESENT", 40, "reported", ["dead", "done"])
        resending = _study(session, storage, "RESENDING", 40, "reported", ["dead", "queued"])
        dead = _study(session, storage, "DEAD", 40, "reported", ["dead"])
        unwritten = _study(session, storage, "UNWRITTEN", 40, "reported", ["dead", "done"])
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == unwritten))
        session.add(
            Job(kind="results", study_id=study_id, state="dead", run_after=NOW, created_at=NOW)
        )
        session.commit()

        assert purge_expired(session, storage, NOW, days=30) == 1
        left = set(session.scalars(select(Study.study_instance_uid)))
        assert left == {resending, dead, unwritten}
    assert not (storage / resent).exists() and not (storage / "results" / resent).exists()
