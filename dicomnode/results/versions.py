"""Versions of a result object: what it says (:func:`content_digest`), the UID of a later
version whose content changed (:func:`revision_uid`), and which earlier rows of a study a
results job finds again or supersedes.

A SOP Instance UID names one content. A study's SR and KOS (:data:`VERSIONED_KINDS`) are new
instances whenever they cover other images; another object built again under its UID with
other content gets a UID of its own from its first UID and its content. Pure apart from the
database queries and the reading of an earlier version's file.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Collection

import pydicom
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.models import ResultObject
from dicomnode.models.registry import ModelCard
from dicomnode.results.uids import result_uid

# Study-level results whose instance names one content (the images reported on or selected):
# a re-run with late images makes a new instance, which supersedes the earlier one.
VERSIONED_KINDS = ("sr", "kos")
# An IOCM rejection note (results/rejection.py): it names superseded objects, and stands.
REJECTION_KIND = "rejection"

# What differs each time an object is built, not what it says: left out of the comparison
# of an object built again with its earlier version. When it was made (ContributionDateTime is
# nested, in Contributing Equipment); the Dimension Organization UID, which highdicom draws at
# random for each SEG and which only ties the SEG's dimension index to its organisation; the
# Predecessor Documents, which name the versions before, not the report's content.
_VOLATILE = frozenset(
    {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "PresentationCreationDate",
        "PresentationCreationTime",
        "DateOfSecondaryCapture",
        "TimeOfSecondaryCapture",
        "ContributionDateTime",
        "DimensionOrganizationUID",
        "PredecessorDocumentsSequence",
    }
)


def content_digest(ds: Dataset) -> str:
    """SHA-256 (hex) of what a result object says: its dataset without its own SOP Instance
    UID and without what differs each time it is built (:data:`_VOLATILE`, also in
    sequences). Two versions of an object with the same digest carry the same content."""
    content = copy.deepcopy(ds)
    content.file_meta = Dataset()
    if "SOPInstanceUID" in content:
        del content.SOPInstanceUID

    def without_volatile(dataset: Dataset) -> None:
        for element in list(dataset):
            if element.keyword in _VOLATILE:
                del dataset[element.tag]
            elif element.VR == "SQ":
                for item in element.value:
                    without_volatile(item)

    without_volatile(content)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, content)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def file_digest(path: str) -> str | None:
    """:func:`content_digest` of a result file; None if it is gone or cannot be read."""
    try:
        return content_digest(pydicom.dcmread(path))
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        return None


def revision_uid(first_uid: str, digest: str) -> str:
    """The SOP Instance UID of an object first made as ``first_uid`` whose content (of
    :func:`content_digest` ``digest``) changed: the same content gives the same UID again."""
    return result_uid("revision", first_uid, digest)


def new_version(ds: Dataset, sop_instance_uid: str) -> None:
    ds.SOPInstanceUID = sop_instance_uid
    if "MediaStorageSOPInstanceUID" in getattr(ds, "file_meta", Dataset()):
        ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid


def rename_references(ds: Dataset, current: dict[str, str]) -> None:
    """Point ``ds``'s references to objects of the job that got a new UID at that UID."""
    if not any(first != now for first, now in current.items()):
        return
    for element in ds.iterall():
        if element.keyword == "ReferencedSOPInstanceUID" and str(element.value) in current:
            element.value = current[str(element.value)]


def earlier_versions(session: Session, study_id: int) -> dict[str, ResultObject]:
    """The study's result rows by the UID each object was first made with (its row's
    ``first_sop_instance_uid``; nothing is read from a file's name or place)."""
    rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id))
    return {row.first_sop_instance_uid: row for row in rows}


def superseded_rows(
    earlier: dict[str, ResultObject],
    built: list[tuple[ModelCard, str, Dataset]],
    complete: Collection[tuple[str, str]] = (),
) -> list[ResultObject]:
    """The rows of the study's earlier SRs and KOS that ``built`` replaces under new UIDs
    (same model version and kind, first made with another UID); and, of the model versions
    in ``complete`` (name, version: each ran on the study and every object it makes was
    built), every earlier object not built again, which they withdraw: a KOS of a critical
    finding no longer there, the objects of an image no longer analysed (a lossy copy whose
    original came later). A rejection note is never superseded."""
    rows: dict[int, ResultObject] = {}
    for card, kind, ds in built:
        if kind not in VERSIONED_KINDS:
            continue
        for first_uid, row in earlier.items():
            if (
                row.kind == kind
                and row.model_name == card.model.name
                and row.model_version == card.model.version
                and first_uid != str(ds.SOPInstanceUID)
            ):
                rows[row.id] = row
    rebuilt = {str(ds.SOPInstanceUID) for _, _, ds in built}
    for first_uid, row in earlier.items():
        if (
            row.kind != REJECTION_KIND
            and (row.model_name, row.model_version) in complete
            and first_uid not in rebuilt
        ):
            rows[row.id] = row
    return list(rows.values())
