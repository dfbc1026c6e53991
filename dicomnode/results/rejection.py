"""IHE IOCM rejection notes: a Key Object Selection Document titled (113001, DCM, "Rejected
for Quality Reasons") that tells a destination which result objects it received from the
node were superseded by later versions (late images), so that an IOCM-aware PACS hides them
and a radiologist does not read a stale AI result.

A destination gets notes only where its ``[[destinations]] reject_superseded`` is true (a
PACS without IOCM support would show the note as one more key object), and only for the
superseded objects whose export to it is done. One note per model version, study and set of
rejected instances: its UID derives from them (:func:`rejection_note_uid`), so a results job
retried, or two destinations that received the same objects, give the same note. Its export
waits for the superseding objects' exports to the same destination (the job's ``after``
payload, :mod:`dicomnode.export.jobs`). Pure apart from the query of the exports done and the
reading of the rejected objects' headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.config import Destination
from dicomnode.db.models import Job, ResultObject
from dicomnode.findings import Algorithm
from dicomnode.imageclasses import image_class
from dicomnode.results.kos import key_object_document
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.source import check_source
from dicomnode.results.uids import result_instance_uid

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
    deleted)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str

    @classmethod
    def of(cls, row: ResultObject) -> Rejected:
        return cls(row.sop_class_uid, row.sop_instance_uid, row.series_instance_uid, row.path)


@dataclass
class PlannedNote:
    """One note to write: the model version whose objects it rejects, what it rejects, and
    the destinations it goes to."""

    model: tuple[str, str]
    rejected: list[Rejected]
    destinations: list[str]


def delivered(session: Session, study_id: int) -> dict[int, set[str]]:
    """The study's result objects (by row id) and the destinations their export reached
    (export job done)."""
    payloads = session.scalars(
        select(Job.payload).where(
            Job.kind == "export", Job.study_id == study_id, Job.state == "done"
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
    ``superseded`` rows whose export to it is done (``sent``: :func:`delivered`), one note per
    model version; destinations with the same rejected instances share a note."""
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


def rejection_note_uid(rejected: Sequence[Rejected], algorithm: Algorithm) -> str:
    """The note's SOP Instance UID: the same rejected instances of the same model version
    give the same note."""
    return result_instance_uid([r.sop_instance_uid for r in rejected], algorithm, "rejection")


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
        kind="rejection",
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
