"""Seed studies with AI findings straight into a database, through the worklist service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy.orm import Session

from dicomnode.db.models import FindingRow, ResultObject, Study
from dicomnode.worklist.service import reprioritise

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
PNEUMOTHORAX = ("36118008", "SCT", "Pneumothorax")


def add_study(
    session: Session,
    accession: str,
    *,
    minutes_ago: float = 10,
    probability: float | None = None,
    modality: str = "DX",
    critical: bool = True,
    now: datetime = NOW,
    result_file: Path | None = None,
) -> str:
    """A study received ``minutes_ago``; analysed with one finding when ``probability`` is set."""
    received = now - timedelta(minutes=minutes_ago)
    study = Study(
        study_instance_uid=generate_uid(),
        patient_id=f"PID-{accession}",
        patient_name="Demo^Patient",
        accession_number=accession,
        modality=modality,
        study_description="Chest PA",
        received_at=received,
        last_instance_at=received,
        ready_at=received,
        due_at=received,
        analysis_status="analysed" if probability is not None else "queued",
    )
    session.add(study)
    session.flush()
    if probability is not None:
        code, scheme, meaning = PNEUMOTHORAX
        session.add(
            FindingRow(
                study_id=study.id,
                model_name="cxr-pneumothorax-demo",
                model_version="1.0",
                code_value=code,
                code_scheme=scheme,
                code_meaning=meaning,
                probability=probability,
                threshold=0.5,
                critical=critical,
            )
        )
    if result_file is not None:
        session.add(
            ResultObject(
                study_id=study.id,
                kind="sr",
                model_name="cxr-pneumothorax-demo",
                model_version="1.0",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                sop_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(),
                path=str(result_file),
                created_at=now,
            )
        )
    session.flush()
    session.refresh(study, ["findings"])
    reprioritise(session, study, now)
    session.commit()
    return study.study_instance_uid
