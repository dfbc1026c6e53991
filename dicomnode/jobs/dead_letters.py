"""Dead-lettered jobs as an admin sees them, and their retry (the REST API and the CLI).

A job is dead-lettered after ``[worker] max_attempts`` failures, or at once when no retry can
succeed (e.g. its destination is no longer configured); ``last_error`` says why. Once the
cause is fixed (destination back, model replaced) an admin retries it: it is queued again
with a fresh attempt budget, an analysis's study goes back to queued, and the retry is
audited with who asked.

A dead job whose work another job already covers is not queued again (:class:`Covered`): an
export whose result object a later results job queued again for the same destination
(queued, being sent or sent), or an analysis after which the study was queued for analysis
again (each analysis reads the whole study). Retrying it would send the object to the
destination twice, or analyse the study twice. A dead export whose result object no longer
exists (:class:`Superseded`: late images made a later version, with a new id, that its own
exports send) needs no retry either: it could only fail with "result no longer exists".

The rule is kept twice, in Python for a listing (:func:`covering_jobs`) and in SQL for the
views that count or leave out such dead letters in their own query (:func:`export_covered`,
:func:`needs_retry`); both compare a payload's result id as text, whether it was written as
5 or "5" (SQLAlchemy casts SQLite's json_extract, which keeps the JSON type, to text).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.uid import UID
from sqlalchemy import ColumnElement, String, and_, cast, exists, or_, select
from sqlalchemy.orm import Session, aliased

from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.jobs.queue import lock_studies, retry
from dicomnode.results.rejection import hasten_notes
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


@dataclass(frozen=True)
class ExportedObject:
    """What an export job sends: its result object's kind and SOP Class."""

    kind: str
    sop_class_uid: str

    @property
    def sop_class(self) -> str:
        """The SOP Class's name (its UID when pydicom does not know it)."""
        return UID(self.sop_class_uid).name or self.sop_class_uid

    def __str__(self) -> str:
        return f"{self.kind}: {self.sop_class}"


def exported_objects(session: Session, jobs: Sequence[Job]) -> dict[int, ExportedObject]:
    """The result object each export job of ``jobs`` sends, by job id (one query; a job
    whose object is gone has none)."""
    wanted = {
        job.id: int(result_id)
        for job in jobs
        if job.kind == "export"
        and str(result_id := (job.payload or {}).get("result_id", "")).isdigit()
    }
    if not wanted:
        return {}
    found: dict[int, ExportedObject] = {}
    ids = sorted(set(wanted.values()))
    for start in range(0, len(ids), _CHUNK):
        rows = session.execute(
            select(ResultObject.id, ResultObject.kind, ResultObject.sop_class_uid).where(
                ResultObject.id.in_(ids[start : start + _CHUNK])
            )
        )
        found.update({row.id: ExportedObject(row.kind, row.sop_class_uid) for row in rows})
    return {job_id: found[result] for job_id, result in wanted.items() if result in found}


def job_destination(job: Job) -> str:
    """An export job's destination name ('' for other kinds)."""
    return str((job.payload or {}).get("destination", ""))


# Jobs that cover a dead job's work: it is, or will be, done by them.
_COVERING_STATES = ("queued", "leased", "done")
# The kinds whose dead jobs another job can cover.
_COVERED_KINDS = ("export", "analyse")
# Studies looked up per query by covering_jobs.
_CHUNK = 500


@dataclass(frozen=True)
class Superseded:
    """What covers a dead export whose result object no longer exists: a later version of
    the object replaced it (its row is gone), and that version's exports send it."""

    result_id: str


class Covered(Exception):
    """A dead job not queued again because another job does or did its work, or its result
    object was superseded (``covering``); the message says which."""

    def __init__(self, job: Job, covering: Job | Superseded):
        self.job = job
        self.covering = covering
        super().__init__(f"job {job.id} is not queued again: {covered_reason(job, covering)}")


def covered_reason(job: Job, covering: Job | Superseded) -> str:
    """What ``covering`` does of the dead ``job``'s work, as the admin is told: "result
    object 5 was sent to 'pacs' by export job 40", "result object 5 was superseded by a
    later version"."""
    if isinstance(covering, Superseded):
        return f"result object {covering.result_id} was superseded by a later version"
    tense = {"done": "was {} by", "leased": "is being {} by"}.get(
        covering.state, "is queued to be {} by"
    )
    if job.kind == "export":
        result_id = (job.payload or {}).get("result_id")
        sent = tense.format(f"sent to '{job_destination(job)}'")
        return f"result object {result_id} {sent} export job {covering.id}"
    return f"the study {tense.format('analysed again')} analyse job {covering.id}"


def covering_job(session: Session, job: Job) -> Job | Superseded | None:
    """The job that does or did the dead ``job``'s work, if any (the newest): for an export,
    another export of the same result object to the same destination, queued, leased or done
    (a later results job queues one for an object whose export was dead-lettered), else
    :class:`Superseded` when its result object no longer exists; for an analysis, an
    analysis of the study queued after it (each analysis reads the whole study). Other
    kinds: None (a newer results job supersedes an older one when it runs)."""
    return covering_jobs(session, [job]).get(job.id)


def covering_jobs(session: Session, jobs: Sequence[Job]) -> dict[int, Job | Superseded]:
    """:func:`covering_job` of each of the dead ``jobs`` that has one, by the dead job's id
    (one query: a listing of dead letters says which need no retry)."""
    dead = [job for job in jobs if job.kind in _COVERED_KINDS]
    if not dead:
        return {}
    study_ids = sorted({job.study_id for job in dead})
    kinds = sorted({job.kind for job in dead})
    by_study: dict[tuple[int, str], list[Job]] = defaultdict(list)
    # In chunks: a database takes only so many parameters in one statement.
    for start in range(0, len(study_ids), _CHUNK):
        candidates = session.scalars(
            select(Job)
            .where(
                Job.study_id.in_(study_ids[start : start + _CHUNK]),
                Job.kind.in_(kinds),
                Job.state.in_(_COVERING_STATES),
            )
            .order_by(Job.id.desc())
        )
        for other in candidates:
            by_study[(other.study_id, other.kind)].append(other)
    found: dict[int, Job | Superseded] = {}
    for job in dead:
        covering: Job | Superseded | None = next(
            (
                other
                for other in by_study[(job.study_id, job.kind)]
                if other.id != job.id and _covers(other, job)
            ),
            None,
        )
        if covering is not None:
            found[job.id] = covering
    exports = [job for job in dead if job.kind == "export" and job.id not in found]
    existing = _existing_results(session, {_result_key(job) for job in exports})
    for job in exports:
        key = _result_key(job)
        if key and (key, job.study_id) not in existing:
            found[job.id] = Superseded(key)
    return found


def _result_key(job: Job) -> str:
    """An export job's result object id as text ('' when its payload has none): 5 and "5"
    alike, as :func:`_payload_result_id` in SQL."""
    result_id = (job.payload or {}).get("result_id")
    return "" if result_id is None else str(result_id)


def _existing_results(session: Session, keys: set[str]) -> set[tuple[str, int]]:
    """(id as text, study id) of those of the result objects ``keys`` (ids as text) whose
    rows exist."""
    ids = sorted(int(key) for key in keys if key.isdigit())
    existing: set[tuple[str, int]] = set()
    for start in range(0, len(ids), _CHUNK):
        rows = session.execute(
            select(ResultObject.id, ResultObject.study_id).where(
                ResultObject.id.in_(ids[start : start + _CHUNK])
            )
        )
        existing.update((str(row.id), row.study_id) for row in rows)
    return existing


def _covers(other: Job, job: Job) -> bool:
    """Whether ``other`` (of the same study and kind, queued, leased or done) does ``job``'s
    work: an analysis queued after it; an export of the same object to the same destination
    (its result object and destination lie in the JSON payload: matched here)."""
    if job.kind == "analyse":
        return other.id > job.id
    return _export_target(other) == _export_target(job)


def _payload_result_id(job: Any) -> ColumnElement[str]:
    """SQL: an export job's result object id as text, whether its JSON payload has 5 or "5"
    (on SQLite ``as_string()`` is CAST(JSON_EXTRACT(...) AS VARCHAR): json_extract alone
    returns the integer for one, the text for the other, and 5 = '5' is false)."""
    return job.payload["result_id"].as_string()


def export_covered(dead: Any = Job) -> ColumnElement[bool]:
    """SQL: the export job ``dead`` (the jobs table or an alias of it) is covered, as
    :func:`covering_job` finds for an export: another export of its study, of the same result
    object to the same destination, is queued, leased or done; or its result object no
    longer exists (superseded). For the views that leave such dead letters out (the
    worklist, the study page, retention) in their own query."""
    other = aliased(Job)
    result_id = _payload_result_id(dead)
    sent = exists().where(
        other.study_id == dead.study_id,
        other.kind == "export",
        other.id != dead.id,
        other.state.in_(_COVERING_STATES),
        _payload_result_id(other) == result_id,
        other.payload["destination"].as_string() == dead.payload["destination"].as_string(),
    )
    superseded = and_(
        result_id.is_not(None),
        result_id != "",
        # Its study's result objects (indexed), the id compared as text as above.
        ~exists().where(
            ResultObject.study_id == dead.study_id, cast(ResultObject.id, String) == result_id
        ),
    )
    return or_(sent, superseded)


def analyse_covered(dead: Any = Job) -> ColumnElement[bool]:
    """SQL: the analyse job ``dead`` is covered, as :func:`covering_job` finds for an
    analysis: an analysis of its study queued after it is queued, leased or done."""
    other = aliased(Job)
    return exists().where(
        other.study_id == dead.study_id,
        other.kind == "analyse",
        other.id > dead.id,
        other.state.in_(_COVERING_STATES),
    )


def needs_retry(dead: Any = Job) -> ColumnElement[bool]:
    """SQL: the dead job ``dead`` is one that no other job covers (an admin's to act on)."""
    return ~or_(
        and_(dead.kind == "export", export_covered(dead)),
        and_(dead.kind == "analyse", analyse_covered(dead)),
    )


def _export_target(job: Job) -> tuple[str, str]:
    """An export job's (result object id, destination), as text."""
    return str((job.payload or {}).get("result_id", "")), job_destination(job)


def retry_dead(session: Session, job: Job, actor: str, now: datetime) -> None:
    """Queue the dead job ``job`` again, audited as ``actor``'s (the caller commits).

    Raises :class:`Covered` (nothing changed, nothing audited) when another job does or did
    its work (:func:`covering_job`), ValueError when it is not dead.

    The study is locked first (:func:`~dicomnode.jobs.queue.lock_studies`) and the job read
    again under the lock, so that on PostgreSQL what queues the same work at the same moment
    takes turns with the retry: a results job queuing the study's exports (it locks the study
    too), the assembly queuing an analysis (its update of the study waits for the lock), or
    another admin's retry of the job. The one that commits first is seen by the check that
    comes second, as when they come seconds apart: the object is not sent twice."""
    lock_studies(session, [job.study_id])
    session.refresh(job)
    if job.state != "dead":
        raise ValueError(f"job {job.id} is {job.state}, not dead")
    covering = covering_job(session, job)
    if covering is not None:
        raise Covered(job, covering)
    study = session.get(Study, job.study_id)
    retry(session, job, now)
    # The rejection notes put back while this export was dead follow it now, not at the end
    # of their postponement.
    hasten_notes(session, [job], now)
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
