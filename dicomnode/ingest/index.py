"""Index a stored instance: study, series and instance rows in the database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomnode.config import WorklistSettings
from dicomnode.db.models import Instance, Series, Study
from dicomnode.worklist.service import reprioritise


@dataclass(frozen=True)
class InstanceFacts:
    """What the database keeps of a received instance's header."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    modality: str = ""
    study_description: str = ""
    body_part: str = ""
    view_position: str = ""
    series_description: str = ""
    instance_number: int | None = None


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    value = ds.get(keyword, "")
    return str(value if value is not None else "")[:limit]


def instance_facts(ds: Dataset) -> InstanceFacts:
    """Read the identifying attributes; ValueError names the first one that is missing."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(keyword):
            raise ValueError(f"{keyword} is missing")
    number = ds.get("InstanceNumber")
    try:
        instance_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        instance_number = None
    return InstanceFacts(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName", 324),
        accession_number=_text(ds, "AccessionNumber", 16),
        modality=_text(ds, "Modality", 16),
        study_description=_text(ds, "StudyDescription"),
        body_part=_text(ds, "BodyPartExamined", 16).upper(),
        view_position=_text(ds, "ViewPosition", 16).upper(),
        series_description=_text(ds, "SeriesDescription"),
        instance_number=instance_number,
    )


def _study(
    session: Session, facts: InstanceFacts, now: datetime, worklist: WorklistSettings
) -> Study:
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == facts.study_instance_uid)
    ).one_or_none()
    if study is None:
        study = Study(
            study_instance_uid=facts.study_instance_uid,
            patient_id=facts.patient_id,
            patient_name=facts.patient_name,
            accession_number=facts.accession_number,
            modality=facts.modality,
            study_description=facts.study_description,
            received_at=now,
            last_instance_at=now,
            ready_at=now,
            due_at=now,  # NOT NULL at the flush below; reprioritise sets the real one
        )
        session.add(study)
        session.flush()
        # On the worklist from the first instance on, in arrival order until analysed.
        reprioritise(session, study, now, worklist)
    return study


def _series(session: Session, study: Study, facts: InstanceFacts) -> Series:
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == facts.series_instance_uid)
    ).one_or_none()
    if series is None:
        series = Series(
            study_id=study.id,
            series_instance_uid=facts.series_instance_uid,
            modality=facts.modality,
            body_part=facts.body_part,
            view_position=facts.view_position,
            series_description=facts.series_description,
        )
        session.add(series)
        session.flush()
    return series


def index_instance(
    session: Session,
    facts: InstanceFacts,
    *,
    path: str,
    size_bytes: int,
    transfer_syntax_uid: str,
    calling_ae: str,
    now: datetime,
    quiet_seconds: float,
    worklist: WorklistSettings | None = None,
) -> bool:
    """Add the instance's rows and push the study's assembly deadline; False if it was known.

    Commits. Safe to call again for the same instance (a retried C-STORE after a failure
    between the file write and the commit).
    """
    for attempt in range(3):
        try:
            study = _study(session, facts, now, worklist or WorklistSettings())
            series = _series(session, study, facts)
            known = session.scalars(
                select(Instance.id).where(Instance.sop_instance_uid == facts.sop_instance_uid)
            ).first()
            if known is not None:
                session.rollback()
                return False
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=facts.sop_instance_uid,
                    sop_class_uid=facts.sop_class_uid,
                    transfer_syntax_uid=transfer_syntax_uid,
                    instance_number=facts.instance_number,
                    path=path,
                    size_bytes=size_bytes,
                    calling_ae=calling_ae,
                    received_at=now,
                )
            )
            study.last_instance_at = now
            study.ready_at = now + timedelta(seconds=quiet_seconds)
            study.received_generation += 1
            if study.analysis_status in ("analysed", "failed"):
                study.analysis_status = "receiving"
            session.commit()
            return True
        except IntegrityError:
            # Another association created the same study/series/instance concurrently.
            session.rollback()
            if attempt == 2:
                raise
    return False
