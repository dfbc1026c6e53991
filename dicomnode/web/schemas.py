"""Request and response bodies of the REST API (they make the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.db.models import AuditEntry
from dicomnode.db.session import as_utc
from dicomnode.worklist.service import WorklistRow

TierName = Literal["stat", "critical", "urgent", "routine"]
ReadingStatus = Literal["waiting", "ready", "in_progress", "reported"]
# The largest offset or row id a request may give: PostgreSQL's integer (row ids), well
# within SQLite's 64 bits; a larger number would fail in the database driver instead.
MAX_DB_INT = 2**31 - 1


class FindingOut(BaseModel):
    code: str
    scheme: str
    meaning: str
    probability: float
    present: bool
    critical: bool
    model: str


class ResultOut(BaseModel):
    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    model: str
    url: str = Field(description="download the DICOM object")


class MissingResultOut(BaseModel):
    """A model's result object that its results job could not write."""

    model: str
    version: str
    kind: str = Field(
        description="the object: sr, overlay, seg, gsps, derived or kos; 'run' when the "
        "model's run failed or it did not run (error 'not run: ...': its file cannot be "
        "loaded) or 'all' when none of its objects could be prepared"
    )
    error: str = Field(description="why, without patient data")


class WorklistRowOut(BaseModel):
    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    modality: str
    study_description: str
    priority: TierName
    ups_priority: str = Field(description="DICOM UPS priority: HIGH, MEDIUM or LOW")
    score: float
    reason: str = Field(
        description="why: AI finding and probability, order, or override; led by "
        "new_images_text when images arrived after a report or during a claim"
    )
    received_at: datetime
    due_at: datetime = Field(description="read by then (arrival + the tier's max wait)")
    status: ReadingStatus
    analysis_status: str
    analysis_failure: str = Field(
        "",
        description="why a failed analysis failed (analysis_status failed): unreadable (none "
        "of the images can be read: corrupt or unsupported pixel data) or error; else empty",
    )
    analysis_failure_text: str = Field(
        "", description="the same in the worklist's words (empty unless failed)"
    )
    claimed_by: str
    claimed_at: datetime | None
    reported_by: str = Field(
        description="who wrote the latest report (kept while new images after it are read)"
    )
    reported_at: datetime | None
    override_tier: str
    override_reason: str
    override_by: str
    new_images: int = Field(
        0,
        description="instances that arrived after the study was reported (it is back on the "
        "worklist, unread) or while it was claimed, not covered by a report yet",
    )
    new_images_at: datetime | None = Field(
        None, description="when the first of them arrived (after a report: due from then)"
    )
    new_images_text: str = Field(
        "",
        description="the worklist's flag: 'new images after report (n)' or 'new images while "
        "claimed (n)'; empty for none",
    )
    findings: list[FindingOut]
    results: list[ResultOut]
    url: str = Field(description="this study's details")
    export_error: str = Field(
        "",
        description="a dead-lettered export: destination and reason (admin can retry); not "
        "one whose object a later export to that destination sends or sent; else an export "
        "queued again after a failed attempt: 'destination: retrying (N failed: reason)'",
    )
    # The latest results job, so that a reader sees from the list that AI result objects are
    # missing (the priority stands either way: it was committed before they were written).
    results_state: str = Field(
        "",
        description="the result objects' job, written after the priority: queued, leased "
        "(being written), done, dead (failed; the priority stands) or empty (none)",
    )
    results_incomplete: bool = Field(
        False,
        description="AI result objects are missing: none were written (results_state dead, "
        "admin can retry) or some (done: the others were written and sent); results_error "
        "says why and results_missing names them",
    )
    results_error: str = Field(
        "",
        description="why result objects could not be written: all of them (results_state dead) "
        "or some (done: 'model kind: reason; ...'); no patient data",
    )
    results_missing: list[MissingResultOut] = Field(
        [], description="the models' result objects a done results job left out"
    )
    # On every row, so that a study fetched on its own still says where its AI findings are from.
    notice: str = Field(RESEARCH_DEMO_NOTICE, description="the AI findings' research-demo notice")


class WorklistOut(BaseModel):
    notice: str
    server_time: datetime
    total: int = Field(description="studies matching the filters, over all pages")
    limit: int
    offset: int
    rows: list[WorklistRowOut]


class ErrorOut(BaseModel):
    """What an error answers (FastAPI's request validation aside)."""

    detail: str = Field(description="why the request was refused")


# Answers every /api route may give besides its own (documented in the OpenAPI schema).
AUTH_ERRORS: dict[int | str, dict] = {
    401: {"model": ErrorOut, "description": "not logged in: no, a bad or an expired token"},
    403: {
        "model": ErrorOut,
        "description": "admins only (audit, jobs), or a cookie session's change without its "
        "CSRF token",
    },
    422: {
        "description": "invalid request: FastAPI's list of validation errors, or ErrorOut "
        "(e.g. an override without a reason)"
    },
}


class AuditOut(BaseModel):
    at: datetime
    actor: str
    action: str
    study_instance_uid: str
    detail: str
    reason: str


class StudyOut(WorklistRowOut):
    history: list[AuditOut] = Field(description="claims, releases, overrides, newest first")
    analysis_error: str = Field("", description="why the analysis failed (status failed)")
    export_errors: list[str] = Field(
        [],
        description="dead-lettered exports: destination and reason (admin can retry); not "
        "those whose object a later export to that destination sends or sent",
    )


class OverrideIn(BaseModel):
    tier: TierName | None = Field(description="the tier to read it in; null clears an override")
    reason: str = Field(min_length=1, max_length=500, description="why (kept in the audit log)")


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class TokenOut(BaseModel):
    token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: datetime
    username: str
    role: str


class MeOut(BaseModel):
    username: str
    role: str


# The row's fields that say what went wrong with the study's jobs (web.job_failures).
JOB_FIELDS = (
    "export_error",
    "results_state",
    "results_incomplete",
    "results_error",
    "results_missing",
)


def row_out(row: WorklistRow, job_fields: dict[str, object] | None = None) -> WorklistRowOut:
    """A worklist row with links to itself and its result objects; ``job_fields``: those of
    :data:`JOB_FIELDS` its jobs give (the others keep their defaults: nothing wrong)."""
    data = {
        name: getattr(row, name)
        for name in WorklistRowOut.model_fields
        if name not in ("url", "notice", *JOB_FIELDS)
    }
    data.update(job_fields or {})
    data["findings"] = [FindingOut.model_validate(f, from_attributes=True) for f in row.findings]
    data["results"] = [
        ResultOut(
            kind=r.kind,
            sop_instance_uid=r.sop_instance_uid,
            series_instance_uid=r.series_instance_uid,
            model=r.model,
            url=f"/api/results/{r.sop_instance_uid}",
        )
        for r in row.results
    ]
    return WorklistRowOut(**data, url=f"/api/studies/{row.study_instance_uid}")


def audit_out(entry: AuditEntry) -> AuditOut:
    """An audit row as the API shows it."""
    return AuditOut(
        at=as_utc(entry.at),
        actor=entry.actor,
        action=entry.action,
        study_instance_uid=entry.study_instance_uid,
        detail=entry.detail,
        reason=entry.reason,
    )
