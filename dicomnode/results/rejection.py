"""IHE IOCM rejection notes: a Key Object Selection Document titled (113001, DCM, "Rejected
for Quality Reasons") that tells a destination which result objects it received from the
node were superseded by later versions (late images), so that an IOCM-aware PACS hides them
and a radiologist does not read a stale AI result.

A destination gets notes only where its ``[[destinations]] reject_superseded`` is true (a
PACS without IOCM support would show the note as one more key object), and only for the
superseded objects whose export to it is done or in flight. One note per model version,
study and set of rejected instances: its UID derives from them (:func:`rejection_note_uid`),
so a results job retried, or two destinations that received the same objects, give the same
note. Its export waits for the exports to the same destination of the objects that supersede
what it rejects (:func:`superseding`: the job's ``after`` payload, :mod:`dicomnode.export.jobs`),
not for the study's other exports: one the destination refuses for good (another SOP class) holds no
note. Once one of those is sent, or an admin retries it, the note is made due again
(:func:`hasten_notes`). Pure apart from the queries of the exports and the reading of the
rejected objects' headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import pydicom
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.config import Destination
from dicomnode.db.models import Job, ResultObject
from dicomnode.db.session import utcnow
from dicomnode.findings import Algorithm
from dicomnode.imageclasses import image_class
from dicomnode.results.kos import key_object_document
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.source import check_source
from dicomnode.results.uids import result_instance_uid
from dicomnode.results.versions import REJECTION_KIND, VERSIONED_KINDS

REJECTION_SERIES_NUMBER = 9907
# IHE RAD TF-3 IOCM, PS3.16 CID 7010 (its reasons CID 7011): the Image Manager hides the
# instances the note references.
REJECTED_FOR_QUALITY_REASONS = hd.sr.CodedConcept("113001", "DCM", "Rejected for Quality Reasons")
# What the job payload of a note's export names: the export jobs it waits for.
AFTER = "after"
# The patient and study attributes highdicom takes from the first instance of the evidence.
_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class Rejected:
    """A superseded result object as a note references it (its row, read before the row is
    deleted), with its kind and the UID it was first made with (what supersedes it:
    :func:`superseding`)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str
    kind: str = ""
    first_uid: str = ""

    @classmethod
    def of(cls, row: ResultObject) -> Rejected:
        return cls(
            row.sop_class_uid,
            row.sop_instance_uid,
            row.series_instance_uid,
            row.path,
            row.kind,
            row.first_sop_instance_uid,
        )


@dataclass
class PlannedNote:
    """One note to write: the model version whose objects it rejects, what it rejects, and
    the destinations it goes to."""

    model: tuple[str, str]
    rejected: list[Rejected]
    destinations: list[str]


def delivered(session: Session, study_id: int) -> dict[int, set[str]]:
    """The study's result objects (by row id) and the destinations their export reached or
    may be reaching now (export job done, or leased: an association in flight when the
    results job reads this, which could else leave the object at the destination unnamed by
    any note; naming one that then fails costs nothing, the destination has nothing to
    hide)."""
    payloads = session.scalars(
        select(Job.payload).where(
            Job.kind == "export", Job.study_id == study_id, Job.state.in_(("done", "leased"))
        )
    )
    sent: dict[int, set[str]] = {}
    for payload in payloads:
        if payload and "result_id" in payload and "destination" in payload:
            sent.setdefault(int(payload["result_id"]), set()).add(str(payload["destination"]))
    return sent


def plan_notes(
    superseded: Sequence[ResultObject],
    sent: dict[int, set[str]],
    destinations: Sequence[Destination],
) -> list[PlannedNote]:
    """The notes to send: for each destination that takes them (``reject_superseded``), the
    ``superseded`` rows whose export to it is done or in flight (``sent``: :func:`delivered`),
    one note per model version; destinations with the same rejected instances share a note."""
    rows = list({row.id: row for row in superseded}.values())
    notes: dict[tuple[tuple[str, str], tuple[str, ...]], PlannedNote] = {}
    for destination in destinations:
        if not destination.reject_superseded:
            continue
        by_model: dict[tuple[str, str], list[ResultObject]] = {}
        for row in rows:
            if destination.name in sent.get(row.id, ()):
                by_model.setdefault((row.model_name, row.model_version), []).append(row)
        for model, reached in by_model.items():
            reached.sort(key=lambda row: row.sop_instance_uid)
            key = (model, tuple(row.sop_instance_uid for row in reached))
            note = notes.setdefault(key, PlannedNote(model, [Rejected.of(r) for r in reached], []))
            note.destinations.append(destination.name)
    return list(notes.values())


def superseding(
    rejected: Sequence[Rejected], model: tuple[str, str], new: Iterable[ResultObject]
) -> list[ResultObject]:
    """Those of the ``new`` rows (the objects a results job wrote, not the unchanged ones it
    kept) that replace the ``rejected`` objects of ``model`` (name, version): of the same
    model version and kind, the new SR or KOS (a study has one of each per model version,
    new UIDs as images arrive), or the new revision of an object first made with the same
    UID (its content changed). A new object of another kind (the late image's overlay)
    replaces nothing: a note does not wait for it."""
    kinds = {item.kind for item in rejected}
    first_uids = {item.first_uid for item in rejected}
    return [
        row
        for row in new
        if (row.model_name, row.model_version) == model
        and row.kind in kinds
        and (row.kind in VERSIONED_KINDS or row.first_sop_instance_uid in first_uids)
    ]


def hasten_notes(session: Session, jobs: Sequence[Job], now: datetime | None = None) -> int:
    """Make due now the queued rejection notes (export jobs with an ``after`` payload) that
    wait for one of the export ``jobs`` (just sent, or queued again by an admin's retry) or
    for another export of the same object to the same destination (one that ``jobs`` cover),
    instead of at the end of their postponement; returns how many (the caller commits). A note
    whose other exports are still pending is put back again when it is claimed."""
    exports = [job for job in jobs if job.kind == "export" and job.payload]
    if not exports:
        return 0
    now = now or utcnow()
    targets = {
        (job.study_id, str(job.payload.get("result_id")), str(job.payload.get("destination")))
        for job in exports
    }
    waiting = [
        note
        for note in session.scalars(
            select(Job).where(
                Job.kind == "export",
                Job.state == "queued",
                Job.run_after > now,
                Job.study_id.in_(sorted({job.study_id for job in exports})),
            )
        )
        if (note.payload or {}).get(AFTER)
    ]
    if not waiting:
        return 0
    after_ids = sorted({int(job_id) for note in waiting for job_id in note.payload[AFTER]})
    awaited = {
        job_id: (study_id, str((payload or {}).get("result_id")))
        for job_id, study_id, payload in session.execute(
            select(Job.id, Job.study_id, Job.payload).where(Job.id.in_(after_ids))
        )
    }
    hastened = 0
    for note in waiting:
        destination = str(note.payload.get("destination"))
        if any(
            job_id in awaited and (*awaited[job_id], destination) in targets
            for job_id in map(int, note.payload[AFTER])
        ):
            note.run_after = now
            hastened += 1
    return hastened


def rejection_note_uid(rejected: Sequence[Rejected], algorithm: Algorithm) -> str:
    """The note's SOP Instance UID: the same rejected instances of the same model version
    give the same note."""
    return result_instance_uid([r.sop_instance_uid for r in rejected], algorithm, REJECTION_KIND)


def build_rejection_note(
    rejected: Sequence[Rejected], source: Dataset, algorithm: Algorithm
) -> Dataset:
    """An IOCM rejection note (KOS, 113001) referencing the ``rejected`` result objects of
    ``algorithm``, in the patient and study of ``source`` (an image of the study)."""
    if not rejected:
        raise ValueError("build_rejection_note needs at least one rejected instance")
    study = sanitised_reference(check_source(source, "source"))
    references = [_reference(item, study) for item in rejected]
    note = (
        f"{len(rejected)} AI result object(s) of {algorithm.name} {algorithm.version} "
        f"({algorithm.manufacturer}) superseded by a later AI result of the same model "
        "(images arrived after the first analysis); rejected, not to be read"
    )
    return key_object_document(
        REJECTED_FOR_QUALITY_REASONS,
        references,
        study,
        algorithm,
        note,
        kind=REJECTION_KIND,
        series_number=REJECTION_SERIES_NUMBER,
        sop_instance_uid=rejection_note_uid(rejected, algorithm),
        description="rejection note",
    )


def _reference(item: Rejected, study: Dataset) -> Dataset:
    """What highdicom needs of a rejected instance: its identity, the study's patient and
    study attributes (taken from the first), and for an image its Rows and Columns (which
    make it an IMAGE content item, else COMPOSITE): read from its file while it is there,
    else by its SOP Class."""
    ds = Dataset()
    for keyword in _PATIENT_STUDY:
        if keyword in study:
            ds[keyword] = study[keyword]
    if "SpecificCharacterSet" in study:
        ds.SpecificCharacterSet = study.SpecificCharacterSet
    ds.SOPClassUID = item.sop_class_uid
    ds.SOPInstanceUID = item.sop_instance_uid
    ds.SeriesInstanceUID = item.series_instance_uid
    try:
        header = pydicom.dcmread(item.path, stop_before_pixels=True)
        size = (header.get("Rows"), header.get("Columns"))
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        size = (1, 1) if image_class(item.sop_class_uid) else (None, None)
    if None not in size:
        ds.Rows, ds.Columns = size
    return ds
