"""The results job of an analysed study: the models left after its triage run, then each
writer's result objects written, filed and recorded, and their exports queued.

The ``analyse`` job (:func:`dicomnode.pipeline.analyse.analyse_study`) commits a study's
findings and priority and queues this job (:func:`write_results`), which the worker runs
after any analysis waiting in the queue. Objects are built by :mod:`dicomnode.results`'
writers (which ones: :func:`dicomnode.pipeline.outputs.result_objects`), written under
``<storage>/results`` and recorded as :class:`~dicomnode.db.models.ResultObject` rows.
Results replace those of an earlier run of the same model version.

A SOP Instance UID names one content (a PACS that holds a UID may keep what it has). An
object built again with the same UID (:mod:`dicomnode.results.uids`) from the same inputs
(:mod:`dicomnode.results.inputs`: the same instances, settings, models and release), or from
other inputs but with the same content apart from when it was made
(:func:`~dicomnode.results.versions.content_digest`), keeps its earlier file and row and is
exported only to destinations that have no export of it queued, running or done: a study
analysed again after late images does not send its unchanged objects twice, even where
inference is not bitwise repeatable, and a destination whose export was dead-lettered gets it
again. One whose content changed (a 2.5D model's slice whose neighbours arrived late) becomes
a new instance, its UID derived from the first one's and its content
(:func:`~dicomnode.results.versions.revision_uid`), which supersedes the earlier version; the
objects of the job that reference it (a KOS) name the new UID.
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
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode.config import Destination, Settings
from dicomnode.db.models import Instance, Job, ResultObject, Series, Study
from dicomnode.db.session import utcnow
from dicomnode.ingest.spool import instance_path, write_durable
from dicomnode.jobs.queue import Postponed, enqueue, lock_studies
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.analyse import Models, StageTimes, Triaged, load_images, triage_models
from dicomnode.pipeline.outputs import result_objects
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.select import rules_match
from dicomnode.results.agreement import (
    analyse_again,
    compare,
    replaced_cards,
    shown_findings,
)
from dicomnode.results.failures import ResultFailures
from dicomnode.results.inputs import (
    StudyInstance,
    inputs_digest,
    node_context,
    object_inputs,
    reads_across_slices,
    referenced_results,
)
from dicomnode.results.rejection import (
    AFTER,
    Rejected,
    build_rejection_note,
    delivered,
    plan_notes,
    superseding,
)
from dicomnode.results.sr import name_predecessors
from dicomnode.results.versions import (
    REJECTION_KIND,
    content_digest,
    earlier_versions,
    file_digest,
    new_version,
    rename_references,
    revision_uid,
    superseded_rows,
)

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
    session: Session,
    study_id: int,
    card: ModelCard,
    kind: str,
    ds: Dataset,
    path: Path,
    first_uid: str,
    inputs: str,
) -> ResultObject:
    """Add the row of a written result object (new, or a new version of an earlier one);
    ``first_uid``: the UID the object was first made with (``ds``'s own if it is new);
    ``inputs``: the digest of what it was made from (:mod:`dicomnode.results.inputs`)."""
    row = ResultObject(
        sop_instance_uid=str(ds.SOPInstanceUID),
        first_sop_instance_uid=first_uid,
        study_id=study_id,
        inputs_digest=inputs,
    )
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
    waiting to retry, or instances arrived since); checked when the job starts and again under
    the study's lock before its rows are recorded (its files removed then, those a newer job's
    rows name excepted). An object's inputs are the instances its models read (ids up to
    ``instances_up_to``), not those indexed since, and the result objects it references.

    The objects say what the worklist says (:mod:`dicomnode.results.agreement`): an analysis in
    memory made with cards a reload has replaced since is not used, and triage models run
    again that differ from the study's findings (another version, after an upgrade or a
    reload) write nothing: the study is analysed again, and that analysis's results job
    writes the objects."""
    times = StageTimes()
    study = session.get(Study, study_id)
    if study is None:
        times.note = "study no longer exists"
        return times
    try:
        newer = _newer_analysis(session, study_id, job_id)
    except Postponed:
        session.commit()
        raise
    # What the worklist shows, for triage models run again to agree with.
    shown = shown_findings(session, study_id)
    # End the read transaction before the models and the files: on SQLite every transaction
    # holds the write lock, which ingest and the analyses need meanwhile.
    session.commit()
    if newer is not None:
        times.note = newer
        return times
    failures = ResultFailures(job_id, study_id)
    if triaged is not None:
        configured = [*cards, *(card for card, _ in left_out)]
        replaced = replaced_cards(triaged, configured, runtime.onnx_identity)
        if replaced:
            log.info(
                "results job %d study_id=%d: the analysis kept in memory was made with model "
                "cards since replaced (%s); the triage models run again",
                job_id,
                study_id,
                ", ".join(replaced),
            )
            triaged = None
    disagreeing: dict[str, str] = {}
    # Images the analysis could not decode (this job's own count where it reads them again).
    unreadable = study.unreadable_image_count or 0
    if triaged is None:
        # Registered with the runtime only while models run, so that analyses running
        # meanwhile wait for this thread's inferences and not for its result writing.
        with runtime.caller():
            started = time.perf_counter()
            images, undecodable, _ = load_images(session, study, instances_up_to)
            unreadable = len(undecodable)
            triaged = triage_models(Models(cards, images), runtime, StageTimes())
            times.add("recompute", started)
        # The objects must say what the worklist says: models that differ from the study's
        # findings (another version after an upgrade or a reload) write none; the study is
        # analysed again, and that analysis's results job writes them.
        comparison = compare(shown, triaged.runs)
        for line in comparison.drifted:
            log.warning(
                "results job %d study_id=%d: the triage models run again give other "
                "probabilities than the study's findings, with the same calls: %s",
                job_id,
                study_id,
                line,
            )
        if comparison.disagreeing:
            note = analyse_again(session, study_id, job_id, comparison)
            if note is not None:
                times.note = note
                return times
            disagreeing = comparison.disagreeing
    with runtime.caller():
        failures.sources = triaged.models.images
        for card, _ in triaged.runs:
            if card.model.name in disagreeing:
                failures.disagrees(card, disagreeing[card.model.name])
        for card, reason in left_out:
            if card.model.standalone and any(
                rules_match(card.select, triaged.models.facts[id(ds)])
                for ds in triaged.models.images
            ):
                failures.left_out(card, reason)
        runs = [(card, run) for card, run in triaged.runs if card.model.name not in disagreeing]
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
    earlier = earlier_versions(session, study_id)
    # The model versions that ran and built every object they make: an earlier object of
    # theirs not built again is withdrawn. None while an image could not be decoded (this
    # host may lack a decoder that made an earlier object): its objects are not withdrawn.
    incomplete = {(item["model"], item["version"]) for item in failures.not_written}
    complete = {(c.model.name, c.model.version) for c, _ in runs} - incomplete
    if unreadable:
        complete = set()
    superseded = superseded_rows(earlier, built, complete)
    # Exactly the instances the models read: an instance indexed since (a slice whose
    # neighbours' objects were built without it) is not among what they were made from.
    instances = _study_instances(
        session,
        study_id,
        instances_up_to,
        {str(ds.SOPInstanceUID) for ds in triaged.models.images},
    )
    context = node_context(settings, cards, runtime.onnx_identity)
    # Which destinations the study's objects reached, for the rejection notes of those this
    # job supersedes (an export of one that completes from now on is not in its note).
    sent = delivered(session, study_id) if earlier else {}
    # End the read transaction before the files (on SQLite it holds the write lock).
    session.commit()
    # Files this job makes (each version of an object has a file of its own): removed if the
    # job fails before its rows commit (a full disk), else they stayed in storage/results
    # with no row; and the folders it made, once empty, else a failed write left empty study
    # and series folders.
    made: list[Path] = []
    made_folders: list[Path] = []
    try:
        written: list[tuple[ModelCard, str, Dataset, Path, str, str]] = []
        # (kind, earlier row, inputs digest, where its file was written again or None).
        kept: list[tuple[str, ResultObject, str, Path | None]] = []
        # First UID of an object -> the UID it has now (a new version's, or that of the
        # unchanged earlier one), for the references of the objects built after it (a KOS).
        current: dict[str, str] = {}
        for card, kind, ds in built:
            rename_references(ds, current)
            first_uid = str(ds.SOPInstanceUID)
            previous = earlier.get(first_uid)
            # The referenced result objects by the UIDs they have now (after the renaming
            # above): a KOS selecting an overlay that became a new version is made from
            # other inputs, and its content (naming the new UID) is compared.
            inputs = inputs_digest(
                context,
                card,
                kind,
                object_inputs(ds, instances, reads_across_slices(card)),
                instances,
                referenced_results(ds, instances),
            )
            if previous is not None and inputs and previous.inputs_digest == inputs:
                # Made from the same inputs as before: the earlier object stands (a re-run's
                # inference need not be bitwise the same; its bytes are not compared).
                current[first_uid] = previous.sop_instance_uid
                rewritten = None
                if not Path(previous.path).is_file():
                    # Its file is gone: written again under the UID it has, from the same
                    # inputs (the destinations that have it keep theirs), in the current
                    # storage (the row's path may be under an earlier storage root).
                    new_version(ds, previous.sop_instance_uid)
                    rewritten = _result_path(settings, ds)
                    existed = rewritten.exists()
                    made_folders.extend(_new_folders(rewritten, settings.storage_path / "results"))
                    _write_result(rewritten, ds)
                    if not existed:
                        made.append(rewritten)
                kept.append((kind, previous, inputs, rewritten))
                continue
            # Other inputs (or none known: a row from before migration 0008): only an object
            # made before is compared (a copy and a write of its data set, ~11 ms for 8 MB),
            # so the first results job of a study pays nothing for it. An earlier version whose
            # file is gone or unreadable cannot be compared and is superseded.
            digest = content_digest(ds) if previous is not None else ""
            if previous is not None and file_digest(previous.path) == digest:
                current[first_uid] = previous.sop_instance_uid
                kept.append((kind, previous, inputs, None))
                continue
            predecessors = [
                row
                for row in superseded
                if row.kind == kind == "sr"
                and (row.model_name, row.model_version) == (card.model.name, card.model.version)
            ]
            path = _result_path(settings, ds)
            if previous is not None:
                # Same UID, other content: a new instance, which supersedes the earlier one.
                new_version(ds, revision_uid(first_uid, digest))
                current[first_uid] = str(ds.SOPInstanceUID)
                # A file of its own, named as before migration 0006 (which moved the first UID
                # from this name to the row) so that a downgraded node still finds it; nothing
                # reads the name now.
                path = path.with_name(f"{first_uid}-{digest[:16]}.dcm")
                superseded.append(previous)
                predecessors.append(previous)
            if kind == "sr":
                name_predecessors(
                    ds,
                    [
                        (r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid)
                        for r in predecessors
                    ],
                )
            existed = path.exists()
            made_folders.extend(_new_folders(path, settings.storage_path / "results"))
            _write_result(path, ds)
            if not existed:
                made.append(path)
            written.append((card, kind, ds, path, first_uid, inputs))
        notes = _write_rejection_notes(
            settings, [card for card, _ in runs], superseded, sent, triaged.models.images, failures
        )
        for _, ds, path, _, _ in notes:
            existed = path.exists()
            made_folders.extend(_new_folders(path, settings.storage_path / "results"))
            _write_result(path, ds)
            if not existed:
                made.append(path)
        # The rows go in after every file is written: adding one starts the transaction, which
        # on SQLite holds the write lock (the index writer, other workers) until the commit.
        # On PostgreSQL the study's row is locked first, as an admin's retry of a dead export
        # locks it before it looks for another export of its object: one waits for the other.
        lock_studies(session, [study_id])
        # Checked again under the lock: a newer analysis may have queued (and its results job
        # committed) its own objects while this job ran its models and wrote its files. Its
        # rows would be replaced by older ones, or this job's fail on them.
        newer = _newer_analysis(session, study_id, job_id)
        if newer is not None:
            # The newer job's rows may name files of the same paths (an object of the same
            # UID): those stay, read under the lock, before it is released.
            made = _unowned(session, made)
            raise _Superseded(newer)
        results = [
            (kind, _store_result(session, study_id, card, kind, ds, path, first_uid, inputs))
            for card, kind, ds, path, first_uid, inputs in written
        ]
        for _, row, made_from, rewritten in kept:
            row.inputs_digest = made_from
            if rewritten is not None:
                row.path = str(rewritten)
        for row in superseded:
            session.delete(row)
        failures.record(session)
        times.add("results", started)
        # Read in the transaction that queues the exports, under the study's lock, not before
        # the files are written: an admin's retry of a dead export meanwhile (or another job's
        # export) is seen, and the object is not queued a second time.
        exported = _exported(session, study_id)
        queued: dict[str, list[Job]] = {}
        for kind, result in [*results, *((kind, row) for kind, row, _, _ in kept)]:
            for destination in settings.destinations:
                if _wanted(destination, kind) and (result.id, destination.name) not in exported:
                    queued.setdefault(destination.name, []).append(
                        enqueue(
                            session,
                            "export",
                            study_id,
                            {"result_id": result.id, "destination": destination.name},
                        )
                    )
        if notes:
            new_rows = [row for _, row in results]
            _queue_rejection_notes(session, study_id, earlier, notes, new_rows, queued, exported)
        session.commit()
    except BaseException as error:
        session.rollback()
        if not isinstance(error, _Superseded):
            made = _unowned_after_failure(session, made)
        for path in made:
            path.unlink(missing_ok=True)
        _remove_empty(made_folders)
        if isinstance(error, _Superseded):
            times.note = str(error)
            return times
        raise
    for row in superseded:
        Path(row.path).unlink(missing_ok=True)
    times.note = f"{len(results) + len(kept)} result objects"
    if kept:
        times.note += f" ({len(kept)} unchanged)"
    if superseded:
        times.note += f", {len(superseded)} earlier version(s) superseded"
    if notes:
        times.note += f", {len(notes)} rejection note(s)"
    if failures.not_written:
        times.note += f", not written: {failures.summary()}"
    return times


def _write_rejection_notes(
    settings: Settings,
    ran: list[ModelCard],
    superseded: list[ResultObject],
    sent: dict[int, set[str]],
    images: Sequence[Dataset],
    failures: ResultFailures,
) -> list[tuple[ModelCard, Dataset, Path, list[str], list[Rejected]]]:
    """Build the IOCM rejection notes of the ``superseded`` rows for the destinations that
    take them and received those objects (``sent``, :func:`~dicomnode.results.rejection.
    delivered`): (card, note, where its file goes, destinations, what it rejects). A note that
    cannot be built is named on the job, as any result object."""
    plans = plan_notes(superseded, sent, settings.destinations)
    if not plans or not images:
        return []
    # A superseded row is of a model version this job ran.
    cards = {(card.model.name, card.model.version): card for card in ran}
    notes = []
    for plan in plans:
        card = cards.get(plan.model)
        if card is None:
            continue
        try:
            note = build_rejection_note(plan.rejected, images[0], card.algorithm)
        except Exception as error:
            failures.add(card, REJECTION_KIND, error)
            continue
        notes.append((card, note, _result_path(settings, note), plan.destinations, plan.rejected))
    return notes


def _queue_rejection_notes(
    session: Session,
    study_id: int,
    earlier: dict[str, ResultObject],
    notes: list[tuple[ModelCard, Dataset, Path, list[str], list[Rejected]]],
    new_rows: list[ResultObject],
    queued: dict[str, list[Job]],
    exported: set[tuple[int, str]],
) -> None:
    """Record the rejection notes' rows and queue their exports, each after the export jobs
    this job ``queued`` for its destination of the objects that supersede what it rejects
    (:func:`~dicomnode.results.rejection.superseding`, among the ``new_rows`` this job wrote):
    the export waits for them (:mod:`dicomnode.export.jobs`), so that a PACS never hides the
    old objects before it has the new ones. Not for the job's other exports: an object of
    another kind the destination refuses for good (its SOP class) holds no note."""
    session.flush()  # the export jobs' ids
    for card, note, path, destinations, rejected in notes:
        replacing = {
            row.id for row in superseding(rejected, (card.model.name, card.model.version), new_rows)
        }
        uid = str(note.SOPInstanceUID)
        # The same note (same rejected instances) recorded before: its row stands.
        row = earlier.get(uid) or _store_result(
            session, study_id, card, REJECTION_KIND, note, path, uid, ""
        )
        for name in destinations:
            if (row.id, name) in exported:
                continue
            after = [
                job.id for job in queued.get(name, []) if job.payload["result_id"] in replacing
            ]
            enqueue(
                session,
                "export",
                study_id,
                {"result_id": row.id, "destination": name, AFTER: after},
            )


def _study_instances(
    session: Session, study_id: int, up_to: int | None, read: set[str]
) -> dict[str, StudyInstance]:
    """The study's stored instances that the job's models read, by SOP Instance UID, as result
    objects' inputs: ids up to ``up_to`` (those the analysis read; None: any) and SOP Instance
    UIDs in ``read`` (its images: not those without pixels, undecodable or the node's own)."""
    query = (
        select(
            Instance.sop_instance_uid,
            Series.series_instance_uid,
            Instance.size_bytes,
            Instance.path,
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id)
    )
    if up_to is not None:
        query = query.where(Instance.id <= up_to)
    # A stored copy is known by its size and its place in the storage's layout (study,
    # series, file), not its absolute path: a storage folder moved to another disk changes no
    # object's inputs.
    return {
        uid: StudyInstance(series_uid, f"{size}:{'/'.join(Path(path).parts[-3:])}")
        for uid, series_uid, size, path in session.execute(query)
        if uid in read
    }


def _unowned(session: Session, paths: list[Path]) -> list[Path]:
    """Those of ``paths`` (files this job made) that no committed result row names: another
    results job of the study may have written and recorded an object of the same UID, at the
    same path, since this one wrote it."""
    named: set[str] = set()
    names = [str(path) for path in paths]
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        named.update(session.scalars(select(ResultObject.path).where(ResultObject.path.in_(chunk))))
    return [path for path in paths if str(path) not in named]


def _unowned_after_failure(session: Session, paths: list[Path]) -> list[Path]:
    """:func:`_unowned` in a transaction of its own, after this job's was rolled back; none
    when the database cannot say (a file without a row is left, not another job's object)."""
    if not paths:
        return paths
    try:
        unowned = _unowned(session, paths)
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        return []
    return unowned


class _Superseded(Exception):
    """A newer analysis's results job was queued while this one ran: it writes nothing."""


def _newer_analysis(session: Session, study_id: int, job_id: int) -> str | None:
    """Why results job ``job_id`` must not write its objects now (in the caller's
    transaction): superseded by a newer analysis's results job (returned, the job ends with
    it as its note), or :class:`Postponed` while a newer analysis is pending (instances arrived
    since, or it is queued, running or waiting to retry). None: this job's analysis is the
    newest."""
    newer = session.scalar(
        select(func.min(Job.id)).where(
            Job.study_id == study_id, Job.kind == "results", Job.id > job_id
        )
    )
    if newer is not None:
        return f"superseded by results job {newer} of a newer analysis"
    # Read afresh (not a row the session holds from before the models ran).
    row = session.execute(
        select(Study.analysis_status, Study.queued_generation).where(Study.id == study_id)
    ).first()
    if row is None:
        return "study no longer exists"
    # Any state but these two means instances arrived since, or a newer analysis is queued,
    # running or waiting to retry.
    if row.analysis_status not in ("analysed", "failed"):
        raise Postponed(
            "a newer analysis of the study is pending (instances arrived since, or it is queued "
            f"or running; generation {row.queued_generation})"
        )
    return None


def _exported(session: Session, study_id: int) -> set[tuple[int, str]]:
    """(result id, destination) of the study's exports queued, running or done: those need no
    new export job. A dead-lettered one does (an object not delivered is sent again)."""
    payloads = session.scalars(
        select(Job.payload).where(
            Job.kind == "export",
            Job.study_id == study_id,
            Job.state.in_(("queued", "leased", "done")),
        )
    )
    return {
        (int(payload["result_id"]), str(payload["destination"]))
        for payload in payloads
        if payload and "result_id" in payload and "destination" in payload
    }
