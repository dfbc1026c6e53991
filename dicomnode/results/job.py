"""The results job of an analysed study: the models left after its triage run, then each
writer's result objects written, filed and recorded, and their exports queued.

The ``analyse`` job (:func:`dicomnode.pipeline.analyse.analyse_study`) commits a study's
findings and priority and queues this job (:func:`write_results`), which the worker runs
after any analysis waiting in the queue. Objects are built by :mod:`dicomnode.results`'
writers (which ones: :func:`dicomnode.pipeline.outputs.result_objects`), written under
``<storage>/results`` and recorded as :class:`~dicomnode.db.models.ResultObject` rows.
Results replace those of an earlier run of the same model version.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

from pydicom import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode import metrics
from dicomnode.config import Destination, Settings
from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.db.session import utcnow
from dicomnode.ingest.spool import instance_path, write_durable
from dicomnode.jobs.queue import Postponed, enqueue
from dicomnode.logs import patient_values, without_patient_data
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.analyse import Models, StageTimes, Triaged, load_images, triage_models
from dicomnode.pipeline.outputs import result_objects
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.select import rules_match
from dicomnode.pipeline.sessions import ModelLoadError
from dicomnode.results.sr import name_predecessors
from dicomnode.worklist.policy import NOT_RUN

# The pipeline's logger, as before this job had its own module: its log lines are unchanged.
log = logging.getLogger("dicomnode.pipeline")


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


def _wanted(destination: Destination, kind: str) -> bool:
    return not destination.outputs or kind in destination.outputs


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
            images, _, _ = load_images(session, study, instances_up_to)
            triaged = triage_models(Models(cards, images), runtime, StageTimes())
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
                "error": f"{NOT_RUN}: the model cannot be loaded ({reason})"[:1000],
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
