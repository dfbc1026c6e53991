"""What went wrong with a study's jobs, as the worklist rows and the study view show it: a
failed analysis, a dead-lettered export ("destination: reason"; not one whose object a later
export sends or sent), on a worklist row else an export queued again after a failed attempt
("destination: retrying (N failed: reason)"), and result objects that its latest results job
did not write (all of them: dead; some: done naming what it left out)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session

from dicomnode.db.models import Job, Study
from dicomnode.jobs.dead_letters import export_covered
from dicomnode.web.schemas import MissingResultOut, WorklistRowOut, row_out
from dicomnode.worklist.service import WorklistRow


@dataclass(frozen=True)
class StudyFailures:
    """What went wrong with a study's jobs, for its detail view."""

    analysis_error: str
    export_errors: list[str]


def _export_error(payload: dict | None, reason: str, state: str = "dead", attempts: int = 0) -> str:
    """A dead-lettered export as the worklist and the study view say it: "destination:
    reason"; on a worklist row, one queued again after ``attempts`` failed attempts:
    "destination: retrying (N failed: reason)", as the study view's export summary says it."""
    destination = (payload or {}).get("destination", "")
    if state == "dead":
        return f"{destination}: {reason}"
    return f"{destination}: retrying ({attempts} failed: {reason})"


def _dead_export() -> ColumnElement[bool]:
    """A dead-lettered export job, not one whose object another export to the destination
    sends or sent."""
    return and_(Job.kind == "export", Job.state == "dead", ~export_covered())


def _retrying_export() -> ColumnElement[bool]:
    """An export job queued again after a failed attempt: its destination down, out of
    resources, or refusing the object until its attempts are spent."""
    return and_(Job.kind == "export", Job.state == "queued", Job.attempts > 0, Job.last_error != "")


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
    """The study's analysis error and its dead-lettered exports ("destination: reason"),
    leaving out those whose object a later export to the same destination sends or sent (a
    later results job queues one: :func:`~dicomnode.jobs.dead_letters.export_covered`); its
    results job's state is on its worklist row (:func:`rows_out`), an export retrying in its
    result objects' export summaries."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
    ).one_or_none()
    if study is None:
        return StudyFailures("", [])
    dead = session.scalars(
        select(Job).where(Job.study_id == study.id, _dead_export()).order_by(Job.id)
    ).all()
    errors = [_export_error(job.payload, job.last_error) for job in dead]
    return StudyFailures(without_server_paths(study.analysis_error or ""), errors)


# decode.describe's "file F, SOP Instance U": the stored file's path on the server.
_STORED_FILE = re.compile(r"file [^,]*?, (SOP Instance )")


def without_server_paths(reason: str) -> str:
    """A recorded reason as the page and API show it: the stored files' paths on the server
    (which the log keeps) left out, the SOP Instance UIDs kept. A path runs on without a
    break (it widened the study page to 2,800 px) and is nothing a reader acts on."""
    return _STORED_FILE.sub(r"\1", reason)


def export_failures(session: Session, study_instance_uids: list[str]) -> dict[str, str]:
    """Per study of a worklist page: its first dead-lettered export, "destination: reason"
    (as in :func:`failures`, not one whose object another export sends or sent), else its
    first export queued again after a failed attempt, "destination: retrying (N failed:
    reason)": objects stuck retrying (a destination down, or refusing them until their
    attempts are spent) showed as no export problem at all."""
    if not study_instance_uids:
        return {}
    found = session.execute(
        select(Study.study_instance_uid, Job.payload, Job.last_error, Job.state, Job.attempts)
        .join(Job, Job.study_id == Study.id)
        .where(
            Study.study_instance_uid.in_(study_instance_uids),
            or_(_dead_export(), _retrying_export()),
        )
        # The dead-lettered ones first (an admin retries them), then by job.
        .order_by(case((Job.state == "dead", 0), else_=1), Job.id)
    ).all()
    failed: dict[str, str] = {}
    for uid, payload, reason, state, attempts in found:
        failed.setdefault(uid, _export_error(payload, reason, state, attempts))
    return failed


def results_jobs(session: Session, study_instance_uids: list[str]) -> dict[str, Job]:
    """Per study of a worklist page: its latest results job (the one whose objects it shows;
    an earlier one was superseded by a newer analysis), in one query."""
    if not study_instance_uids:
        return {}
    latest = (
        select(func.max(Job.id))
        .join(Study, Job.study_id == Study.id)
        .where(Study.study_instance_uid.in_(study_instance_uids), Job.kind == "results")
        .group_by(Job.study_id)
    )
    found = session.execute(
        select(Study.study_instance_uid, Job)
        .join(Job, Job.study_id == Study.id)
        .where(Job.id.in_(latest.scalar_subquery()))
    ).all()
    return {uid: job for uid, job in found}


def _results_fields(job: Job | None) -> dict[str, object]:
    """The worklist row's results fields for its latest results job: a radiologist reading
    from the list sees that AI result objects are missing, and which."""
    if job is None:
        return {}
    # A dead job wrote none of its objects: its reason says why, there is no list.
    missing = ((job.payload or {}).get("not_written") or []) if job.state == "done" else []
    return {
        "results_state": job.state,
        "results_incomplete": _results_failed(job),
        "results_error": _results_error(job),
        "results_missing": [
            MissingResultOut(
                model=entry["model"],
                version=entry.get("version", ""),
                kind=entry["kind"],
                error=entry["error"],
            )
            for entry in missing
        ],
    }


def rows_out(session: Session, rows: list[WorklistRow]) -> list[WorklistRowOut]:
    """Worklist rows as every response shows them, each with its first dead-lettered (else
    retrying) export and its latest results job (two queries for the page, none per row)."""
    uids = [row.study_instance_uid for row in rows]
    failed = export_failures(session, uids)
    results = results_jobs(session, uids)
    return [
        row_out(
            row,
            {
                "export_error": failed.get(row.study_instance_uid, ""),
                **_results_fields(results.get(row.study_instance_uid)),
            },
        )
        for row in rows
    ]
