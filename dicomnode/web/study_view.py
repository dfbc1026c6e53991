"""A study's detail for the page and the API: every model's findings (present or absent, with
probability and threshold) and the result objects written for the study, grouped by kind,
with their export state per destination (from the export jobs)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.config import WorklistSettings
from dicomnode.db.models import FindingRow, Job, ResultObject, Study
from dicomnode.db.session import as_utc
from dicomnode.web.job_failures import failures, rows_out
from dicomnode.web.schemas import StudyOut, audit_out
from dicomnode.worklist import audit, service

# The order a PACS engineer reads them in: the report first, then images, then the rest.
KIND_ORDER = ("sr", "overlay", "seg", "gsps", "derived", "kos", "rejection")
KIND_LABELS = {
    "sr": "Structured report (SR)",
    "overlay": "Overlay (secondary capture)",
    "seg": "Segmentation (SEG)",
    "gsps": "Presentation state (GSPS)",
    "derived": "Derived image",
    "kos": "Key object selection (KOS)",
    # IHE IOCM: what a destination is told to hide (results/rejection.py).
    "rejection": "Rejection note of superseded results (IOCM KOS)",
}
ExportState = Literal["queued", "leased", "done", "dead"]


class ModelFindingOut(BaseModel):
    code: str
    scheme: str
    meaning: str
    probability: float
    threshold: float
    present: bool = Field(description="probability at or above the model's threshold")
    critical: bool = Field(description="a critical finding when present")


class ModelFindingsOut(BaseModel):
    model: str
    version: str
    present: int = Field(description="how many of its findings are present")
    findings: list[ModelFindingOut] = Field(description="highest probability first")


class ExportOut(BaseModel):
    destination: str
    state: ExportState
    attempts: int
    last_error: str
    finished_at: datetime | None
    summary: str = Field(description="the state in words, e.g. 'sent', 'failed: <reason>'")


class ResultObjectOut(BaseModel):
    kind: str
    model: str
    version: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    created_at: datetime
    url: str = Field(description="download the DICOM object")
    exports: list[ExportOut] = Field(description="latest export job per destination")


class ResultGroupOut(BaseModel):
    kind: str
    label: str
    results: list[ResultObjectOut]


class StudyDetailOut(StudyOut):
    models: list[ModelFindingsOut] = Field(
        [], description="every model's findings, models with present findings first"
    )
    result_groups: list[ResultGroupOut] = Field(
        [], description="result objects by kind (SR, overlay, SEG, GSPS, derived, KOS)"
    )


def export_summary(state: str, attempts: int, last_error: str) -> str:
    """An export job's state as the detail view says it."""
    if state == "done":
        return "sent"
    if state == "dead":
        return f"failed after {attempts} attempts: {last_error}"
    if state == "leased":
        return "sending"
    if attempts:
        return f"retrying ({attempts} failed: {last_error})"
    return "queued"


def model_findings(session: Session, study_id: int) -> list[ModelFindingsOut]:
    """The study's findings per model: models with present findings first, then by name."""
    by_model: dict[tuple[str, str], list[FindingRow]] = defaultdict(list)
    for finding in session.scalars(select(FindingRow).where(FindingRow.study_id == study_id)):
        by_model[(finding.model_name, finding.model_version)].append(finding)
    models = [
        ModelFindingsOut(
            model=name,
            version=version,
            present=sum(f.probability >= f.threshold for f in findings),
            findings=[
                ModelFindingOut(
                    code=f.code_value,
                    scheme=f.code_scheme,
                    meaning=f.code_meaning,
                    probability=f.probability,
                    threshold=f.threshold,
                    present=f.probability >= f.threshold,
                    critical=f.critical,
                )
                for f in sorted(findings, key=lambda f: (-f.probability, f.code_meaning))
            ],
        )
        for (name, version), findings in by_model.items()
    ]
    return sorted(models, key=lambda m: (m.present == 0, m.model))


def _exports(session: Session, study_id: int) -> dict[int, list[ExportOut]]:
    """Per result id, the latest export job to each destination."""
    latest: dict[tuple[int, str], Job] = {}
    jobs = session.scalars(
        select(Job).where(Job.study_id == study_id, Job.kind == "export").order_by(Job.id)
    )
    for job in jobs:
        payload = job.payload or {}
        try:
            result_id = int(payload.get("result_id"))
        except (TypeError, ValueError):
            continue
        latest[(result_id, str(payload.get("destination", "")))] = job
    exports: dict[int, list[ExportOut]] = defaultdict(list)
    for (result_id, destination), job in sorted(latest.items()):
        exports[result_id].append(
            ExportOut(
                destination=destination,
                state=job.state,
                attempts=job.attempts,
                last_error=job.last_error,
                finished_at=as_utc(job.finished_at) if job.finished_at else None,
                summary=export_summary(job.state, job.attempts, job.last_error),
            )
        )
    return exports


def result_groups(session: Session, study_id: int) -> list[ResultGroupOut]:
    """The study's result objects grouped by kind, in KIND_ORDER (unknown kinds last)."""
    exports = _exports(session, study_id)
    grouped: dict[str, list[ResultObjectOut]] = defaultdict(list)
    results = session.scalars(
        select(ResultObject)
        .where(ResultObject.study_id == study_id)
        .order_by(ResultObject.model_name, ResultObject.id)
    )
    for result in results:
        grouped[result.kind].append(
            ResultObjectOut(
                kind=result.kind,
                model=result.model_name,
                version=result.model_version,
                sop_class_uid=result.sop_class_uid,
                sop_instance_uid=result.sop_instance_uid,
                series_instance_uid=result.series_instance_uid,
                created_at=as_utc(result.created_at),
                url=f"/api/results/{result.sop_instance_uid}",
                exports=exports.get(result.id, []),
            )
        )
    order = {kind: index for index, kind in enumerate(KIND_ORDER)}
    return [
        ResultGroupOut(kind=kind, label=KIND_LABELS.get(kind, kind), results=grouped[kind])
        for kind in sorted(grouped, key=lambda k: (order.get(k, len(order)), k))
    ]


def study_detail(
    session: Session, study_instance_uid: str, site: WorklistSettings
) -> StudyDetailOut:
    """Everything the detail view shows, findings flagged as the ``site`` says; raises
    StudyNotFound."""
    row = service.study_row(session, study_instance_uid, site)
    study_id = session.scalar(
        select(Study.id).where(Study.study_instance_uid == study_instance_uid)
    )
    history = audit.entries(session, study_instance_uid=study_instance_uid, limit=50)
    problems = failures(session, study_instance_uid)
    return StudyDetailOut(
        **rows_out(session, [row])[0].model_dump(),
        history=[audit_out(entry) for entry in history if not entry.action.startswith("view")],
        analysis_error=problems.analysis_error,
        export_errors=problems.export_errors,
        models=model_findings(session, study_id),
        result_groups=result_groups(session, study_id),
    )
