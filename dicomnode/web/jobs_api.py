"""Admin REST API over the job queue: list jobs by state (dead letters), retry a dead job.

A job is dead-lettered after ``[worker] max_attempts`` failures (``last_error`` says why);
an admin retries it once the cause is fixed (destination back, model replaced). Retrying
is audited. Bearer requests need no CSRF token; cookie requests need the page's token.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job, Study
from dicomnode.db.session import as_utc, utcnow
from dicomnode.jobs.dead_letters import (
    Covered,
    ExportedObject,
    Superseded,
    covered_reason,
    covering_jobs,
    exported_objects,
    job_destination,
    jobs_in_state,
    retry_dead,
)
from dicomnode.web.auth import Caller, admin_only
from dicomnode.web.schemas import AUTH_ERRORS, MAX_DB_INT

JobState = Literal["queued", "leased", "done", "dead"]


class JobOut(BaseModel):
    id: int
    kind: str = Field(description="analyse, results (result objects), export or notify")
    state: JobState
    study_instance_uid: str
    destination: str = Field(description="export jobs: the destination's name")
    attempts: int
    last_error: str = Field(description="the reason of the last failure")
    run_after: datetime
    finished_at: datetime | None
    covered_by: int | None = Field(
        None,
        description="a dead job whose work another job does or did (its object queued again "
        "for the destination by a later results job, or the study analysed again): that job's "
        "id; it needs no retry, and a retry is refused",
    )
    covered: str = Field(
        "",
        description="a dead job that needs no retry: what covering job does of its work "
        "(with covered_by), or that its result object was superseded by a later version (no "
        "covered_by); a retry is refused",
    )
    result_kind: str = Field(
        "", description="export jobs: the kind of result object sent (sr, overlay, seg, ...)"
    )
    sop_class: str = Field("", description="export jobs: the SOP Class of the object sent")


def _job_out(
    job: Job,
    study_uid: str,
    covering: Job | Superseded | None = None,
    sends: ExportedObject | None = None,
) -> JobOut:
    return JobOut(
        covered_by=covering.id if isinstance(covering, Job) else None,
        covered=covered_reason(job, covering) if covering is not None else "",
        result_kind=sends.kind if sends is not None else "",
        sop_class=sends.sop_class if sends is not None else "",
        id=job.id,
        kind=job.kind,
        state=job.state,
        study_instance_uid=study_uid,
        destination=job_destination(job),
        attempts=job.attempts,
        last_error=job.last_error,
        run_after=as_utc(job.run_after),
        finished_at=as_utc(job.finished_at) if job.finished_at else None,
    )


def jobs_router(sessions: sessionmaker[Session], caller_of: Callable[..., Caller]) -> APIRouter:
    """The /api/jobs routes (admin only)."""
    router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=AUTH_ERRORS)

    authenticated = Depends(caller_of)

    def admin(caller: Caller = authenticated) -> Caller:
        return admin_only(caller)

    admin_required = Depends(admin)

    @router.get("", response_model=list[JobOut])
    def list_jobs(
        caller: Caller = admin_required,
        state: JobState = "dead",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[JobOut]:
        """Jobs in one state, newest first (default: dead letters, with their reason; a dead
        letter whose work another job covers says which, in ``covered_by``)."""
        with sessions() as session:
            rows = jobs_in_state(session, state, limit=limit)
            jobs = [job for job, _ in rows]
            covering = covering_jobs(session, jobs) if state == "dead" else {}
            sends = exported_objects(session, jobs)
            return [
                _job_out(job, uid, covering.get(job.id), sends.get(job.id)) for job, uid in rows
            ]

    @router.post("/{job_id}/retry", response_model=JobOut)
    def retry_job(job_id: int, caller: Caller = admin_required) -> JobOut:
        """Queue a dead-lettered job again with a fresh attempt budget. 409 when it is not
        dead, or when another job already does or did its work (an export of the same result
        object to the same destination queued, being sent or sent; an analysis of the study
        queued after it): the reason names that job, and the job stays dead."""
        now = utcnow()
        with sessions() as session:
            job = session.get(Job, job_id) if 0 < job_id <= MAX_DB_INT else None
            if job is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
            if job.state != "dead":
                raise HTTPException(
                    status.HTTP_409_CONFLICT, f"job {job_id} is {job.state}, not dead"
                )
            study = session.get(Study, job.study_id)
            try:
                retry_dead(session, job, caller.principal.username, now)
            except Covered as covered:
                # Queuing it would send the object (or analyse the study) a second time.
                raise HTTPException(status.HTTP_409_CONFLICT, str(covered)) from None
            except ValueError as error:
                # Another admin's retry of it committed since it was read.
                raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
            session.commit()
            sends = exported_objects(session, [job]).get(job.id)
            return _job_out(job, study.study_instance_uid if study else "", sends=sends)

    return router
