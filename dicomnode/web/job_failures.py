"""What went wrong with a study's jobs, as the worklist rows and the study view show it: a
dead-lettered analysis, export ("destination: reason") or results job."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.models import Job, Study
from dicomnode.web.schemas import WorklistRowOut, row_out
from dicomnode.worklist.service import WorklistRow


@dataclass(frozen=True)
class StudyFailures:
    """What went wrong with a study's jobs, for its detail view."""

    analysis_error: str
    export_errors: list[str]
    # The latest results job: "" (none), queued, leased, done or dead, and its last error.
    results_state: str = ""
    results_error: str = ""


def _export_error(payload: dict | None, reason: str) -> str:
    """A dead-lettered export as the worklist and the study view say it: "destination: reason"."""
    return f"{(payload or {}).get('destination', '')}: {reason}"


def _results_failed(job: Job | None) -> bool:
    """A results job that wrote nothing (dead) or left some objects out (done with models or
    objects not written: a retry would fail the same way)."""
    if job is None:
        return False
    return job.state == "dead" or (
        job.state == "done" and bool((job.payload or {}).get("not_written"))
    )


def _results_error(job: Job | None) -> str:
    """Why result objects are missing: a dead job's last error, or what a done job left out
    ("model kind: error; ...", from its payload; the view says the others were written)."""
    if job is None or not _results_failed(job):
        return ""
    if job.state == "dead":
        return job.last_error or ""
    missing = (job.payload or {}).get("not_written") or []
    return "; ".join(f"{entry['model']} {entry['kind']}: {entry['error']}" for entry in missing)


def failures(session: Session, study_instance_uid: str) -> StudyFailures:
    """The study's analysis error, its dead-lettered exports ("destination: reason") and the
    state of its latest results job (the result objects are written after the priority)."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
    ).one_or_none()
    if study is None:
        return StudyFailures("", [])
    dead = session.scalars(
        select(Job)
        .where(Job.study_id == study.id, Job.kind == "export", Job.state == "dead")
        .order_by(Job.id)
    ).all()
    errors = [_export_error(job.payload, job.last_error) for job in dead]
    results = session.scalars(
        select(Job)
        .where(Job.study_id == study.id, Job.kind == "results")
        .order_by(Job.id.desc())
        .limit(1)
    ).first()
    return StudyFailures(
        study.analysis_error or "",
        errors,
        results_state=results.state if results is not None else "",
        results_error=_results_error(results),
    )


def export_failures(session: Session, study_instance_uids: list[str]) -> dict[str, str]:
    """Per study of a worklist page: its first dead-lettered export, "destination: reason"."""
    if not study_instance_uids:
        return {}
    dead = session.execute(
        select(Study.study_instance_uid, Job.payload, Job.last_error)
        .join(Job, Job.study_id == Study.id)
        .where(
            Study.study_instance_uid.in_(study_instance_uids),
            Job.kind == "export",
            Job.state == "dead",
        )
        .order_by(Job.id)
    ).all()
    failed: dict[str, str] = {}
    for uid, payload, reason in dead:
        failed.setdefault(uid, _export_error(payload, reason))
    return failed


def rows_out(session: Session, rows: list[WorklistRow]) -> list[WorklistRowOut]:
    """Worklist rows as every response shows them, each with its first dead-lettered export."""
    failed = export_failures(session, [row.study_instance_uid for row in rows])
    return [row_out(row, failed.get(row.study_instance_uid, "")) for row in rows]
