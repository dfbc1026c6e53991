"""What every result copies from, or says about, its source images: identity and references.

The writers pass these their source as ``reference.sanitised_reference`` returns it: invalid
values emptied or left out, so that what is copied is valid."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom.dataset import Dataset

# Patient, Patient Study and General Study attributes that highdicom does not copy itself.
PATIENT_STUDY_KEYWORDS = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthTime",
    "PatientComments",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)

# Purpose of reference (CID 7202) of a source image.
SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")


# Body Part Examined terms (PS3.16 Annex L) of unpaired structures, as dciodvfy (dicom3tools), the
# validator the node's objects are checked with, reads the General Series Laterality condition:
# a series of one of these has no Laterality. Terms not listed may be paired.
UNPAIRED_BODY_PARTS = frozenset(
    {
        "ABDOMEN",
        "ABDOMENPELVIS",
        "AORTA",
        "BACK",
        "BLADDER",
        "BRAIN",
        "CEREBELLUM",
        "CERVIX",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CIRCLEOFWILLIS",
        "COCCYX",
        "COLON",
        "CORONARYARTERY",
        "CSPINE",
        "CTSPINE",
        "DUODENUM",
        "ESOPHAGUS",
        "FACE",
        "GALLBLADDER",
        "HEAD",
        "HEADNECK",
        "HEART",
        "ILEUM",
        "ILIUM",
        "JAW",
        "JEJUNUM",
        "LARYNX",
        "LIVER",
        "LSPINE",
        "LSSPINE",
        "MAXILLA",
        "MEDIASTINUM",
        "MOUTH",
        "NECK",
        "NECKCHEST",
        "NECKCHESTABDOMEN",
        "NECKCHESTABDPELV",
        "NOSE",
        "PANCREAS",
        "PELVIS",
        "PENIS",
        "PHARYNX",
        "PROSTATE",
        "RECTUM",
        "SCALP",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "SSPINE",
        "STERNUM",
        "STOMACH",
        "THYMUS",
        "THYROID",
        "TLSPINE",
        "TONGUE",
        "TRACHEA",
        "TSPINE",
        "URETER",
        "URETHRA",
        "UTERUS",
        "VAGINA",
        "VULVA",
        "WHOLEBODY",
    }
)


def character_set(source: pydicom.Dataset) -> dict[str, Any]:
    """highdicom's ``specific_character_set`` argument for a result of ``source``.

    highdicom checks the source's value against a list that lacks valid ones (an empty first
    value, i.e. the default repertoire with code extensions, as Japanese and Korean images
    have it; Korean's ISO 2022 IR 149, which it misspells), and refuses the result. A source
    with a character set gets UTF-8 here, which highdicom takes, and
    :func:`copy_patient_study` then gives the result the source's own value, in which its
    names are encoded.
    """
    return {"specific_character_set": "ISO_IR 192"} if "SpecificCharacterSet" in source else {}


def copy_patient_study(source: pydicom.Dataset, result: pydicom.Dataset) -> None:
    """Copy the optional patient and study attributes of ``source`` that ``result`` lacks, and
    the source's Specific Character Set (see :func:`character_set`)."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source and keyword not in result:
            result[keyword] = copy.deepcopy(source[keyword])
    if "SpecificCharacterSet" in source:
        result.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)


def unpaired_body_part(dataset: Dataset) -> bool:
    """Whether the Body Part Examined of ``dataset`` is an unpaired structure (a chest): its
    series then has no Laterality (General Series, Type 2C)."""
    return str(dataset.get("BodyPartExamined") or "").strip() in UNPAIRED_BODY_PARTS


def paired_side(source: Dataset) -> str | None:
    """The side, R or L, of the paired body part ``source`` shows: its General Series Laterality,
    else its Image Laterality; None for an unpaired body part (a chest) or an unknown side."""
    if unpaired_body_part(source):
        return None
    for keyword in ("Laterality", "ImageLaterality"):
        side = source.get(keyword)
        if side in ("R", "L"):
            return str(side)
    return None


def copy_laterality(source: Dataset, result: Dataset) -> None:
    """Set General Series Laterality and Body Part Examined of ``result`` from ``source``."""
    # Laterality is Type 2C: a value for paired body parts, absent for unpaired ones, empty only
    # when unknown. Validators judge "paired" by Body Part Examined, so the two are set
    # together, and Body Part Examined is left out when laterality is unknown.
    for keyword in ("Laterality", "BodyPartExamined"):
        if keyword in result:
            delattr(result, keyword)
    # An empty Body Part Examined says no more than an absent one.
    body_part = source.get("BodyPartExamined") or None
    if unpaired_body_part(source):
        # A 2C attribute shall be absent when its condition is unsatisfied: a chest source's
        # Laterality is its own slip, which would make the result invalid.
        result.BodyPartExamined = body_part
        return
    laterality = source.get("Laterality") or None
    image_laterality = source.get("ImageLaterality")
    if laterality is None and image_laterality in ("L", "R"):
        laterality = image_laterality
    if laterality is not None:
        result.Laterality = laterality
    elif body_part is not None and (image_laterality == "U" or "Laterality" not in source):
        pass  # an unpaired body part: Laterality stays absent
    else:
        result.Laterality = None
        return
    if body_part is not None:
        result.BodyPartExamined = body_part


def source_reference(source: Dataset, purpose: tuple[str, str, str] | None = None) -> Dataset:
    """Return a Source Image Sequence item for ``source`` with a purpose of reference."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = purpose or SOURCE_FOR_PROCESSING
    reference.PurposeOfReferenceCodeSequence = [code]
    return reference


def check_source(source: object, what: str) -> pydicom.Dataset:
    """Return ``source`` if it is a Dataset a result can reference, else raise ValueError."""
    if not isinstance(source, pydicom.Dataset):
        raise ValueError(f"{what} must be a pydicom Dataset, got {type(source).__name__}")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not source.get(keyword):
            raise ValueError(f"{what} lacks {keyword}; cannot reference it in a result")
    return source


def one_study(sources: Sequence[pydicom.Dataset], what: str) -> str:
    """Return the one Study Instance UID of ``sources``; raise if they span several."""
    studies = sorted({str(source.StudyInstanceUID) for source in sources})
    if len(studies) != 1:
        raise ValueError(f"{what} must come from one study; got {len(studies)}: {studies}")
    return studies[0]
