"""The source image as the node's result objects take it over: its patient, study, equipment and
series/image identification attributes, each value checked against its VR.

Modalities and archives send values the standard does not allow: a Patient's Birth Date
"00000000", a Study Time "25:61", an Instance Number "x1", a Patient's Weight "1,5", an
Accession Number longer than 16 characters. highdicom parses the dates and times it copies from
its reference image and refuses some values (Patient's Sex "X"), and what it and the writers
copy unchecked fails dciodvfy, so one such value cost a study every result object. The writers
therefore take their source's header from :func:`sanitised_reference`: a shallow copy in which
an invalid value of a Type 2 attribute is empty (PS3.3: "unknown") and an invalid value of an
optional one is left out. The source Dataset, and so its file, is never changed.

What is checked is pydicom's own validation of the VR (characters, length, form), a date or time
pydicom can read as one (highdicom reads them so), the enumerated values highdicom knows, and
no control characters (pydicom does not check those; dciodvfy does).

Kept as they are, even when invalid: UIDs (Type 1, the references; ingest refuses invalid
ones), Patient's Name and Patient ID (the patient's identity, by which a PACS files the results
with the source: emptied, they would file them under no patient or be refused as a mismatch),
and the other Type 1 attributes, which the node cannot supply.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import highdicom as hd
from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, validate_value

log = logging.getLogger(__name__)

# Type 2 attributes of the Patient, Clinical Trial Subject, General Study, Clinical Trial Study,
# General Equipment, General Series and General Image modules (PS3.3 C.7), and the Type 2C
# ones of the Patient module that a source carries only when their condition holds: an invalid
# value is written empty.
EMPTIED_WHEN_INVALID = (
    "PatientBirthDate",
    "PatientSex",
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PatientSexNeutered",
    "ClinicalTrialTimePointID",
    "Manufacturer",
    "SeriesNumber",
    "InstanceNumber",
)

# Type 3 attributes of those modules and of General Acquisition, and the series and image
# attributes a writer sets from the facts itself (Laterality, Patient Orientation: 2C in the
# node's objects, which say "unknown" when the source gives no valid value): an invalid value
# is left out.
LEFT_OUT_WHEN_INVALID = (
    # Patient
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainAdditionalInformation",
    "OtherPatientNames",
    "PatientComments",
    "PatientIdentityRemoved",
    "EthnicGroup",
    # Clinical Trial Subject
    "IssuerOfClinicalTrialProtocolID",
    "IssuerOfClinicalTrialSiteID",
    "IssuerOfClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "ConsultingPhysicianName",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
    # Patient Study
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "LastMenstrualDate",
    "ReasonForVisit",
    "AdmissionID",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "PatientState",
    # Clinical Trial Study
    "ClinicalTrialTimePointDescription",
    "IssuerOfClinicalTrialTimePointID",
    # General Equipment
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "InstitutionalDepartmentName",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "GantryID",
    "SoftwareVersions",
    "SpatialResolution",
    "DateOfLastCalibration",
    "TimeOfLastCalibration",
    "DateOfManufacture",
    "DateOfInstallation",
    # General Series
    "SeriesDate",
    "SeriesTime",
    "SeriesDescription",
    "PerformingPhysicianName",
    "OperatorsName",
    "BodyPartExamined",
    "ProtocolName",
    "Laterality",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime",
    "PerformedProcedureStepID",
    "PerformedProcedureStepDescription",
    "CommentsOnThePerformedProcedureStep",
    # General Image
    "ContentDate",
    "ContentTime",
    "PatientOrientation",
    "ImageLaterality",
    "ImageComments",
    # General Acquisition
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "AcquisitionNumber",
    "ImagesInAcquisition",
)

# highdicom reads these of its reference image without a default (an AttributeError when
# absent): a source without them gives them empty, as Type 2 allows.
READ_BY_HIGHDICOM = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
)

# The character repertoire the node writes names in when the source names none it knows.
UTF8 = "ISO_IR 192"

# VRs whose values are text; the others (binary numbers, sequences, UIDs) are not checked.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}
)
# Text VRs that may hold the format effectors (PS3.5 6.1.3); all others only ESC.
_MULTI_LINE_VRS = frozenset({"LT", "ST", "UT"})
_FORMAT_EFFECTORS = frozenset("\t\n\f\r")
_DATE_TIME: dict[str, Callable[[str], object]] = {"DA": DA, "TM": TM, "DT": DT}
# Enumerated values (PS3.3 C.7.1.1, C.7.3.1, C.7.6.1.1): highdicom's enums where it has them.
_ENUMERATED = {
    "PatientSex": frozenset(value.value for value in hd.PatientSexValues),
    "Laterality": frozenset(value.value for value in hd.LateralityValues),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
}

# (tag, keyword) of every attribute checked, in the order of the lists.
_CHECKED = tuple(
    (tag, keyword)
    for keyword in (*EMPTIED_WHEN_INVALID, *LEFT_OUT_WHEN_INVALID)
    if (tag := tag_for_keyword(keyword)) is not None
)


def sanitised_reference(source: Dataset) -> Dataset:
    """Return a shallow copy of ``source`` for the result writers: its patient, study,
    equipment and series/image identification attributes with invalid values emptied (Type 2)
    or left out (optional), Type 2 attributes highdicom needs added empty when absent, and a
    Specific Character Set pydicom does not know replaced by UTF-8 (its names, as decoded, are
    written in UTF-8). ``source`` is not changed; its pixel data is shared."""
    # Each value is read (and so decoded) in the source itself, as any reader of it would; the
    # copy then holds the decoded data elements. (Each writer asks again: cheap, and logged
    # once per instance, see _report.)
    invalid = [
        (tag, keyword) for tag, keyword in _CHECKED if tag in source and not _valid(source, tag)
    ]
    reference = Dataset()
    reference.update(source)  # the same data elements: the pixel data is not copied
    if hasattr(source, "file_meta"):
        reference.file_meta = source.file_meta
    emptied, left_out = [], []
    for tag, keyword in invalid:
        # New elements, or none, in the copy: the source's own stay as they are.
        if keyword in EMPTIED_WHEN_INVALID:
            reference.add_new(tag, dictionary_VR(tag), None)
            emptied.append(keyword)
        else:
            del reference[tag]
            left_out.append(keyword)
    for keyword in READ_BY_HIGHDICOM:
        if keyword not in reference:
            reference.add_new(keyword, dictionary_VR(keyword), None)
    replaced = not _known_character_set(reference)
    if replaced:
        # Decoded first, as the source's own repertoire (or pydicom's fallback) reads them.
        for _ in reference:
            pass
        # A new element: the copy shares the source's (setting its value would change both).
        reference.add_new("SpecificCharacterSet", "CS", UTF8)
    if emptied or left_out or replaced:
        _report(
            str(source.get("SOPInstanceUID", "(no UID)")), tuple(emptied), tuple(left_out), replaced
        )
    return reference


@functools.lru_cache(maxsize=4096)
def _report(uid: str, emptied: tuple[str, ...], left_out: tuple[str, ...], replaced: bool) -> None:
    """One INFO line per instance and set of problems, however many writers and models take
    it over (attribute names only: the values are patient data)."""
    log.info(
        "SOP Instance %s has invalid values; its result objects write empty: %s; leave "
        "out: %s; Specific Character Set: %s (the source is unchanged)",
        uid,
        ", ".join(emptied) or "none",
        ", ".join(left_out) or "none",
        f"unknown, written as {UTF8}" if replaced else "kept",
    )


def is_valid_value(element: DataElement) -> bool:
    """Whether every value of ``element`` is one its VR allows (see the module's docstring);
    values of other than text VRs are not checked."""
    if element.VR not in _TEXT_VRS or element.is_empty:
        return True
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    allowed = _ENUMERATED.get(element.keyword)
    for value in values:
        text = _text(value)
        try:
            validate_value(element.VR, text, config.RAISE)
            if element.VR in _DATE_TIME and text.strip():
                _DATE_TIME[element.VR](text)
        except (ValueError, TypeError, OverflowError):
            return False
        if _has_control_characters(element.VR, text):
            return False
        if allowed is not None and text.strip() not in allowed:
            return False
    return True


def _valid(source: Dataset, tag: int) -> bool:
    try:
        element = source[tag]
    except Exception:  # a value pydicom cannot even read (reading validation set to raise)
        return False
    return is_valid_value(element)


def _text(value: object) -> str:
    """A value as its data element held it: pydicom keeps the string of an IS, DS, DA, TM or
    DT it converted; a Person Name is its decoded string."""
    original = getattr(value, "original_string", None)
    if isinstance(original, str):
        return original
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _has_control_characters(vr: str, text: str) -> bool:
    allowed = _FORMAT_EFFECTORS if vr in _MULTI_LINE_VRS else frozenset()
    return any(ord(c) < 0x20 and c != "\x1b" and c not in allowed for c in text)


def _known_character_set(reference: Dataset) -> bool:
    """Whether the Specific Character Set, if any, names only repertoires pydicom knows."""
    if "SpecificCharacterSet" not in reference:
        return True
    value = reference.SpecificCharacterSet
    values = value if isinstance(value, MultiValue) else [value]
    return all(str(term or "").strip() in python_encoding for term in values)
