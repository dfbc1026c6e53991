"""Derived image builder: dciodvfy, same SOP class or SC, markings, pixels, identity, UIDs."""

from __future__ import annotations

import logging
from datetime import date

import numpy as np
import pydicom
import pytest
from dciodvfy import CT_IMAGE, DX_FOR_PRESENTATION, chest_xray, ct_series, dciodvfy_errors
from defective_sources import DEFECT_IDS, DEFECTS, SECONDARY_CAPTURE, Defect

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.findings import Algorithm, CodedConcept, DerivedImage
from dicomnode.results.derived import build_derived
from dicomnode.synth.cxr import make_cxr

DX_FOR_PROCESSING = pydicom.uid.DigitalXRayImageStorageForProcessing

ALGORITHM = Algorithm(name="cxr-bone-suppression-demo", version="1.0.0")


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return chest_xray(9, size=128)


def suppressed(source: pydicom.Dataset) -> np.ndarray:
    """Stand-in model output: a smooth version of the image, in the stored range."""
    pixels = source.pixel_array.astype(np.float32)
    return (pixels + np.roll(pixels, 1, axis=0) + np.roll(pixels, 1, axis=1)) / 3


@pytest.fixture(scope="module")
def derived(source: pydicom.Dataset) -> pydicom.Dataset:
    return build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)


def test_derived_radiograph_passes_dciodvfy(derived: pydicom.Dataset) -> None:
    assert dciodvfy_errors(derived) == []


def test_derived_radiograph_keeps_sop_class_and_is_marked_derived(
    derived: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    assert derived.SOPClassUID == DX_FOR_PRESENTATION == source.SOPClassUID
    assert list(derived.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert derived.BurnedInAnnotation == "NO"
    assert "bone suppression" in derived.DerivationDescription
    assert RESEARCH_DEMO_NOTICE in derived.DerivationDescription
    code = derived.DerivationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("AI-I2I", "99DICOMNODE")
    assert derived.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99DICOMNODE"
    reference = derived.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert derived.Manufacturer == "dicomnode"
    purposes = [
        item.PurposeOfReferenceCodeSequence[0].CodeValue
        for item in derived.ContributingEquipmentSequence
    ]
    assert purposes == ["109101", "109103"]  # acquisition, then processing equipment
    # The model's name and version whole within LO's 64 characters; a derivation too long
    # for the room left ("AI bone suppres~ ..." before) is said as "derived".
    assert derived.SeriesDescription == "AI derived cxr-bone-suppression-demo 1.0.0 (research demo)"


def test_derived_radiograph_is_dated_when_it_was_made(
    derived: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    """Instance creation and content (pixel data creation) are the derivation's, today; the
    acquisition's date stays the source's."""
    today = date.today().strftime("%Y%m%d")
    assert derived.InstanceCreationDate == derived.ContentDate == today
    assert derived.InstanceCreationTime == derived.ContentTime
    assert source.ContentDate != today
    assert derived.get("AcquisitionDate") == source.get("AcquisitionDate")


def test_derived_pixels_are_the_models_in_the_sources_stored_range(
    derived: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    assert (derived.BitsStored, derived.PixelRepresentation) == (
        source.BitsStored,
        source.PixelRepresentation,
    )
    assert derived.PhotometricInterpretation == source.PhotometricInterpretation
    expected = np.rint(suppressed(source))
    assert np.array_equal(derived.pixel_array.astype(float), expected)
    assert not np.array_equal(derived.pixel_array, source.pixel_array)


def test_derived_keeps_patient_study_and_uids_are_deterministic(
    derived: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
        assert derived[keyword].value == source[keyword].value
    assert derived.AccessionNumber == source.AccessionNumber
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert derived.SOPInstanceUID != source.SOPInstanceUID
    again = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        derived.SeriesInstanceUID,
        derived.SOPInstanceUID,
    )
    newer = build_derived(
        DerivedImage(source, suppressed(source), "bone suppression"),
        Algorithm(ALGORITHM.name, "1.1.0"),
    )
    assert newer.SeriesInstanceUID != derived.SeriesInstanceUID
    assert newer.SOPInstanceUID != derived.SOPInstanceUID


def test_derived_ct_slice_keeps_class_geometry_and_axial() -> None:
    slice_ = ct_series(3)[1]
    denoised = build_derived(
        DerivedImage(slice_, slice_.pixel_array.astype(float), "low-dose denoising"), ALGORITHM
    )
    assert dciodvfy_errors(denoised) == []
    assert denoised.SOPClassUID == CT_IMAGE
    assert list(denoised.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert denoised.ImagePositionPatient == slice_.ImagePositionPatient
    assert denoised.FrameOfReferenceUID == slice_.FrameOfReferenceUID
    assert denoised.DerivationCodeSequence[0].CodeValue == "113087"  # Smoothing


def test_derived_of_other_sources_is_secondary_capture() -> None:
    source = ct_series(3)[0]
    source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    source.Modality = "MR"
    image = build_derived(DerivedImage(source, source.pixel_array, "denoising"), ALGORITHM)
    assert image.SOPClassUID == SECONDARY_CAPTURE
    assert dciodvfy_errors(image) == []
    assert list(image.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert np.array_equal(image.pixel_array, source.pixel_array)
    assert image.PatientID == source.PatientID


def test_derived_takes_a_code_from_the_caller(source: pydicom.Dataset) -> None:
    code = CodedConcept("113062", "DCM", "Pixel by pixel subtraction")
    image = build_derived(
        DerivedImage(source, suppressed(source), "bone subtraction"),
        ALGORITHM,
        derivation_code=code,
    )
    assert image.DerivationCodeSequence[0].CodeValue == "113062"
    assert "CodingSchemeIdentificationSequence" not in image


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.full((128, 128), 5000.0), "outside the source's stored range"),
        (np.full((128, 128), -1.0), "outside the source's stored range"),
        (np.zeros((64, 128)), "differs from the source"),
        (np.full((128, 128), np.nan), "finite"),
    ],
)
def test_derived_rejects_pixels_that_do_not_fit(
    source: pydicom.Dataset, pixels: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_derived(DerivedImage(source, pixels, "bone suppression"), ALGORITHM)


def _zero_width_window(ds: pydicom.Dataset) -> None:
    ds.WindowCenter, ds.WindowWidth = 2048, 0


def _second_window_zero_wide(ds: pydicom.Dataset) -> None:
    ds.WindowCenter, ds.WindowWidth = [2048, 1000], [3000, 0]
    ds.WindowCenterWidthExplanation = ["SOFT", "NONE"]


def _inverse_monochrome2(ds: pydicom.Dataset) -> None:
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PresentationLUTShape = "INVERSE"


@pytest.mark.parametrize(
    "slip", [_zero_width_window, _second_window_zero_wide, _inverse_monochrome2]
)
def test_derived_radiograph_of_a_source_with_a_slip_passes_dciodvfy(slip) -> None:
    """What the source's IOD forbids is mended in the node's own object, displayed the same
    way (MONOCHROME2 + INVERSE becomes MONOCHROME1 + INVERSE: minimum white either way)."""
    import copy

    from dicomnode.pipeline.presentation_values import is_inverted

    source = copy.deepcopy(chest_xray(9, size=128))
    slip(source)
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert image.SOPClassUID == DX_FOR_PRESENTATION
    assert dciodvfy_errors(image) == []
    assert is_inverted(image) == is_inverted(source)
    if slip is _zero_width_window:
        assert float(image.WindowWidth) >= 1
    if slip is _second_window_zero_wide:  # the usable first window, the one shown, is kept
        assert (float(image.WindowCenter), float(image.WindowWidth)) == (2048, 3000)
        assert image.WindowCenterWidthExplanation == "SOFT"


@pytest.mark.parametrize("defect", DEFECTS, ids=DEFECT_IDS)
def test_derived_image_of_a_defective_source_passes_dciodvfy(defect: Defect) -> None:
    """A source lacking what its IOD requires does not pass its slip on: the node supplies
    what it can without guessing (a Type 2 empty, a value the IOD fixes) and keeps the
    source's class; when only the modality could know (orientation, geometry, pixel spacing),
    it writes a Secondary Capture, which does not require it."""
    source = defect.source()
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert dciodvfy_errors(image) == []
    assert image.SOPClassUID == (source.SOPClassUID if defect.same_class else SECONDARY_CAPTURE)
    assert list(image.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image.StudyInstanceUID == source.StudyInstanceUID
    assert image.get("PatientID") == source.get("PatientID")
    assert np.array_equal(image.pixel_array, np.rint(suppressed(source)))


def test_derived_radiograph_without_patient_orientation_is_secondary_capture_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Patient Orientation is Type 1 in a DX image and only the modality knows it: the node
    writes a Secondary Capture (Type 2C there: empty) and logs, without patient data, why."""
    source = make_cxr(4, size=64)[0]
    del source.PatientOrientation
    with caplog.at_level(logging.INFO, logger="dicomnode.results.derived"):
        image = build_derived(
            DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM
        )
    assert image.SOPClassUID == SECONDARY_CAPTURE
    assert dciodvfy_errors(image) == []
    assert "PatientOrientation" in image and not image.PatientOrientation
    assert image.Manufacturer == "dicomnode"
    assert image.SeriesDescription.startswith("AI derived cxr-bone-suppression-demo 1.0.0")
    assert image.DerivationCodeSequence[0].CodeValue == "AI-I2I"
    (record,) = [r for r in caplog.records if r.name == "dicomnode.results.derived"]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "Secondary Capture" in message and "PatientOrientation" in message
    assert str(source.SOPInstanceUID) in message
    for secret in (str(source.PatientName), source.PatientID, source.PatientBirthDate):
        assert secret not in message


def test_derived_radiograph_supplies_what_the_dx_iod_fixes() -> None:
    """A DX lacking what its IOD fixes keeps its class: Presentation Intent Type from its SOP
    class, Rescale 0 / 1 / US, Presentation LUT Shape from its photometric interpretation, a
    window of its own pixels, Type 2 attributes empty; nothing is guessed."""
    source = make_cxr(4, size=64)[0]
    for keyword in (
        "PresentationIntentType",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "PresentationLUTShape",
        "WindowCenter",
        "WindowWidth",
        "WindowCenterWidthExplanation",
        "DetectorType",
        "PatientName",
    ):
        delattr(source, keyword)
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert image.SOPClassUID == DX_FOR_PRESENTATION
    assert dciodvfy_errors(image) == []
    assert image.PresentationIntentType == "FOR PRESENTATION"
    assert (image.RescaleIntercept, image.RescaleSlope, image.RescaleType) == (0, 1, "US")
    assert image.PresentationLUTShape == "IDENTITY"
    assert float(image.WindowWidth) >= 1
    assert "DetectorType" in image and not image.DetectorType
    assert "PatientName" in image and not image.PatientName


def test_derived_image_keeps_burned_in_annotation_of_its_source() -> None:
    """Text burned into the source is in the model's output too: YES stays YES."""
    source = make_cxr(4, size=64)[0]
    source.BurnedInAnnotation = "YES"
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert image.BurnedInAnnotation == "YES"
    assert dciodvfy_errors(image) == []
    del source.PatientOrientation  # the Secondary Capture says it too
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert (image.SOPClassUID, image.BurnedInAnnotation) == (SECONDARY_CAPTURE, "YES")


def _for_processing(source: pydicom.Dataset) -> pydicom.Dataset:
    """``source`` as a DX For Processing image that carries windows all the same."""
    import copy

    source = copy.deepcopy(source)
    source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID = DX_FOR_PROCESSING
    source.PresentationIntentType = "FOR PROCESSING"
    source.WindowCenter, source.WindowWidth = [1723, 1500], [1768, 3000]
    source.WindowCenterWidthExplanation = ["NORMAL", "WIDE"]
    source.VOILUTFunction = "LINEAR"
    return source


VOI_LUT = (
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
)


def test_derived_radiograph_for_processing_stays_for_processing_without_windows() -> None:
    """The derived pixels are in the source's values, still for processing: the image keeps
    the class and Presentation Intent Type FOR PROCESSING, and has no VOI LUT, which only a
    FOR PRESENTATION image may have (PS3.3 A.26.3). Before, the source's windows came along
    and dciodvfy failed the node's object."""
    source = _for_processing(make_cxr(4, size=64)[0])
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert (image.SOPClassUID, image.PresentationIntentType) == (
        DX_FOR_PROCESSING,
        "FOR PROCESSING",
    )
    assert [keyword for keyword in VOI_LUT if keyword in image] == []
    assert dciodvfy_errors(image) == []


def test_derived_secondary_capture_of_a_for_processing_radiograph_has_no_windows() -> None:
    """The same source written as Secondary Capture (no Patient Orientation) does not take
    its windows either: they do not belong to a For Processing image."""
    source = _for_processing(make_cxr(4, size=64)[0])
    del source.PatientOrientation
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert image.SOPClassUID == SECONDARY_CAPTURE
    assert [keyword for keyword in VOI_LUT if keyword in image] == []
    assert dciodvfy_errors(image) == []


def test_derived_radiograph_takes_the_presentation_intent_of_its_class() -> None:
    """A DX For Presentation source that says FOR PROCESSING: the derived image keeps the
    class, so its intent is the class's (each DX class allows its own value only)."""
    import copy

    source = copy.deepcopy(make_cxr(4, size=64)[0])
    source.PresentationIntentType = "FOR PROCESSING"
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert (image.SOPClassUID, image.PresentationIntentType) == (
        DX_FOR_PRESENTATION,
        "FOR PRESENTATION",
    )
    assert float(image.WindowWidth) >= 1
    assert dciodvfy_errors(image) == []


def test_derived_radiograph_takes_image_laterality_from_laterality() -> None:
    """A DX whose series says Laterality L but that has no Image Laterality (Type 1 in DX,
    consistent with Laterality) stays DX with Image Laterality L; before, it was written as
    Secondary Capture."""
    import copy

    source = copy.deepcopy(make_cxr(4, size=64)[0])
    source.Laterality = "L"
    del source.ImageLaterality
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert (image.SOPClassUID, image.ImageLaterality) == (DX_FOR_PRESENTATION, "L")
    # General Series Laterality is not allowed beside Image Laterality (2C).
    assert "Laterality" not in image
    assert dciodvfy_errors(image) == []


def test_derived_radiograph_of_a_source_with_both_lateralities_keeps_the_image_one() -> None:
    """A DX source with Laterality and Image Laterality: the derived image keeps Image
    Laterality only (General Series Laterality, 2C, is required only without it and not
    allowed otherwise); before, dciodvfy failed the node's object."""
    import copy

    source = copy.deepcopy(make_cxr(4, size=64)[0])
    source.Laterality, source.ImageLaterality = "R", "R"
    image = build_derived(DerivedImage(source, suppressed(source), "bone suppression"), ALGORITHM)
    assert (image.SOPClassUID, image.ImageLaterality) == (DX_FOR_PRESENTATION, "R")
    assert "Laterality" not in image
    assert dciodvfy_errors(image) == []


def test_derived_secondary_capture_of_non_square_pixels_states_their_aspect() -> None:
    """A Secondary Capture carries no Pixel Spacing: the derived image of pixels 0.2 x 0.1 mm
    (an MR here) states their aspect in Pixel Aspect Ratio (Image Pixel module, Type 1C), or
    viewers show it at half its height; it had none."""
    source = ct_series(3)[0]
    source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    source.Modality = "MR"
    source.PixelSpacing = [0.2, 0.1]
    image = build_derived(DerivedImage(source, source.pixel_array, "denoising"), ALGORITHM)
    assert image.SOPClassUID == SECONDARY_CAPTURE
    assert dciodvfy_errors(image) == []
    assert [int(value) for value in image.PixelAspectRatio] == [2, 1]
    assert np.array_equal(image.pixel_array, source.pixel_array)
