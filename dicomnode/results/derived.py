"""Derived image series: an image-to-image model's output (e.g. bone suppression) as DICOM.

DX, CR and CT sources give an image of the same SOP class: a copy of the source's attributes
with new pixels, marked DERIVED\\SECONDARY and referencing the source. Other sources give a
greyscale Secondary Capture, and so does a DX, CR or CT source that lacks an attribute its IOD
requires and the node cannot supply (``iod_requirements``: e.g. a DX without Patient
Orientation): the copy would carry the slip into the node's own object, and the node does not
guess what only the modality knows. Secondary Capture does not require those attributes.

Derivation Code (CID 7203, extensible) has no code for a learned image-to-image transform.
Noise reduction maps to DCM 113087 "Smoothing"; anything else (bone suppression) gets the
local code AI-I2I in coding scheme 99DICOMNODE ("99" marks a private scheme, PS3.16 8.2),
declared in the Coding Scheme Identification Sequence. Callers may pass a better code.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import EQUIPMENT_MANUFACTURER, RESEARCH_DEMO_NOTICE, __version__
from dicomnode.findings import Algorithm, CodedConcept, DerivedImage
from dicomnode.pipeline.letterbox import pixel_aspect_ratio
from dicomnode.pipeline.presentation_values import percentile_window
from dicomnode.results.iod_requirements import (
    CT_IMAGE,
    DX_FOR_PROCESSING,
    REQUIREMENTS,
    has_value,
    supply_required,
)
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.source import (
    character_set,
    check_source,
    copy_laterality,
    copy_patient_study,
    source_reference,
)
from dicomnode.results.sr import series_description, with_notice
from dicomnode.results.uids import result_instance_uid, result_series_uid

log = logging.getLogger(__name__)

DERIVED_SERIES_NUMBER = 9905
SAME_CLASS_SOURCES = frozenset(REQUIREMENTS)

SMOOTHING = CodedConcept("113087", "DCM", "Smoothing")
LOCAL_SCHEME = "99DICOMNODE"
AI_IMAGE_TO_IMAGE = CodedConcept("AI-I2I", LOCAL_SCHEME, "AI image-to-image transformation")
# Contributing Equipment purposes (CID 7005).
_PROCESSING_EQUIPMENT = ("109103", "DCM", "Processing Equipment")
_ACQUISITION_EQUIPMENT = ("109101", "DCM", "Acquisition Equipment")
# Attributes of the source that describe its own pixel data, encoding or signature and would be
# wrong on the derived image.
_DROPPED = (
    "IconImageSequence",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "DigitalSignaturesSequence",
    "MACParametersSequence",
    "EncryptedAttributesSequence",
    "OriginalAttributesSequence",
    "ReferencedImageSequence",
    "SourceImageSequence",
    "DerivationCodeSequence",
    "DerivationDescription",
    "ContributingEquipmentSequence",
    "IrradiationEventUID",
)
# The VOI LUT module (PS3.3 C.11.2).
_VOI_LUT = (
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
)


def build_derived(
    derived: DerivedImage,
    algorithm: Algorithm,
    *,
    derivation_code: CodedConcept | None = None,
) -> pydicom.Dataset:
    """Return the derived image of ``derived`` in a new series of the source's study."""
    source = check_source(derived.source, "DerivedImage.source")
    pixels = _stored_pixels(source, derived.pixels)
    what = derived.derivation or "image-to-image transformation"
    code = derivation_code or (
        SMOOTHING if "nois" in what.lower() or "smooth" in what.lower() else AI_IMAGE_TO_IMAGE
    )
    study_uid = str(source.StudyInstanceUID)
    series_uid = result_series_uid(study_uid, algorithm, "derived")
    instance_uid = result_instance_uid([str(source.SOPInstanceUID)], algorithm, "derived")
    # "derived" where the derivation does not fit whole beside the model's name and version
    # (which say what it is: "cxr-bone-suppression-demo"), as the other writers name theirs.
    description = series_description(algorithm, what, short="derived")
    # The source's header as the derived image takes it over: invalid values emptied or left
    # out (what its IOD then lacks is supplied or makes it a Secondary Capture, as below).
    reference = sanitised_reference(source)
    image = None
    if str(source.SOPClassUID) in SAME_CLASS_SOURCES:
        image = _same_class(reference, pixels, series_uid, instance_uid, algorithm)
        lacking = supply_required(image)
        if lacking:
            # UIDs and attribute names only: no patient data in the log.
            log.info(
                "derived image of SOP Instance %s (%s) written as Secondary Capture: the "
                "source lacks %s, which that IOD requires and the node cannot supply",
                source.SOPInstanceUID,
                source.SOPClassUID.name,
                ", ".join(lacking),
            )
            image = None
    if image is None:
        image = _secondary_capture(reference, pixels, series_uid, instance_uid, algorithm)
    image.SeriesDescription = description
    notice = f" {RESEARCH_DEMO_NOTICE}." if algorithm.research_demo else ""
    image.DerivationDescription = (
        f"{what} by {algorithm.name} {algorithm.version} ({algorithm.manufacturer}).{notice}"
    )[:1024]
    image.ImageComments = with_notice(
        f"AI-derived image ({what}) of {algorithm.name} {algorithm.version}, not verified by a "
        "physician",
        algorithm,
        10240,
    )
    image.DerivationCodeSequence = [_code_item(code)]
    if code.scheme == LOCAL_SCHEME:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = LOCAL_SCHEME
        scheme.CodingSchemeName = "dicomnode local codes"
        scheme.CodingSchemeResponsibleOrganization = "dicomnode"
        image.CodingSchemeIdentificationSequence = [scheme]
    image.SourceImageSequence = [source_reference(source)]
    return image


def _same_class(
    source: pydicom.Dataset,
    pixels: np.ndarray,
    series_uid: str,
    instance_uid: str,
    algorithm: Algorithm,
) -> pydicom.Dataset:
    image = Dataset()
    for element in source:
        if element.tag.group in (0x0002,) or element.tag.is_private:
            continue
        if element.keyword in _DROPPED or 0x6000 <= element.tag.group <= 0x60FF:
            continue
        if element.keyword == "PixelData":
            continue
        image.add(copy.deepcopy(element))
    image.file_meta = FileMetaDataset()
    image.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    image.file_meta.MediaStorageSOPClassUID = source.SOPClassUID
    image.file_meta.MediaStorageSOPInstanceUID = instance_uid
    image.SOPInstanceUID = instance_uid
    image.SeriesInstanceUID = series_uid
    image.SeriesNumber = DERIVED_SERIES_NUMBER
    # Value 3 onwards (e.g. AXIAL for CT) still describe the image.
    image.ImageType = ["DERIVED", "SECONDARY", *list(source.get("ImageType") or [])[2:]]
    acquisition = Dataset()
    for keyword in ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber"):
        if keyword in source:
            setattr(acquisition, keyword, source[keyword].value)
    acquisition.PurposeOfReferenceCodeSequence = [_code_item(CodedConcept(*_ACQUISITION_EQUIPMENT))]
    processing = Dataset()
    processing.Manufacturer = EQUIPMENT_MANUFACTURER
    processing.ManufacturerModelName = algorithm.name[:64]
    processing.SoftwareVersions = [f"dicomnode {__version__}", algorithm.version[:64]]
    processing.ContributionDescription = f"{algorithm.name} {algorithm.version}"[:64]
    processing.PurposeOfReferenceCodeSequence = [_code_item(CodedConcept(*_PROCESSING_EQUIPMENT))]
    # General Equipment names who made this instance; the modality that acquired the source
    # stays on record as contributing equipment.
    image.ContributingEquipmentSequence = (
        [acquisition, processing] if source.get("Manufacturer") else [processing]
    )
    image.Manufacturer = EQUIPMENT_MANUFACTURER
    image.ManufacturerModelName = algorithm.name[:64]
    image.SoftwareVersions = f"dicomnode {__version__}"
    # Made now (PS3.3 C.12.1, C.7.6.1: when this instance and its pixel data were created);
    # the acquisition's date and time stay the source's.
    now = datetime.now()
    image.InstanceCreationDate = image.ContentDate = now.strftime("%Y%m%d")
    image.InstanceCreationTime = image.ContentTime = now.strftime("%H%M%S.%f")
    if "DeviceSerialNumber" in image:
        del image.DeviceSerialNumber
    image.PixelData = pixels.tobytes()
    image["PixelData"].VR = "OW" if int(source.BitsAllocated) > 8 else "OB"
    # Burned In Annotation and Lossy Image Compression stay the source's: text burned into it
    # is in the model's output too, and so is any loss it once had. A source that does not
    # say leaves them unsaid (iod_requirements decides whether its class can do without).
    _conform_presentation(image)
    # General Series Laterality (2C) is required only of an image without Image Laterality,
    # and not allowed otherwise: a source with both would pass on its slip.
    if "Laterality" in image and has_value(image, "ImageLaterality"):
        del image.Laterality
    return image


def _conform_presentation(image: pydicom.Dataset) -> None:
    """Mend, in the node's own copy of a source's header, what sources carry but the image's
    IOD forbids (dciodvfy would fail the node's object for the source's slip), keeping how
    the image is displayed:

    - windows that cannot be applied (``_keep_usable_windows``) are dropped;
    - MONOCHROME2 with Presentation LUT Shape INVERSE (the DX, CR, MG and IO modules require
      IDENTITY with MONOCHROME2) is written as MONOCHROME1 with INVERSE: the same stored values
      displayed the same way, minimum white.

    - a DX For Processing image has no VOI LUT (PS3.3 A.26.3: the VOI LUT module only in
      FOR PRESENTATION images): a source's windows are for pixels that are not yet for
      display, and the derived pixels are in the source's values, still for processing.

    What the source lacks is ``iod_requirements``' business."""
    if str(image.SOPClassUID) == DX_FOR_PROCESSING:
        _drop_voi_lut(image)
    else:
        _keep_usable_windows(image)
    shape = str(image.get("PresentationLUTShape", "") or "").strip().upper()
    if image.get("PhotometricInterpretation") == "MONOCHROME2" and shape == "INVERSE":
        image.PhotometricInterpretation = "MONOCHROME1"


def _drop_voi_lut(image: pydicom.Dataset) -> None:
    for keyword in _VOI_LUT:
        if keyword in image:
            delattr(image, keyword)


def _keep_usable_windows(image: pydicom.Dataset) -> None:
    """Keep the Window Center / Width pairs that can be applied: both values there, and at
    least 1 wide (PS3.3 C.11.2.1.2.1; LINEAR_EXACT and SIGMOID allow narrower ones, above 0).
    The others go with their explanations (a centre without a width, an empty pair, a zero
    width); when none is left, the percentile window the node's own presentation uses in
    their stead is written, unless a VOI LUT remains (a DX For Presentation needs one or the
    other)."""
    if "WindowCenter" not in image and "WindowWidth" not in image:
        return

    def values(keyword: str) -> list:
        value = image.get(keyword)
        return list(value) if isinstance(value, MultiValue) else [] if value is None else [value]

    function = str(image.get("VOILUTFunction", "") or "").upper()
    narrow = function in ("LINEAR_EXACT", "SIGMOID")
    centres, widths = values("WindowCenter"), values("WindowWidth")
    explanations = values("WindowCenterWidthExplanation")
    keep = [
        index
        for index, width in enumerate(widths)
        if index < len(centres)
        and centres[index] is not None
        and width is not None
        and (float(width) > 0 if narrow else float(width) >= 1)
    ]
    if keep and len(keep) == len(widths) == len(centres):
        return
    for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
        if keyword in image:
            delattr(image, keyword)
    if keep:
        image.WindowCenter = [centres[i] for i in keep]
        image.WindowWidth = [widths[i] for i in keep]
        if len(explanations) == len(widths):
            image.WindowCenterWidthExplanation = [explanations[i] for i in keep]
        return
    if "VOILUTFunction" in image:
        del image.VOILUTFunction
    if "VOILUTSequence" not in image:
        centre, width = percentile_window(image)
        image.WindowCenter, image.WindowWidth = round(centre, 3), round(width, 3)


def _secondary_capture(
    source: pydicom.Dataset,
    pixels: np.ndarray,
    series_uid: str,
    instance_uid: str,
    algorithm: Algorithm,
) -> pydicom.Dataset:
    photometric = str(source.get("PhotometricInterpretation", "MONOCHROME2"))
    orientation = [str(value) for value in source.get("PatientOrientation") or []]
    image = hd.sc.SCImage.from_ref_dataset(
        **character_set(source),
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=photometric,
        bits_allocated=int(source.BitsAllocated),
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=DERIVED_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=EQUIPMENT_MANUFACTURER,
        patient_orientation=tuple(orientation) if len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        software_versions=f"dicomnode {__version__}",
    )
    if len(orientation) != 2:
        image.PatientOrientation = None
    image.ImageType = ["DERIVED", "SECONDARY"]
    # The source's pixels, without the spacing a Secondary Capture does not carry: their
    # aspect (Image Pixel module, Type 1C where not 1:1), or viewers show them square.
    aspect = pixel_aspect_ratio(source)
    if aspect is not None:
        image.PixelAspectRatio = list(aspect)
    image.BitsStored = int(source.BitsStored)
    image.HighBit = int(source.BitsStored) - 1
    # The source's modality LUT when whole, and its usable windows: the derived pixels are in
    # the source's stored values and read the same way. A DX For Processing source has no
    # windows to pass on (``_conform_presentation``): any it carries are a slip.
    if has_value(source, "RescaleIntercept") and has_value(source, "RescaleSlope"):
        image.RescaleIntercept, image.RescaleSlope = source.RescaleIntercept, source.RescaleSlope
        # Absent from a CT image, Rescale Type means Hounsfield units (CT Image module).
        ct = str(source.SOPClassUID) == CT_IMAGE
        image.RescaleType = source.get("RescaleType") or ("HU" if ct else "US")
    if str(source.SOPClassUID) != DX_FOR_PROCESSING:
        for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
            if keyword in source:
                image[keyword] = copy.deepcopy(source[keyword])
        _keep_usable_windows(image)
    # Text burned into the source is in the model's output too; a source that does not say
    # leaves it unsaid (Type 3 here).
    if source.get("BurnedInAnnotation") in ("YES", "NO"):
        image.BurnedInAnnotation = source.BurnedInAnnotation
    copy_patient_study(source, image)
    copy_laterality(source, image)
    return image


def _stored_pixels(source: pydicom.Dataset, values: np.ndarray) -> np.ndarray:
    """Return ``values`` as the source's stored pixel type, checked against its range."""
    where = f"derived image of SOP Instance UID {source.SOPInstanceUID}"
    if int(source.get("SamplesPerPixel", 1)) != 1 or int(source.get("NumberOfFrames", 1)) != 1:
        raise ValueError(f"{where}: the source must be a single-frame greyscale image")
    for keyword in (
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "PhotometricInterpretation",
    ):
        if not has_value(source, keyword):
            raise ValueError(f"{where}: the source lacks {keyword}")
    values = np.asarray(values)
    shape = (int(source.Rows), int(source.Columns))
    if values.shape != shape:
        raise ValueError(f"{where}: pixels shape {values.shape} differs from the source's {shape}")
    if np.issubdtype(values.dtype, np.integer):
        rounded = values  # already whole: no float copy of a source-sized image
    elif not np.all(np.isfinite(values)):
        raise ValueError(f"{where}: pixels must be finite")
    else:
        rounded = np.rint(values)
    bits, signed = int(source.BitsStored), int(source.PixelRepresentation) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if rounded.min() < low or rounded.max() > high:
        raise ValueError(
            f"{where}: pixels span {rounded.min():g}..{rounded.max():g}, outside the source's "
            f"stored range {low}..{high} ({bits} bits {'signed' if signed else 'unsigned'})"
        )
    allocated = int(source.BitsAllocated)
    if allocated not in (8, 16):
        raise ValueError(f"{where}: Bits Allocated {allocated} is not supported (8 or 16)")
    dtype = np.dtype(f"{'i' if signed else 'u'}{allocated // 8}").newbyteorder("<")
    return np.ascontiguousarray(rounded.astype(dtype))


def _code_item(code: CodedConcept) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
        code.value,
        code.scheme,
        code.meaning,
    )
    return item
