"""Analyse one assembled study: select models, infer, re-prioritise, then write results.

The I/O shell around the pure steps (select, preprocess, postprocess, policy) and the
result builders, in two jobs: ``analyse`` (:func:`analyse_study`) commits the findings and
the worklist priority and queues ``results`` (:func:`write_results`), which runs the other
models and writes the result objects after any analysis waiting in the queue. Results
replace those of an earlier run of the same model version.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode import made_by_this_node, metrics
from dicomnode.config import Destination, Settings, WorklistSettings
from dicomnode.db.models import FindingRow, Instance, Job, ResultObject, Series, Study
from dicomnode.db.session import utcnow
from dicomnode.findings import ModelRun
from dicomnode.ingest.spool import instance_path, write_durable
from dicomnode.jobs.queue import Postponed, enqueue
from dicomnode.logs import patient_values, without_patient_data
from dicomnode.models.registry import ModelCard
from dicomnode.notify import becomes_critical, enqueue_notifications
from dicomnode.pipeline.decode import DecodeError, first_frame
from dicomnode.pipeline.handover import Handover, array_bytes
from dicomnode.pipeline.outputs import result_objects
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.select import (
    image_facts,
    routed_view,
    rules_match,
    select_models,
    with_view,
)
from dicomnode.pipeline.sessions import ModelLoadError
from dicomnode.pipeline.tasks import Presentations, run_model
from dicomnode.results.sr import name_predecessors
from dicomnode.worklist.policy import DEFAULT_SETTINGS
from dicomnode.worklist.service import reprioritise

log = logging.getLogger("dicomnode.pipeline")

# Tasks whose labels become worklist findings (probabilities). Segmentation and image-to-image
# results are objects only; a landmark (e.g. where a tube's tip is) is a position to check, not
# a finding that should move a study up the worklist, so it is reported in the SR/GSPS only.
FINDING_TASKS = ("classification", "multi-label", "ensemble", "detection")


@dataclass
class StageTimes:
    """Seconds spent per stage, for the job's log line and benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)
    # What the job did besides its stages, for its log line (e.g. "14 result objects").
    note: str = ""

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def __str__(self) -> str:
        stages = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.seconds.items())
        return f"{stages} {self.note}".strip()


def _load_images(
    session: Session, study: Study, up_to: int | None = None
) -> tuple[list[Dataset], list[str], int]:
    """The study's images, decoded (pydicom keeps the pixels for every model and writer), the
    reasons for the images that cannot be decoded (those are left out), and the highest
    instance id read. ``up_to``: only the instances with ids up to it (those an earlier
    analysis read; instances indexed since have higher ids)."""
    query = select(Instance.id, Instance.path).join(Series).where(Series.study_id == study.id)
    if up_to is not None:
        query = query.where(Instance.id <= up_to)
    rows = session.execute(
        query.order_by(Instance.series_id, Instance.instance_number, Instance.id)
    ).all()
    highest = max((row.id for row in rows), default=0)
    paths = [row.path for row in rows]
    # End the read transaction before decoding and the models: on SQLite every transaction
    # holds the write lock, which ingest needs for its rows meanwhile.
    session.commit()
    images, undecodable = [], []
    for path in paths:
        ds = pydicom.dcmread(path)
        # No pixels to analyse, or the node's own result routed back by a PACS (never
        # selected: not decoded either).
        if "PixelData" not in ds or made_by_this_node(ds.get("Manufacturer")):
            continue
        try:
            first_frame(ds)
        except DecodeError as error:
            log.warning("study_id=%d: image left out: %s", study.id, error)
            undecodable.append(str(error))
            continue
        images.append(ds)
    return images, undecodable, highest


def _result_path(settings: Settings, ds: Dataset) -> Path:
    """Where a result object's file lives: <storage>/results/<study>/<series>/<sop>.dcm."""
    return instance_path(
        settings.storage_path / "results",
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    )


def _new_folders(path: Path, root: Path) -> list[Path]:
    """The folders under ``root`` that writing ``path`` creates (none exists yet)."""
    missing = []
    folder = path.parent
    while folder != root and folder.is_relative_to(root) and not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove those of ``folders`` that are empty, deepest first (a series folder before its
    study's); a folder another job has written into meanwhile stays as it is."""
    for folder in sorted(folders, key=lambda folder: len(folder.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _write_result(path: Path, ds: Dataset) -> Path:
    """Write a result object durably at ``path`` (``_result_path``; no database work)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_durable(path, buffer.getvalue())
    return path


def _store_result(
    session: Session, study_id: int, card: ModelCard, kind: str, ds: Dataset, path: Path
) -> ResultObject:
    """Add (or replace: same UIDs on a re-run) the row of a written result object."""
    row = session.scalars(
        select(ResultObject).where(ResultObject.sop_instance_uid == str(ds.SOPInstanceUID))
    ).one_or_none()
    if row is None:
        row = ResultObject(sop_instance_uid=str(ds.SOPInstanceUID), study_id=study_id)
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


class _Models:
    """Which models run on which of a study's images, sharing presentations and members."""

    def __init__(self, cards: list[ModelCard], images: list[Dataset]):
        self.cards = cards
        self.images = images
        self.members = {card.model.name: card for card in cards}
        self.presentations = Presentations()
        self.facts = {id(ds): image_facts(ds) for ds in images}

    def run(
        self, card: ModelCard, images: list[Dataset], runtime: Runtime, times: StageTimes
    ) -> ModelRun:
        # Heat maps are resampled when the result objects are built, after the triage commit.
        return run_model(
            card, images, runtime, times, self.members, self.presentations, defer_heatmaps=True
        )

    def route(self, runtime: Runtime, times: StageTimes) -> list[tuple[ModelCard, ModelRun]]:
        """Run the view routers; their view replaces the header's for selection."""
        runs = []
        for router in (c for c in self.cards if c.model.standalone and c.model.sets == "view"):
            selected = [ds for ds in self.images if rules_match(router.select, self.facts[id(ds)])]
            if not selected:
                continue
            run = self.run(router, selected, runtime, times)
            for evaluation in run.images:
                view = routed_view(router, evaluation.findings)
                before = self.facts[id(evaluation.source)].view
                if view is not None:
                    self.facts[id(evaluation.source)] = with_view(
                        self.facts[id(evaluation.source)], view
                    )
                    if before and before != view:
                        log.info(
                            "router %s: view %s (header says %s)", router.model.name, view, before
                        )
            runs.append((router, run))
        return runs

    def selected(self) -> list[tuple[ModelCard, list[Dataset]]]:
        """Every standalone model with the images its rules admit (after routing)."""
        by_model: dict[str, tuple[ModelCard, list[Dataset]]] = {}
        for ds in self.images:
            for card in select_models(self.cards, self.facts[id(ds)]):
                if card.model.standalone and not card.model.sets:
                    by_model.setdefault(card.model.name, (card, []))[1].append(ds)
        return list(by_model.values())


def _record_findings(session: Session, study: Study, card: ModelCard, run: ModelRun) -> None:
    """One worklist finding row per label: the label's highest probability on the study."""
    session.execute(
        delete(FindingRow).where(
            FindingRow.study_id == study.id, FindingRow.model_name == card.model.name
        )
    )
    if card.model.sets or card.model.task not in FINDING_TASKS:
        return
    for label in card.labels:
        best = max(
            (f.probability for e in run.images for f in e.findings if f.concept == label.concept),
            default=0.0,
        )
        session.add(
            FindingRow(
                study_id=study.id,
                model_name=card.model.name,
                model_version=card.model.version,
                code_value=label.code_value,
                code_scheme=label.code_scheme,
                code_meaning=label.code_meaning,
                probability=best,
                threshold=label.threshold,
                critical=label.critical,
            )
        )


def _wanted(destination: Destination, kind: str) -> bool:
    return not destination.outputs or kind in destination.outputs


@dataclass
class Triaged:
    """What an analysis leaves for its results job: the study's decoded images (with their
    shared presentations), the runs of the models that set the priority (heat maps not yet
    resampled) and the models still to run on which images."""

    models: _Models
    runs: list[tuple[ModelCard, ModelRun]]
    later: list[tuple[ModelCard, list[Dataset]]]

    def nbytes(self) -> int:
        """Estimated memory held (decoded and presentation pixels, model outputs)."""
        seen: set[int] = set()
        return (
            array_bytes(self.models.images, seen)
            + array_bytes([run for _, run in self.runs], seen)
            + self.models.presentations.nbytes
        )


def _triage_models(models: _Models, runtime: Runtime, times: StageTimes) -> Triaged:
    """Run the view routers and the models whose findings set the priority; the others are
    left for the results job."""
    runs = models.route(runtime, times)
    later = []
    for card, selected in models.selected():
        if card.model.task in FINDING_TASKS:
            runs.append((card, models.run(card, selected, runtime, times)))
        else:
            later.append((card, selected))
    return Triaged(models, runs, later)


def analyse_study(
    session: Session,
    settings: Settings,
    cards: list[ModelCard],
    runtime: Runtime,
    study_id: int,
    handover: Handover | None = None,
) -> StageTimes:
    """Run the models that set the study's priority, record findings and priority, and queue
    (in the same transaction) a ``results`` job for the other models and the result objects
    (:func:`write_results`). ``handover``: where the analysis is kept for that job (same
    process). ``times.seconds["triaged"]``: seconds from the start to the committed priority."""
    begun = time.perf_counter()
    times = StageTimes()
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study id {study_id} no longer exists")
    study.analysis_status = "analysing"
    session.commit()

    started = time.perf_counter()
    images, undecodable, read_up_to = _load_images(session, study)
    times.add("decode", started)
    if undecodable and not images:
        # A file that cannot be decoded stays so: fail the study now instead of retrying.
        mark_failed(session, study.id, "; ".join(undecodable), settings.worklist)
        return times

    # Triage first: the models whose findings set the priority, then the priority is committed
    # (the radiologist's worklist moves now); segmentation, image-to-image and landmark models
    # and every result object are the results job's, which the worker runs after any waiting
    # analysis.
    triaged = _triage_models(_Models(cards, images), runtime, times)
    for card, run in triaged.runs:
        _record_findings(session, study, card, run)
    study.analysis_status = "analysed"
    # Images left out are named (the study is analysed on the others).
    study.analysis_error = "; ".join(undecodable)[:2000]
    session.flush()
    session.refresh(study, ["findings"])
    tier_before = study.tier
    reprioritise(session, study, utcnow(), settings.worklist)
    if becomes_critical(tier_before, study.tier):
        enqueue_notifications(session, study, settings.notify)
    job = None
    if triaged.runs or triaged.later:
        # Queued with the priority: if the worker dies after this commit, the results are
        # still written (by whichever worker claims the job), from the instances read here
        # (a recomputation leaves out any indexed since).
        job = enqueue(session, "results", study.id, {"instances_up_to": read_up_to})
        session.flush()
        if handover is not None:
            handover.put(job.id, triaged, triaged.nbytes(), _still_queued(session))
    try:
        session.commit()
    except BaseException:
        if handover is not None and job is not None:
            handover.discard(job.id)
        raise
    times.seconds["triaged"] = time.perf_counter() - begun
    return times


def _still_queued(session: Session) -> Callable[[Iterable[int]], set[int]]:
    """Which of some results jobs still wait in the queue (the others' analyses are stale)."""

    def still_queued(job_ids: Iterable[int]) -> set[int]:
        return set(
            session.scalars(select(Job.id).where(Job.id.in_(list(job_ids)), Job.state == "queued"))
        )

    return still_queued


def write_results(
    session: Session,
    settings: Settings,
    cards: list[ModelCard],
    runtime: Runtime,
    study_id: int,
    job_id: int,
    triaged: Triaged | None = None,
    instances_up_to: int | None = None,
    left_out: Sequence[tuple[ModelCard, str]] = (),
) -> StageTimes:
    """The results job ``job_id`` of an analysed study: run the models left after its triage,
    write every result object and queue its exports. ``triaged``: the analysis handed over in
    memory; without it the images it read (ids up to ``instances_up_to``) are loaded and the
    triage models run again (stage ``recompute``). ``left_out``: the worker's cards that cannot
    be loaded, with why; one whose rules admit an image of the study is named on the job as
    not run (``not_written``), so that the worklist row says the AI results are incomplete
    instead of the study reading as if that model had looked and found nothing.

    A study analysed again writes only the newest analysis's objects, and a study whose newer
    analysis failed keeps the objects of the findings it shows: nothing is written if the
    study is gone or a newer analysis has queued its own results job, and the job is
    :class:`~dicomnode.jobs.queue.Postponed` while a newer analysis is pending (queued, running,
    waiting to retry, or instances arrived since)."""
    times = StageTimes()
    study = session.get(Study, study_id)
    if study is None:
        times.note = "study no longer exists"
        return times
    newer = session.scalar(
        select(func.min(Job.id)).where(
            Job.study_id == study_id, Job.kind == "results", Job.id > job_id
        )
    )
    # Any state but these two means instances arrived since, or a newer analysis is queued,
    # running or waiting to retry.
    pending = study.analysis_status not in ("analysed", "failed")
    queued_generation = study.queued_generation
    # End the read transaction before the models and the files: on SQLite every transaction
    # holds the write lock, which ingest and the analyses need meanwhile.
    session.commit()
    if newer is not None:
        times.note = f"superseded by results job {newer} of a newer analysis"
        return times
    if pending:
        raise Postponed(
            "a newer analysis of the study is pending (instances arrived since, or it is queued "
            f"or running; generation {queued_generation})"
        )
    failures = _ResultFailures(job_id, study_id)
    # Registered with the runtime only while models run, so that analyses running meanwhile
    # wait for this thread's inferences and not for its result writing.
    with runtime.caller():
        if triaged is None:
            started = time.perf_counter()
            images, _, _ = _load_images(session, study, instances_up_to)
            triaged = _triage_models(_Models(cards, images), runtime, StageTimes())
            times.add("recompute", started)
        failures.sources = triaged.models.images
        for card, reason in left_out:
            if card.model.standalone and any(
                rules_match(card.select, triaged.models.facts[id(ds)])
                for ds in triaged.models.images
            ):
                failures.left_out(card, reason)
        runs = list(triaged.runs)
        for card, selected in triaged.later:
            # One model failing on these images (e.g. one it cannot take) leaves the others'.
            try:
                runs.append((card, triaged.models.run(card, selected, runtime, times)))
            except Exception as error:
                failures.add(card, "run", error)
    # Result files are built and written outside any transaction; their rows and export jobs
    # then go in one short one. Each object is built on its own: one builder raising leaves
    # out that object only.
    started = time.perf_counter()
    built = []
    for card, run in runs:
        try:
            objects = result_objects(run, card, partial(failures.add, card))
        except Exception as error:
            failures.add(card, "all", error)
            continue
        built.extend((card, kind, ds) for kind, ds in objects)
    superseded = _superseded(session, study_id, built)
    # Files this job makes (not those it replaces: a re-run's objects keep their UIDs, and
    # the earlier run's rows name them): removed if the job fails before its rows commit
    # (a full disk), else they stayed in storage/results with no row; and the folders it
    # made, once empty, else a failed write left empty study and series folders.
    made: list[Path] = []
    made_folders: list[Path] = []
    try:
        written = []
        for card, kind, ds in built:
            path = _result_path(settings, ds)
            existed = path.exists()
            made_folders.extend(_new_folders(path, settings.storage_path / "results"))
            _write_result(path, ds)
            if not existed:
                made.append(path)
            written.append((card, kind, ds, path))
        results = [
            (kind, _store_result(session, study_id, card, kind, ds, path))
            for card, kind, ds, path in written
        ]
        for row in superseded:
            session.delete(row)
        failures.record(session)
        times.add("results", started)
        for kind, result in results:
            for destination in settings.destinations:
                if _wanted(destination, kind):
                    enqueue(
                        session,
                        "export",
                        study_id,
                        {"result_id": result.id, "destination": destination.name},
                    )
        session.commit()
    except BaseException:
        session.rollback()
        for path in made:
            path.unlink(missing_ok=True)
        _remove_empty(made_folders)
        raise
    for row in superseded:
        Path(row.path).unlink(missing_ok=True)
    times.note = f"{len(results)} result objects"
    if superseded:
        times.note += f", {len(superseded)} earlier version(s) superseded"
    if failures.not_written:
        times.note += f", not written: {failures.summary()}"
    return times


# Errors that mean the job cannot run now (database, disk or memory), not that one model or
# builder cannot handle the study: they fail the whole results job, which is retried. A
# model whose file cannot be loaded is the worker's to leave out of every study (it runs the
# job again at once without it, and names it on the job), not one study's failure.
JOB_ERRORS = (OSError, MemoryError, SQLAlchemyError, ModelLoadError)

_FAILED = {
    "run": "its run failed, none of its result objects is written",
    "all": "its result objects could not be prepared, none is written",
}


class _ResultFailures:
    """The models and result objects of a results job that raised: each is logged at ERROR
    (no patient data), counted, and named on the job (``last_error``, and ``not_written`` in
    its payload) while the job ends done with the others' objects. Errors of
    :data:`JOB_ERRORS` are raised again."""

    def __init__(self, job_id: int, study_id: int):
        self.job_id = job_id
        self.study_id = study_id
        self.sources: list[Dataset] = []
        self.not_written: list[dict[str, str]] = []

    def add(self, card: ModelCard, kind: str, error: Exception) -> None:
        if isinstance(error, JOB_ERRORS):
            raise error
        reason = _without_patient_data(f"{type(error).__name__}: {error}", self.sources)
        metrics.RESULT_OBJECTS_FAILED.labels(card.model.name, kind).inc()
        log.error(
            "results job %d study_id=%d: model %s %s: %s; the study's other result objects are "
            "written: %s",
            self.job_id,
            self.study_id,
            card.model.name,
            card.model.version,
            _FAILED.get(kind, f"a {kind} result object could not be built and is not written"),
            reason,
        )
        # The traceback only when debugging (the error's own text may quote patient data).
        log.debug("results job %d: traceback of the error above", self.job_id, exc_info=error)
        self.not_written.append(
            {"model": card.model.name, "version": card.model.version, "kind": kind, "error": reason}
        )

    def left_out(self, card: ModelCard, reason: str) -> None:
        """Name a model the worker left out (its file cannot be loaded; one ERROR said so when
        it was left out) that would have run on the study: not run, none of its objects."""
        self.not_written.append(
            {
                "model": card.model.name,
                "version": card.model.version,
                "kind": "run",
                "error": f"not run: the model cannot be loaded ({reason})"[:1000],
            }
        )

    def summary(self) -> str:
        """'model kind, ...' of what was not written."""
        return ", ".join(f"{entry['model']} {entry['kind']}" for entry in self.not_written)

    def record(self, session: Session) -> None:
        """Name what was not written on the results job (in the caller's transaction)."""
        job = session.get(Job, self.job_id)
        if job is None:
            return
        payload = {k: v for k, v in (job.payload or {}).items() if k != "not_written"}
        if self.not_written:
            payload["not_written"] = self.not_written
            listed = "; ".join(
                f"{entry['model']} {entry['kind']}: {entry['error']}" for entry in self.not_written
            )
            job.last_error = f"not written: {listed}"[:2000]
        job.payload = payload


def _without_patient_data(text: str, sources: list[Dataset]) -> str:
    """``text`` without the patient's name, IDs, accession number and birth date as the
    study's images give them (``logs.without_patient_data``)."""
    values: set[str] = set()
    for ds in sources:
        identifiers = []
        for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber"):
            value = ds.get(keyword)
            identifiers += value if isinstance(value, (list, MultiValue)) else [value]
        values |= patient_values(
            str(ds.get("PatientName", "") or ""),
            identifiers,
            str(ds.get("PatientBirthDate", "") or ""),
        )
    return without_patient_data(text, values)


# Study-level results whose instance names one content (the images reported on or selected):
# a re-run with late images makes a new instance, which supersedes the earlier one.
VERSIONED_KINDS = ("sr", "kos")


def _superseded(
    session: Session, study_id: int, built: list[tuple[ModelCard, str, Dataset]]
) -> list[ResultObject]:
    """The rows of the study's earlier SRs and KOS that ``built`` replaces under new UIDs
    (same model version and kind); each new SR names those it replaces as its predecessors.
    Ends the read transaction."""
    rows = []
    for card, kind, ds in built:
        if kind not in VERSIONED_KINDS:
            continue
        earlier = list(
            session.scalars(
                select(ResultObject).where(
                    ResultObject.study_id == study_id,
                    ResultObject.kind == kind,
                    ResultObject.model_name == card.model.name,
                    ResultObject.model_version == card.model.version,
                    ResultObject.sop_instance_uid != str(ds.SOPInstanceUID),
                )
            )
        )
        if kind == "sr":
            name_predecessors(
                ds,
                [(r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid) for r in earlier],
            )
        rows.extend(earlier)
    session.commit()
    return rows


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
