"""GSPS builder: dciodvfy, graphics on the source, labels, VOI kept (as the node presents the
image, whatever VOI the source has), identity and UIDs."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dciodvfy import chest_xray, ct_series, dciodvfy_errors
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.findings import Algorithm, CodedConcept, Finding, ImageFindings
from dicomnode.pipeline.presentation_values import presentation_pixels
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


@pytest.mark.parametrize(
    ("photometric", "shape", "inverse"),
    [
        ("MONOCHROME2", "INVERSE", True),  # not allowed in DX, but sent: displayed inverted
        ("MONOCHROME1", "INVERSE", True),  # one inversion, as DX requires it declared
        ("MONOCHROME2", "IDENTITY", False),
    ],
)
def test_gsps_displays_the_source_with_its_own_polarity(
    photometric: str, shape: str, inverse: bool
) -> None:
    source = chest_xray(5, size=128)
    source.PhotometricInterpretation, source.PresentationLUTShape = photometric, shape
    gsps = build_gsps(evaluation(source), ALGORITHM)
    assert gsps.PresentationLUTShape == ("INVERSE" if inverse else "IDENTITY")


def test_gsps_rejects_box_outside_image(source: pydicom.Dataset) -> None:
    bad = evaluation(source)
    bad.findings[0].box = (0.0, 0.0, 129.0, 10.0)
    with pytest.raises(ValueError, match="outside"):
        build_gsps(bad, ALGORITHM)


# The source's VOI as the field sends it: the GSPS carries the one the node presents the image
# with (first VOI LUT, else the first window when usable, else a percentile window).


def _with_voi(**attributes: object) -> pydicom.Dataset:
    source = chest_xray(5, size=128)
    for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
        if keyword in source and keyword not in attributes:
            del source[keyword]
    for keyword, value in attributes.items():
        if value is None:
            if keyword in source:
                del source[keyword]
        else:
            setattr(source, keyword, value)
    return source


def _voi_lut_item(entries: int = 4096, first_mapped: int = 0, bits: int = 12) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, bits]
    item.LUTExplanation = "NORMAL"
    table = np.round(np.linspace(0, 2**bits - 1, entries) ** 1.0).astype(np.uint16)
    item.LUTData = table.tolist()
    return item


def _voi(gsps: pydicom.Dataset) -> pydicom.Dataset:
    (voi,) = gsps.SoftcopyVOILUTSequence
    return voi


def _shown(source: pydicom.Dataset, gsps: pydicom.Dataset) -> np.ndarray:
    """The source through the GSPS's window (pydicom's VOI), 0..1, MONOCHROME2."""
    voi = _voi(gsps)
    shown = Dataset()
    shown.PhotometricInterpretation = "MONOCHROME2"
    shown.BitsStored, shown.PixelRepresentation = source.BitsStored, source.PixelRepresentation
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in voi:
            setattr(shown, keyword, voi[keyword].value)
    values = apply_modality_lut(source.pixel_array, source).astype(np.float64)
    out = apply_voi_lut(values, shown, prefer_lut=False)
    low, high = apply_voi_lut(np.array([-1e15, 1e15]), shown, prefer_lut=False)
    return (out - low) / (high - low)


VOI_CASES = {
    "window and VOI LUT": dict(
        WindowCenter=2000.0, WindowWidth=3000.0, VOILUTSequence=[_voi_lut_item()]
    ),
    "two windows, one explanation": dict(
        WindowCenter=[1500.0, 2500.0],
        WindowWidth=[1000.0, 3000.0],
        WindowCenterWidthExplanation="NORMAL",
    ),
    "two windows, two explanations": dict(
        WindowCenter=[1500.0, 2500.0],
        WindowWidth=[1000.0, 3000.0],
        WindowCenterWidthExplanation=["SOFT", "HARD"],
    ),
    "window width 0": dict(WindowCenter=2000.0, WindowWidth=0.0),
    "window width 0.5": dict(WindowCenter=2000.0, WindowWidth=0.5),
    "first of two windows width 0": dict(WindowCenter=[2000.0, 1500.0], WindowWidth=[0.0, 900.0]),
    "no window": dict(VOILUTFunction=None),
    "one window and its explanation": dict(
        WindowCenter=1800.0, WindowWidth=2400.0, WindowCenterWidthExplanation="SYNTHETIC"
    ),
}


@pytest.mark.parametrize("case", VOI_CASES)
def test_gsps_of_sources_with_real_world_voi_passes_dciodvfy(case: str) -> None:
    source = _with_voi(**VOI_CASES[case])
    gsps = build_gsps(evaluation(source), ALGORITHM)
    assert dciodvfy_errors(gsps) == []
    voi = _voi(gsps)
    # One VOI only, never a window next to a LUT.
    assert ("VOILUTSequence" in voi) != ("WindowCenter" in voi)


def test_gsps_keeps_the_first_voi_lut_and_drops_the_window_beside_it() -> None:
    source = _with_voi(**VOI_CASES["window and VOI LUT"])
    voi = _voi(build_gsps(evaluation(source), ALGORITHM))
    assert "WindowCenter" not in voi and "WindowWidth" not in voi
    (lut,) = voi.VOILUTSequence
    # A softcopy VOI LUT has 8 or 16 bits per entry: 12-bit entries are scaled to 16 bits.
    assert [int(v) for v in lut.LUTDescriptor] == [4096, 0, 16]
    assert lut.LUTExplanation == "NORMAL"
    table = np.frombuffer(lut.LUTData, dtype="<u2").astype(np.float64)
    source_table = np.array(source.VOILUTSequence[0].LUTData, dtype=np.float64)
    np.testing.assert_allclose(table / 65535, source_table / 4095, atol=1e-5)


def test_gsps_of_a_voi_lut_item_without_data_uses_the_window_as_the_model_saw_it() -> None:
    """A VOI LUT item without LUT Data is no LUT (as preprocess reads it): the GSPS shows the
    source's window instead of failing (the GSPS was not written)."""
    item = _voi_lut_item()
    del item.LUTData
    source = _with_voi(WindowCenter=2000.0, WindowWidth=3000.0, VOILUTSequence=[item])
    gsps = build_gsps(evaluation(source), ALGORITHM)
    assert dciodvfy_errors(gsps) == []
    voi = _voi(gsps)
    assert "VOILUTSequence" not in voi
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (2000.0, 3000.0)


def test_gsps_keeps_a_voi_lut_of_signed_modality_values() -> None:
    slice_ = ct_series(3, rows=128, columns=128)[1]
    slice_.VOILUTSequence = [_voi_lut_item(entries=3000, first_mapped=-1500, bits=16)]
    gsps = build_gsps(evaluation(slice_), ALGORITHM)
    assert dciodvfy_errors(gsps) == []
    (lut,) = _voi(gsps).VOILUTSequence
    assert [int(v) for v in lut.LUTDescriptor] == [3000, -1500, 16]


@pytest.mark.parametrize(
    ("case", "centre", "width", "explanation"),
    [
        ("two windows, one explanation", 1500.0, 1000.0, None),
        ("two windows, two explanations", 1500.0, 1000.0, "SOFT"),
        ("one window and its explanation", 1800.0, 2400.0, "SYNTHETIC"),
    ],
)
def test_gsps_keeps_the_first_window_and_only_its_own_explanation(
    case: str, centre: float, width: float, explanation: str | None
) -> None:
    voi = _voi(build_gsps(evaluation(_with_voi(**VOI_CASES[case])), ALGORITHM))
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (centre, width)
    # A single value, not one per letter (S\Y\N\T\H\E\T\I\C).
    assert voi.get("WindowCenterWidthExplanation") == explanation
    assert voi.VOILUTFunction == "LINEAR"


@pytest.mark.parametrize(
    "case",
    [
        "two windows, one explanation",
        "window width 0",
        "window width 0.5",
        "first of two windows width 0",
        "no window",
    ],
)
def test_gsps_window_shows_the_image_as_the_node_presents_it(case: str) -> None:
    """An unusable first window (width < 1) or none: the node's percentile window instead."""
    source = _with_voi(**VOI_CASES[case])
    gsps = build_gsps(evaluation(source), ALGORITHM)
    np.testing.assert_allclose(_shown(source, gsps), presentation_pixels(source), atol=2e-3)


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PixelSpacing", [0.2, 0.1], [2, 1]),
        ("ImagerPixelSpacing", [0.139, 0.143], [139, 143]),
        ("PixelAspectRatio", [5, 4], [5, 4]),
        ("ImagerPixelSpacing", [0.14, 0.14], [1, 1]),
    ],
)
def test_gsps_displays_non_square_pixels_in_their_aspect(
    keyword: str, value: list[float], expected: list[int]
) -> None:
    """The GSPS draws on the source, but its Displayed Area says how the source's pixels are
    shown: highdicom wrote Presentation Pixel Aspect Ratio 1\\1 for every image, which tells a
    viewer applying it to show 0.2 x 0.1 mm pixels square (the anatomy at half its height)."""
    source = chest_xray(6, size=128)
    del source.ImagerPixelSpacing
    setattr(source, keyword, value)
    gsps = build_gsps(evaluation(source), ALGORITHM)
    assert dciodvfy_errors(gsps) == []
    (area,) = gsps.DisplayedAreaSelectionSequence
    assert area.PresentationSizeMode == "SCALE TO FIT"
    assert [int(v) for v in area.PresentationPixelAspectRatio] == expected
    assert "PresentationPixelSpacing" not in area
