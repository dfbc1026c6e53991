"""GSPS builder: dciodvfy, graphics on the source, labels, VOI kept, identity and UIDs."""

from __future__ import annotations

import pydicom
import pytest
from dciodvfy import chest_xray, ct_series, dciodvfy_errors

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.findings import Algorithm, CodedConcept, Finding, ImageFindings
from dicomnode.results.gsps import build_gsps

ALGORITHM = Algorithm(name="cxr-nodule-demo", version="1.0.0")
NODULE = CodedConcept("27925004", "SCT", "Nodule")
TUBE_TIP = CodedConcept("RID49652", "RADLEX", "Endotracheal tube tip")
GSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return chest_xray(5, size=128)


def evaluation(source: pydicom.Dataset) -> ImageFindings:
    return ImageFindings(
        source,
        [
            Finding(NODULE, 0.91, 0.5, critical=False, box=(5.0, 6.0, 20.0, 30.0)),
            Finding(NODULE, 0.72, 0.5, critical=False, box=(60.0, 70.0, 90.0, 100.0)),
            Finding(NODULE, 0.20, 0.5, critical=False, box=(100.0, 10.0, 110.0, 20.0)),
            Finding(TUBE_TIP, 0.85, 0.5, critical=True, point=(64.0, 12.0)),
        ],
    )


@pytest.fixture(scope="module")
def gsps(source: pydicom.Dataset) -> pydicom.Dataset:
    return build_gsps(evaluation(source), ALGORITHM)


def graphics(gsps: pydicom.Dataset, layer: str) -> list[pydicom.Dataset]:
    return [
        obj
        for annotation in gsps.GraphicAnnotationSequence
        if annotation.GraphicLayer == layer
        for obj in annotation.get("GraphicObjectSequence", [])
    ]


def texts(gsps: pydicom.Dataset, layer: str) -> list[str]:
    return [
        obj.UnformattedTextValue
        for annotation in gsps.GraphicAnnotationSequence
        if annotation.GraphicLayer == layer
        for obj in annotation.get("TextObjectSequence", [])
    ]


def test_gsps_passes_dciodvfy(gsps: pydicom.Dataset) -> None:
    assert dciodvfy_errors(gsps) == []


def test_gsps_of_a_ct_slice_passes_dciodvfy_and_keeps_its_window() -> None:
    slice_ = ct_series(3, rows=128, columns=128)[1]
    gsps = build_gsps(evaluation(slice_), ALGORITHM)
    assert dciodvfy_errors(gsps) == []
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == -600 and float(voi.WindowWidth) == 1500
    assert float(gsps.RescaleIntercept) == -1024


def test_gsps_references_source_and_keeps_its_window(
    gsps: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    assert gsps.SOPClassUID == GSPS_STORAGE
    assert gsps.Modality == "PR"
    assert gsps.ContentLabel == "AI_RESULT"
    series = gsps.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    image = series.ReferencedImageSequence[0]
    assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image.ReferencedSOPClassUID == source.SOPClassUID
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == float(_first(source.WindowCenter))
    assert float(voi.WindowWidth) == float(_first(source.WindowWidth))
    for annotation in gsps.GraphicAnnotationSequence:
        reference = annotation.ReferencedImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID


def _first(value: object) -> object:
    return value[0] if isinstance(value, pydicom.multival.MultiValue) else value


def test_gsps_draws_present_boxes_and_landmark_only(gsps: pydicom.Dataset) -> None:
    drawn = graphics(gsps, "AI_FINDINGS")
    polylines = [obj for obj in drawn if obj.GraphicType == "POLYLINE"]
    # Two present nodules; the one at 20% is left out of the drawing.
    assert len(polylines) == 2
    assert [float(v) for v in polylines[0].GraphicData] == [
        5.0, 6.0, 20.0, 6.0, 20.0, 30.0, 5.0, 30.0, 5.0, 6.0,
    ]  # fmt: skip
    assert all(obj.GraphicAnnotationUnits == "PIXEL" for obj in drawn)
    point = next(obj for obj in drawn if obj.GraphicType == "POINT")
    assert [float(v) for v in point.GraphicData] == [64.5, 12.5]
    circle = next(obj for obj in drawn if obj.GraphicType == "CIRCLE")
    assert [float(v) for v in circle.GraphicData][:2] == [64.5, 12.5]
    labels = texts(gsps, "AI_FINDINGS")
    assert labels == ["[1] Nodule 91%", "[2] Nodule 72%", "[4] Endotracheal tube tip 85%"]


def test_gsps_shows_notice_and_legend_with_probabilities(gsps: pydicom.Dataset) -> None:
    notice, *legend = texts(gsps, "AI_NOTICE")
    assert "AI RESULT - NOT FOR DIAGNOSTIC USE" in notice
    assert RESEARCH_DEMO_NOTICE in notice
    assert len(legend) == 4
    assert legend[2] == "[3] Nodule: 20% (negative at threshold 50%)"
    assert "CRITICAL" in legend[3]


def test_gsps_keeps_patient_study_and_uids_are_deterministic(
    gsps: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
        assert gsps[keyword].value == source[keyword].value
    assert gsps.AccessionNumber == source.AccessionNumber
    assert gsps.SeriesInstanceUID != source.SeriesInstanceUID
    assert "research demo" in gsps.SeriesDescription
    again = build_gsps(evaluation(source), ALGORITHM)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        gsps.SeriesInstanceUID,
        gsps.SOPInstanceUID,
    )
    uids = [obj.TrackingUID for obj in graphics(gsps, "AI_FINDINGS") if "TrackingUID" in obj]
    assert len(uids) == 3 and len(set(uids)) == 3
    newer = build_gsps(evaluation(source), Algorithm(ALGORITHM.name, "2.0.0"))
    assert newer.SeriesInstanceUID != gsps.SeriesInstanceUID
    assert newer.SOPInstanceUID != gsps.SOPInstanceUID


def test_gsps_inverts_monochrome1_sources() -> None:
    cxr = pytest.importorskip("dicomnode.synth.cxr")
    source = cxr.make_cxr(2, pneumothorax=False, size=128, photometric="MONOCHROME1")[0]
    gsps = build_gsps(evaluation(source), ALGORITHM)
    assert gsps.PresentationLUTShape == "INVERSE"
    assert dciodvfy_errors(gsps) == []


def test_gsps_rejects_box_outside_image(source: pydicom.Dataset) -> None:
    bad = evaluation(source)
    bad.findings[0].box = (0.0, 0.0, 129.0, 10.0)
    with pytest.raises(ValueError, match="outside"):
        build_gsps(bad, ALGORITHM)
