"""The reading worklist in the database: re-prioritise studies, list them in reading order."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from dicomnode.db.models import Study
from dicomnode.db.session import as_utc
from dicomnode.worklist.policy import FindingFact, StudyFacts, prioritise


def reprioritise(session: Session, study: Study, now: datetime) -> None:
    """Apply the policy to a study's current findings (the caller commits)."""
    facts = StudyFacts(
        received_at=as_utc(study.received_at),
        modality=study.modality,
        analysis_status=study.analysis_status,
    )
    findings = [
        FindingFact(f.code_meaning, f.probability, f.threshold, f.critical) for f in study.findings
    ]
    priority = prioritise(facts, findings, now)
    study.tier = priority.tier
    study.tier_rank = priority.tier_rank
    study.score = priority.score
    study.ups_priority = priority.ups_priority
    study.reason = priority.reason
    study.due_at = priority.due_at


@dataclass
class WorklistFinding:
    code: str
    scheme: str
    meaning: str
    probability: float
    present: bool
    critical: bool
    model: str


@dataclass
class WorklistRow:
    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    modality: str
    priority: str
    ups_priority: str
    score: float
    reason: str
    received_at: datetime
    status: str
    analysis_status: str
    findings: list[WorklistFinding] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)


def reading_order(session: Session, limit: int = 200, offset: int = 0) -> list[WorklistRow]:
    """Unreported studies in the order radiologists should read them (earliest due first)."""
    studies = session.scalars(
        select(Study)
        .where(Study.reading_status != "reported")
        .order_by(Study.due_at, Study.id)
        .limit(limit)
        .offset(offset)
        .options(selectinload(Study.findings), selectinload(Study.results))
    ).all()
    return [_row(study) for study in studies]


def _row(study: Study) -> WorklistRow:
    return WorklistRow(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        modality=study.modality,
        priority=study.tier,
        ups_priority=study.ups_priority,
        score=study.score,
        reason=study.reason,
        received_at=as_utc(study.received_at),
        status=study.reading_status,
        analysis_status=study.analysis_status,
        findings=[
            WorklistFinding(
                code=f.code_value,
                scheme=f.code_scheme,
                meaning=f.code_meaning,
                probability=f.probability,
                present=f.probability >= f.threshold,
                critical=f.critical,
                model=f"{f.model_name} {f.model_version}",
            )
            for f in sorted(study.findings, key=lambda f: -f.probability)
        ],
        results=[
            {
                "kind": r.kind,
                "sop_instance_uid": r.sop_instance_uid,
                "series_instance_uid": r.series_instance_uid,
                "model": f"{r.model_name} {r.model_version}",
            }
            for r in study.results
        ],
    )
