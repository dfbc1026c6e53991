"""Analyse one assembled study: select models, infer, write results, re-prioritise.

The I/O shell around the pure steps (select, preprocess, postprocess, policy) and the
result builders. Results replace those of an earlier run of the same model version.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom import Dataset
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from dicomnode.config import Settings, WorklistSettings
from dicomnode.db.models import FindingRow, Instance, ResultObject, Series, Study
from dicomnode.db.session import utcnow
from dicomnode.findings import ImageFindings
from dicomnode.ingest.spool import instance_path, write_durable
from dicomnode.jobs import enqueue
from dicomnode.models.registry import ModelCard
from dicomnode.notify import becomes_critical, enqueue_notifications
from dicomnode.pipeline.postprocess import classification_findings
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.select import image_facts, select_models
from dicomnode.results.overlay import build_overlay
from dicomnode.results.sr import build_sr
from dicomnode.worklist.policy import DEFAULT_SETTINGS
from dicomnode.worklist.service import reprioritise

log = logging.getLogger("dicomnode.pipeline")

CLASSIFICATION_TASKS = ("classification", "multi-label")


@dataclass
class StageTimes:
    """Seconds spent per stage, for the job's log line and benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def __str__(self) -> str:
        return " ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.seconds.items())


def _load_images(session: Session, study: Study) -> list[Dataset]:
    paths = session.scalars(
        select(Instance.path)
        .join(Series)
        .where(Series.study_id == study.id)
        .order_by(Instance.series_id, Instance.instance_number, Instance.id)
    ).all()
    images = []
    for path in paths:
        ds = pydicom.dcmread(path)
        if "PixelData" in ds:
            images.append(ds)
    return images


def _infer_classification(
    card: ModelCard, images: list[Dataset], runtime: Runtime, times: StageTimes
) -> list[ImageFindings]:
    started = time.perf_counter()
    prepared = [prepare_input(ds, card.input) for ds in images]
    times.add("preprocess", started)
    started = time.perf_counter()
    outputs = runtime.run(card, np.stack([array for array, _ in prepared]))
    times.add("inference", started)
    started = time.perf_counter()
    evaluations = [
        ImageFindings(ds, classification_findings(card, outputs, index, geometry))
        for index, (ds, (_, geometry)) in enumerate(zip(images, prepared, strict=True))
    ]
    times.add("postprocess", started)
    return evaluations


def _store_result(
    session: Session, settings: Settings, study: Study, card: ModelCard, kind: str, ds: Dataset
) -> ResultObject:
    path = instance_path(
        settings.storage_path / "results",
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_durable(path, buffer.getvalue())
    row = session.scalars(
        select(ResultObject).where(ResultObject.sop_instance_uid == str(ds.SOPInstanceUID))
    ).one_or_none()
    if row is None:
        row = ResultObject(sop_instance_uid=str(ds.SOPInstanceUID), study_id=study.id)
        session.add(row)
    row.kind = kind
    row.model_name = card.model.name
    row.model_version = card.model.version
    row.sop_class_uid = str(ds.SOPClassUID)
    row.series_instance_uid = str(ds.SeriesInstanceUID)
    row.path = str(path)
    row.created_at = utcnow()
    session.flush()
    return row


def analyse_study(
    session: Session, settings: Settings, cards: list[ModelCard], runtime: Runtime, study_id: int
) -> StageTimes:
    """Run every selected model on the study and record findings, results and priority."""
    times = StageTimes()
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study id {study_id} no longer exists")
    study.analysis_status = "analysing"
    session.commit()

    started = time.perf_counter()
    images = _load_images(session, study)
    times.add("decode", started)
    by_model: dict[str, tuple[ModelCard, list[Dataset]]] = {}
    for ds in images:
        for card in select_models(cards, image_facts(ds)):
            by_model.setdefault(card.model.name, (card, []))[1].append(ds)

    results: list[ResultObject] = []
    for card, selected in by_model.values():
        if card.model.task not in CLASSIFICATION_TASKS:
            log.info("model %s: task %s not run by this node yet", card.model.name, card.model.task)
            continue
        evaluations = _infer_classification(card, selected, runtime, times)
        session.execute(
            delete(FindingRow).where(
                FindingRow.study_id == study.id, FindingRow.model_name == card.model.name
            )
        )
        for label in card.labels:
            best = max(
                (f for e in evaluations for f in e.findings if f.concept == label.concept),
                key=lambda f: f.probability,
            )
            session.add(
                FindingRow(
                    study_id=study.id,
                    model_name=card.model.name,
                    model_version=card.model.version,
                    code_value=label.code_value,
                    code_scheme=label.code_scheme,
                    code_meaning=label.code_meaning,
                    probability=best.probability,
                    threshold=best.threshold,
                    critical=best.critical,
                )
            )
        started = time.perf_counter()
        results.append(
            _store_result(
                session, settings, study, card, "sr", build_sr(evaluations, card.algorithm)
            )
        )
        for evaluation in evaluations:
            overlay = build_overlay(evaluation, card.algorithm)
            results.append(_store_result(session, settings, study, card, "overlay", overlay))
        times.add("results", started)

    for result in results:
        for destination in settings.destinations:
            enqueue(
                session,
                "export",
                study.id,
                {"result_id": result.id, "destination": destination.name},
            )
    study.analysis_status = "analysed"
    study.analysis_error = ""
    session.flush()
    session.refresh(study, ["findings"])
    tier_before = study.tier
    reprioritise(session, study, utcnow(), settings.worklist)
    if becomes_critical(tier_before, study.tier):
        enqueue_notifications(session, study, settings.notify)
    session.commit()
    return times


def mark_failed(
    session: Session,
    study_id: int,
    reason: str,
    worklist: WorklistSettings = DEFAULT_SETTINGS,
) -> None:
    """Record a failed analysis; the study keeps (never loses) its place in the worklist."""
    study = session.get(Study, study_id)
    if study is None:
        return
    study.analysis_status = "failed"
    study.analysis_error = reason[:2000]
    reprioritise(session, study, utcnow(), worklist)
    session.commit()
