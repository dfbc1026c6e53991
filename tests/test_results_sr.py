"""TID 1500 SR builder: validity, identity, deterministic UIDs and the content tree."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dciodvfy import chest_xray, ct_series, dciodvfy_errors
from pydicom.sr.codedict import codes

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.findings import Algorithm, CodedConcept, Finding, ImageFindings
from dicomnode.results.sr import build_sr, series_description
from dicomnode.results.uids import KINDS, result_instance_uid, result_series_uid, result_uid

ALGORITHM = Algorithm(name="cxr-pneumothorax-demo", version="1.0.0")
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
CARDIOMEGALY = CodedConcept("287272002", "SCT", "Cardiomegaly")
PEAK = (80.0, 100.0)  # (column, row)


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return chest_xray(7, size=256)


def findings(source: pydicom.Dataset) -> ImageFindings:
    return ImageFindings(
        source=source,
        findings=[
            Finding(PNEUMOTHORAX, probability=0.83, threshold=0.5, critical=True, peak=PEAK),
            Finding(CARDIOMEGALY, probability=0.12, threshold=0.4, critical=False),
        ],
    )


@pytest.fixture(scope="module")
def sr(source: pydicom.Dataset) -> pydicom.Dataset:
    return build_sr([findings(source)], ALGORITHM)


def walk(items: pydicom.Sequence) -> Iterator[pydicom.Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def concept_name(item: pydicom.Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodeValue, code.CodingSchemeDesignator)


def groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [
        item
        for item in walk(sr.ContentSequence)
        if item.ValueType == "CONTAINER" and concept_name(item) == ("125007", "DCM")
    ]


def group_of(sr: pydicom.Dataset, concept: CodedConcept) -> pydicom.Dataset:
    for group in groups(sr):
        for item in group.ContentSequence:
            if item.ValueType == "CODE" and concept_name(item) == ("121071", "DCM"):
                code = item.ConceptCodeSequence[0]
                if (code.CodeValue, code.CodingSchemeDesignator) == (concept.value, concept.scheme):
                    return group
    raise AssertionError(f"no measurement group for {concept}")


def test_sr_passes_dciodvfy(sr: pydicom.Dataset) -> None:
    assert dciodvfy_errors(sr) == []


def test_sr_keeps_patient_and_study_in_a_new_series(
    sr: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.PatientName == source.PatientName
    assert sr.AccessionNumber == source.AccessionNumber
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.SeriesNumber == 9901
    assert sr.InstanceNumber == 1
    assert sr.Manufacturer == "dicomnode"
    assert sr.SeriesDescription == "AI SR cxr-pneumothorax-demo 1.0.0 (research demo)"


def test_sr_uids_repeat_on_rerun_and_change_with_model_version(
    sr: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    again = build_sr([findings(source)], ALGORITHM)
    assert again.SeriesInstanceUID == sr.SeriesInstanceUID
    assert again.SOPInstanceUID == sr.SOPInstanceUID
    # One instance per model version and set of images reported on (a UID names one content).
    assert again.SOPInstanceUID == result_instance_uid([source.SOPInstanceUID], ALGORITHM, "sr")
    other = copy.deepcopy(source)
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    both = build_sr([findings(source), findings(other)], ALGORITHM)
    assert both.SeriesInstanceUID == sr.SeriesInstanceUID
    assert both.SOPInstanceUID != sr.SOPInstanceUID
    newer = build_sr([findings(source)], Algorithm(name=ALGORITHM.name, version="1.1.0"))
    assert newer.SeriesInstanceUID != sr.SeriesInstanceUID
    assert newer.SOPInstanceUID != sr.SOPInstanceUID


def test_sr_holds_finding_probability_and_point_on_source(
    sr: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    group = group_of(sr, PNEUMOTHORAX)
    items = list(walk(group.ContentSequence))
    evaluation = next(
        item
        for item in items
        if item.ValueType == "CODE" and concept_name(item) == (PNEUMOTHORAX.value, "SCT")
    )
    assert evaluation.ConceptCodeSequence[0].CodeValue == "52101004"  # Present
    probability = next(item for item in items if item.ValueType == "NUM")
    value = probability.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(0.83)
    assert value.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    point = next(item for item in items if item.ValueType == "SCOORD")
    assert point.GraphicType == "POINT"
    # SCOORD puts the centre of the top left pixel at (0.5, 0.5).
    assert [float(v) for v in point.GraphicData] == [PEAK[0] + 0.5, PEAK[1] + 0.5]
    image = point.ContentSequence[0]
    assert image.ValueType == "IMAGE"
    reference = image.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID


def test_sr_absent_finding_is_not_localised_by_its_cam_peak(source: pydicom.Dataset) -> None:
    """A class-activation peak says where the model saw a finding: an absent finding's
    group references the image without coordinates (as the overlay draws no heat for it)."""
    evaluation = ImageFindings(
        source=source,
        findings=[
            Finding(PNEUMOTHORAX, probability=0.83, threshold=0.5, critical=True, peak=PEAK),
            Finding(CARDIOMEGALY, probability=0.12, threshold=0.4, critical=False, peak=PEAK),
        ],
    )
    sr = build_sr([evaluation], ALGORITHM)
    assert dciodvfy_errors(sr) == []
    present = list(walk(group_of(sr, PNEUMOTHORAX).ContentSequence))
    assert [item.GraphicType for item in present if item.ValueType == "SCOORD"] == ["POINT"]
    absent = list(walk(group_of(sr, CARDIOMEGALY).ContentSequence))
    assert not [item for item in absent if item.ValueType == "SCOORD"]
    image = next(item for item in absent if item.ValueType == "IMAGE")
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_sr_finding_without_peak_references_image_without_coordinates(
    sr: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    items = list(walk(group_of(sr, CARDIOMEGALY).ContentSequence))
    assert not [item for item in items if item.ValueType == "SCOORD"]
    evaluation = next(item for item in items if concept_name(item) == (CARDIOMEGALY.value, "SCT"))
    assert evaluation.ConceptCodeSequence[0].CodeValue == "2667000"  # Absent
    image = next(item for item in items if item.ValueType == "IMAGE")
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_sr_observer_is_the_model_and_notice_is_present(
    sr: pydicom.Dataset, tmp_path: Path
) -> None:
    """Read back as written: TID 1004's Model Name is the model's name (it held the version,
    "1.0.0"), the Name its name and version; TID 4019 in each group names both too."""
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    written = pydicom.dcmread(tmp_path / "sr.dcm")
    texts = {
        concept_name(item): item.TextValue
        for item in walk(written.ContentSequence)
        if item.ValueType == "TEXT"
    }
    assert texts[("121015", "DCM")] == "cxr-pneumothorax-demo"  # Device Observer Model Name
    assert texts[("121013", "DCM")] == "cxr-pneumothorax-demo 1.0.0"  # Device Observer Name
    assert texts[("121014", "DCM")] == "dicomnode"  # Device Observer Manufacturer
    assert texts[("111001", "DCM")] == "cxr-pneumothorax-demo"  # Algorithm Name (TID 4019)
    assert texts[("111003", "DCM")] == "1.0.0"  # Algorithm Version (TID 4019)
    assert RESEARCH_DEMO_NOTICE in texts[("121106", "DCM")]
    observer = hd.sr.Comprehensive3DSR.from_dataset(written).content.get_observer_contexts(
        observer_type=codes.DCM.Device
    )
    attributes = observer[0].observer_identifying_attributes
    assert attributes.model_name == "cxr-pneumothorax-demo"
    assert attributes.name == "cxr-pneumothorax-demo 1.0.0"


def test_sr_tracking_uids_are_deterministic(sr: pydicom.Dataset, source: pydicom.Dataset) -> None:
    again = build_sr([findings(source)], ALGORITHM)

    def tracking_uids(report: pydicom.Dataset) -> list[str]:
        return [item.UID for item in walk(report.ContentSequence) if item.ValueType == "UIDREF"]

    assert tracking_uids(again) == tracking_uids(sr)
    assert len(set(tracking_uids(sr))) == len(tracking_uids(sr))


def test_sr_reads_back_with_highdicom(sr: pydicom.Dataset) -> None:
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    planar = report.content.get_planar_roi_measurement_groups()
    assert len(planar) == 1
    assert planar[0].finding_type.value == PNEUMOTHORAX.value
    assert planar[0].get_measurements()[0].value == pytest.approx(0.83)


def test_sr_covers_several_images_of_one_study_in_any_order() -> None:
    first = chest_xray(1, size=128)
    second = chest_xray(2, size=128, study_instance_uid=first.StudyInstanceUID)
    forward = build_sr([findings(first), findings(second)], ALGORITHM)
    backward = build_sr([findings(second), findings(first)], ALGORITHM)
    assert forward.SOPInstanceUID == backward.SOPInstanceUID
    assert len(groups(forward)) == 4
    assert dciodvfy_errors(forward) == []


def test_uids_are_deterministic_and_distinct() -> None:
    assert result_uid("a", "b") == result_uid("a", "b")
    assert result_uid("ab", "c") != result_uid("a", "bc")
    assert result_series_uid("1.2.3", ALGORITHM, "sr") != result_series_uid(
        "1.2.3", ALGORITHM, "sc"
    )
    assert pydicom.uid.UID(result_uid("x")).is_valid
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        result_series_uid("not a uid", ALGORITHM, "sr")
    with pytest.raises(ValueError, match="non-empty sequence"):
        result_instance_uid([], ALGORITHM, "sr")
    series = {result_series_uid("1.2.3", ALGORITHM, kind) for kind in sorted(KINDS)}
    assert len(series) == len(KINDS) == 7  # with the IOCM rejection notes
    with pytest.raises(ValueError, match="kind must be one of"):
        result_series_uid("1.2.3", ALGORITHM, "overlay")


def test_sr_rejects_empty_evaluations() -> None:
    with pytest.raises(ValueError, match="at least one ImageFindings"):
        build_sr([], ALGORITHM)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"findings": []}, "has no findings"),
        ({"probability": 1.5}, "probability must be a number in 0..1"),
        ({"threshold": float("nan")}, "threshold must be a number in 0..1"),
        ({"peak": (256.0, 10.0)}, "lies outside"),
    ],
)
def test_sr_rejects_bad_findings(source: pydicom.Dataset, change: dict, message: str) -> None:
    evaluation = findings(source)
    if "findings" in change:
        evaluation.findings = change["findings"]
    else:
        for name, value in change.items():
            setattr(evaluation.findings[0], name, value)
    with pytest.raises(ValueError, match=message):
        build_sr([evaluation], ALGORITHM)


def test_sr_rejects_images_of_different_studies_and_repeats(source: pydicom.Dataset) -> None:
    other = chest_xray(3, size=128)
    with pytest.raises(ValueError, match="one study"):
        build_sr([findings(source), findings(other)], ALGORITHM)
    with pytest.raises(ValueError, match="more than once"):
        build_sr([findings(source), findings(source)], ALGORITHM)


NODULE = CodedConcept("27925004", "SCT", "Nodule")
TUBE_TIP = CodedConcept("RID49652", "RADLEX", "Endotracheal tube tip")  # landmark


def localised(source: pydicom.Dataset) -> ImageFindings:
    return ImageFindings(
        source=source,
        findings=[
            Finding(NODULE, 0.91, 0.5, critical=False, box=(10.0, 20.0, 40.0, 44.0)),
            Finding(NODULE, 0.62, 0.5, critical=False, box=(150.0, 160.0, 171.0, 190.0)),
            Finding(TUBE_TIP, 0.88, 0.5, critical=False, point=(128.0, 60.0)),
        ],
    )


def scoords(group: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [item for item in walk(group.ContentSequence) if item.ValueType == "SCOORD"]


def test_sr_boxes_are_closed_rectangles_and_landmarks_points(source: pydicom.Dataset) -> None:
    sr = build_sr([localised(source)], ALGORITHM)
    assert dciodvfy_errors(sr) == []
    found = groups(sr)
    assert len(found) == 3  # each nodule its own group
    rectangles = [scoords(group)[0] for group in found[:2]]
    for rectangle, (c0, r0, c1, r1) in zip(
        rectangles, [(10, 20, 40, 44), (150, 160, 171, 190)], strict=True
    ):
        assert rectangle.GraphicType == "POLYLINE"
        # Half-open pixel boxes are pixel edges: no half-pixel shift, 5 points, closed.
        assert [float(v) for v in rectangle.GraphicData] == [
            c0,
            r0,
            c1,
            r0,
            c1,
            r1,
            c0,
            r1,
            c0,
            r0,
        ]
        assert rectangle.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
    point = scoords(found[2])[0]
    assert point.GraphicType == "POINT"
    assert [float(v) for v in point.GraphicData] == [128.5, 60.5]
    tracking = [
        item.UID for group in found for item in group.ContentSequence if item.ValueType == "UIDREF"
    ]
    assert len(set(tracking)) == 3
    assert build_sr([localised(source)], ALGORITHM).SOPInstanceUID == sr.SOPInstanceUID
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    assert len(report.content.get_planar_roi_measurement_groups()) == 3


def test_sr_of_ct_slices_names_chest_ct() -> None:
    slices = ct_series(4)
    evaluation = ImageFindings(
        source=slices[2],
        findings=[Finding(NODULE, 0.7, 0.5, critical=False, box=(5.0, 6.0, 12.0, 14.0))],
    )
    sr = build_sr([evaluation], ALGORITHM)
    assert dciodvfy_errors(sr) == []
    procedure = next(
        item for item in walk(sr.ContentSequence) if concept_name(item) == ("121058", "DCM")
    )
    assert procedure.ConceptCodeSequence[0].CodeValue == "169069000"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"box": (10.0, 10.0, 10.0, 20.0)}, "box"),
        ({"box": (0.0, 0.0, 257.0, 20.0)}, "outside"),
        ({"point": (-1.0, 5.0)}, "outside"),
    ],
)
def test_sr_rejects_bad_geometry(source: pydicom.Dataset, change: dict, message: str) -> None:
    evaluation = localised(source)
    for name, value in change.items():
        setattr(evaluation.findings[0], name, value)
    with pytest.raises(ValueError, match=message):
        build_sr([evaluation], ALGORITHM)


def test_sr_rejects_unlocalised_repeat(source: pydicom.Dataset) -> None:
    evaluation = localised(source)
    evaluation.findings.append(Finding(NODULE, 0.3, 0.5, critical=False))
    with pytest.raises(ValueError, match="more than once"):
        build_sr([evaluation], ALGORITHM)


def _library_entry(sr: pydicom.Dataset, sop_uid: str) -> dict[str, object]:
    """The Image Library entry of ``sop_uid``: its descriptors by concept code value."""
    for item in walk(sr.ContentSequence):
        references = item.get("ReferencedSOPSequence", [])
        if (
            item.ValueType == "IMAGE"
            and references
            and "ContentSequence" in item
            and references[0].ReferencedSOPInstanceUID == sop_uid
        ):
            entry: dict[str, object] = {}
            for descriptor in item.ContentSequence:
                code = descriptor.ConceptNameCodeSequence[0].CodeValue
                if descriptor.ValueType == "NUM":
                    entry[code] = float(descriptor.MeasuredValueSequence[0].NumericValue)
                elif descriptor.ValueType == "TEXT":
                    entry[code] = descriptor.TextValue
                else:
                    entry[code] = descriptor.ValueType
            return entry
    raise AssertionError(f"no Image Library entry for {sop_uid}")


HORIZONTAL_SPACING, ORIENTATION_ROW, SLICE_THICKNESS = "111026", "111044", "112225"


def _cr_without_imager_spacing() -> pydicom.Dataset:
    ds = copy.deepcopy(chest_xray(11, size=256))
    ds.Modality = "CR"
    ds.PixelSpacing = ds.ImagerPixelSpacing
    del ds.ImagerPixelSpacing
    return ds


def _empty_orientation() -> pydicom.Dataset:
    ds = copy.deepcopy(chest_xray(12, size=256))
    ds.PatientOrientation = ""
    return ds


def _colour_capture() -> pydicom.Dataset:
    ds = copy.deepcopy(chest_xray(13, size=256))
    del ds.ImagerPixelSpacing
    del ds.PatientOrientation
    return ds


@pytest.mark.parametrize(
    "make, described",
    [(_cr_without_imager_spacing, True), (_empty_orientation, False), (_colour_capture, False)],
    ids=["cr-pixel-spacing-only", "empty-patient-orientation", "no-spacing-no-orientation"],
)
def test_sr_of_a_radiograph_without_every_library_descriptor(make, described: bool) -> None:
    """Imager Pixel Spacing is Type 3 for CR and Patient Orientation may be empty (Type 2C):
    the report is still written; the image's library entry has the spacing and orientation
    only when the image has both (a CR's Pixel Spacing standing in for the imager's)."""
    source = make()
    sr = build_sr([findings(source)], ALGORITHM)
    assert dciodvfy_errors(sr) == []
    entry = _library_entry(sr, source.SOPInstanceUID)
    assert (HORIZONTAL_SPACING in entry, ORIENTATION_ROW in entry) == (described, described)
    if described:
        assert entry[HORIZONTAL_SPACING] == pytest.approx(float(source.PixelSpacing[1]))


def test_sr_of_ct_slices_without_slice_thickness() -> None:
    slices = ct_series(4)
    slices[2].SliceThickness = None  # Type 2: present, empty
    evaluation = ImageFindings(
        source=slices[2],
        findings=[Finding(NODULE, 0.7, 0.5, critical=False, box=(5.0, 6.0, 12.0, 14.0))],
    )
    sr = build_sr([evaluation], ALGORITHM)
    assert dciodvfy_errors(sr) == []
    assert SLICE_THICKNESS not in _library_entry(sr, slices[2].SOPInstanceUID)
    # A slice with every descriptor keeps them.
    whole = build_sr([ImageFindings(slices[1], evaluation.findings)], ALGORITHM)
    assert SLICE_THICKNESS in _library_entry(whole, slices[1].SOPInstanceUID)


@pytest.mark.parametrize(
    ("kind", "short", "shown"),
    [
        ("SR", "", "SR"),
        # The bone suppression output read "AI Bone suppres~ cxr-bone-...": its writer's short
        # label instead, the model's name saying which derivation.
        ("Bone suppression (soft-tissue image)", "derived", "derived"),
        ("Bone suppression (soft-tissue image, ribs and clavicles removed)", "derived", "derived"),
        # With no short label, a cut after the last whole word that fits, never within one.
        ("Bone suppression (soft-tissue image)", "", "Bone~"),
    ],
)
def test_series_description_keeps_the_model_name_and_version_whole(
    kind: str, short: str, shown: str
) -> None:
    """A viewer's series list is where a reader sees which model and version made a series:
    a long kind gives way or is cut, not the model (the bone suppression output lost its
    version)."""
    algorithm = Algorithm(name="cxr-bone-suppression-demo", version="1.0.0")
    description = series_description(algorithm, kind, short)
    assert len(description) <= 64
    assert description == f"AI {shown} cxr-bone-suppression-demo 1.0.0 (research demo)"


@pytest.mark.parametrize(
    ("kind", "shown"),
    [
        ("Noise reduction", "Noise reduction"),
        ("Bone suppression (soft-tissue image)", "Bone suppression~"),
        ("Noise reduction, low-dose CT", "Noise reduction~"),
        ("Supersampling-of-the-image-by-four", "Supersampling-of-the-ima~"),
    ],
)
def test_series_description_cuts_a_kind_at_a_word_boundary(kind: str, shown: str) -> None:
    """A kind too long for the room (25 characters beside this model) and with no short label
    ends after its last whole word that fits (punctuation before the cut dropped); one word
    longer than the room is cut within it."""
    algorithm = Algorithm(name="cxr-bone-supp", version="1.0.0")
    description = series_description(algorithm, kind)
    assert len(description) <= 64
    assert description == f"AI {shown} cxr-bone-supp 1.0.0 (research demo)"


def test_series_description_cuts_only_a_name_too_long_for_any_kind() -> None:
    algorithm = Algorithm(name="a-very-long-model-name-from-another-vendor-x" * 2, version="2.0")
    description = series_description(algorithm, "overlay")
    assert len(description) == 64
    assert description.startswith("AI overlay a-very-long")
    assert description.endswith("~ (research demo)")
