"""Seed studies with AI findings straight into a database, through the worklist service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy.orm import Session

from dicomnode.config import WorklistSettings
from dicomnode.db.models import FindingRow, Job, ResultObject, Study
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
    reprioritise(session, study, now, WorklistSettings())
    session.commit()
    return study.study_instance_uid


# A frontal chest X-ray through the whole model zoo: (model, code, scheme, meaning,
# probability, threshold, critical). Three findings are present, eight are below threshold.
ZOO_FINDINGS = (
    ("cxr-pneumothorax-demo", "36118008", "SCT", "Pneumothorax", 0.91, 0.634, True),
    ("cxr-findings-demo", "36118008", "SCT", "Pneumothorax", 0.84, 0.402, True),
    ("cxr-findings-demo", "60046008", "SCT", "Pleural effusion", 0.12, 0.601, True),
    ("cxr-findings-demo", "95436008", "SCT", "Lung consolidation", 0.07, 0.434, True),
    ("cxr-findings-demo", "8186001", "SCT", "Cardiomegaly", 0.31, 0.546, False),
    ("cxr-findings-demo", "19242006", "SCT", "Pulmonary edema", 0.04, 0.419, True),
    ("cxr-findings-demo", "786838002", "SCT", "Pulmonary nodule", 0.22, 0.333, False),
    ("cxr-findings-demo", "154283005", "SCT", "Pulmonary tuberculosis", 0.03, 0.340, False),
    ("cxr-triage-demo", "263654008", "SCT", "Abnormal", 0.88, 0.464, False),
    ("cxr-tb-ensemble-demo", "154283005", "SCT", "Pulmonary tuberculosis", 0.02, 0.463, False),
    ("cxr-nodule-demo", "786838002", "SCT", "Pulmonary nodule", 0.18, 0.532, False),
)
# (kind, model, SOP Class UID) of the result objects the zoo writes for such a study.
ZOO_RESULTS = (
    ("sr", "cxr-pneumothorax-demo", "1.2.840.10008.5.1.4.1.1.88.34"),
    ("sr", "cxr-findings-demo", "1.2.840.10008.5.1.4.1.1.88.34"),
    ("sr", "cxr-triage-demo", "1.2.840.10008.5.1.4.1.1.88.34"),
    ("overlay", "cxr-pneumothorax-demo", "1.2.840.10008.5.1.4.1.1.7"),
    ("overlay", "cxr-findings-demo", "1.2.840.10008.5.1.4.1.1.7"),
    ("seg", "cxr-lung-seg-demo", "1.2.840.10008.5.1.4.1.1.66.4"),
    ("gsps", "cxr-nodule-demo", "1.2.840.10008.5.1.4.1.1.11.1"),
    ("derived", "cxr-bone-suppression-demo", "1.2.840.10008.5.1.4.1.1.1.1"),
    ("kos", "cxr-pneumothorax-demo", "1.2.840.10008.5.1.4.1.1.88.59"),
)


def add_zoo_study(
    session: Session,
    accession: str,
    folder: Path,
    *,
    minutes_ago: float = 5,
    now: datetime = NOW,
) -> tuple[str, dict[tuple[str, str], str]]:
    """An analysed CXR study with every zoo model's findings and result objects (files in
    ``folder``); returns its Study Instance UID and the SOP Instance UID per (kind, model)."""
    uid = add_study(session, accession, minutes_ago=minutes_ago, now=now)
    study = session.query(Study).filter_by(study_instance_uid=uid).one()
    study.analysis_status = "analysed"
    for model, code, scheme, meaning, probability, threshold, critical in ZOO_FINDINGS:
        session.add(
            FindingRow(
                study_id=study.id,
                model_name=model,
                model_version="1.0.0",
                code_value=code,
                code_scheme=scheme,
                code_meaning=meaning,
                probability=probability,
                threshold=threshold,
                critical=critical,
            )
        )
    objects = {}
    for kind, model, sop_class in ZOO_RESULTS:
        sop_uid = generate_uid()
        path = folder / f"{sop_uid}.dcm"
        path.write_bytes(b"\0" * 128 + b"DICM")
        session.add(
            ResultObject(
                study_id=study.id,
                kind=kind,
                model_name=model,
                model_version="1.0.0",
                sop_class_uid=sop_class,
                sop_instance_uid=sop_uid,
                series_instance_uid=generate_uid(),
                path=str(path),
                created_at=now,
            )
        )
        objects[(kind, model)] = sop_uid
    session.flush()
    session.refresh(study, ["findings"])
    reprioritise(session, study, now, WorklistSettings())
    session.commit()
    return uid, objects


def add_result_object(session: Session, study_id: int) -> int:
    """A result object row of the study (an SR, as a results job writes it; no file), committed:
    its id, for export jobs of an object that exists (one whose row is gone was superseded)."""
    uid = generate_uid()
    row = ResultObject(
        study_id=study_id,
        kind="sr",
        model_name="m",
        model_version="1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
        sop_instance_uid=uid,
        series_instance_uid=generate_uid(),
        path=f"/nonexistent/{uid}.dcm",
        created_at=datetime.now(UTC),
    )
    session.add(row)
    session.commit()
    return row.id


def add_export_job(
    session: Session,
    sop_instance_uid: str,
    destination: str,
    state: str,
    *,
    attempts: int = 0,
    last_error: str = "",
    now: datetime = NOW,
) -> None:
    """An export job of one result object to ``destination``, in ``state``."""
    result = session.query(ResultObject).filter_by(sop_instance_uid=sop_instance_uid).one()
    session.add(
        Job(
            kind="export",
            study_id=result.study_id,
            payload={"result_id": result.id, "destination": destination},
            state=state,
            attempts=attempts,
            run_after=now,
            last_error=last_error,
            created_at=now,
            finished_at=now if state in ("done", "dead") else None,
        )
    )
    session.commit()


def add_results_job(
    session: Session,
    study_instance_uid: str,
    state: str,
    *,
    not_written: list[dict] | None = None,
    last_error: str = "",
    now: datetime = NOW,
) -> None:
    """A results job of the study in ``state``; a done one naming the objects it left out
    (``not_written``: model, version, kind, error) as ``write_results`` records them."""
    payload: dict = {"generation": 1}
    if not_written:
        payload["not_written"] = not_written
        last_error = "not written: " + "; ".join(
            f"{entry['model']} {entry['kind']}: {entry['error']}" for entry in not_written
        )
    study = session.query(Study).filter_by(study_instance_uid=study_instance_uid).one()
    session.add(
        Job(
            kind="results",
            study_id=study.id,
            payload=payload,
            state=state,
            attempts=5 if state == "dead" else 1,
            run_after=now,
            last_error=last_error,
            created_at=now,
            finished_at=now if state in ("done", "dead") else None,
        )
    )
    session.commit()
