"""Secondary Capture overlay: validity, identity, burned-in heat map, marker and banner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from dciodvfy import chest_xray, dciodvfy_errors, plain_dx
from defective_sources import DEFECT_IDS, DEFECTS, Defect

from dicomnode.findings import Algorithm, CodedConcept, Finding, ImageFindings
from dicomnode.results.overlay import (
    COLOUR_LUT,
    HEATMAP_FLOOR,
    MAX_SIDE,
    build_overlay,
    legend_line,
    render_overlay,
)
from dicomnode.results.sr import build_sr

ALGORITHM = Algorithm(name="cxr-pneumothorax-demo", version="1.0.0")
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
CARDIOMEGALY = CodedConcept("287272002", "SCT", "Cardiomegaly")
PEAK = (80, 100)  # (column, row)


def blob(rows: int, columns: int, peak: tuple[float, float], sigma: float) -> np.ndarray:
    """A Gaussian heat map (0..1) centred on ``peak`` (column, row)."""
    row, column = np.mgrid[0:rows, 0:columns]
    distance = (column - peak[0]) ** 2 + (row - peak[1]) ** 2
    return np.exp(-distance / (2 * sigma**2)).astype(np.float32)


def findings(source: pydicom.Dataset, *, heatmap: bool = True) -> ImageFindings:
    rows, columns = int(source.Rows), int(source.Columns)
    return ImageFindings(
        source=source,
        findings=[
            Finding(
                PNEUMOTHORAX,
                probability=0.83,
                threshold=0.5,
                critical=True,
                peak=(float(PEAK[0]), float(PEAK[1])),
                heatmap=blob(rows, columns, PEAK, sigma=25) if heatmap else None,
            ),
            Finding(CARDIOMEGALY, probability=0.12, threshold=0.4, critical=False),
        ],
    )


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return chest_xray(11, size=256)


@pytest.fixture(scope="module")
def overlay(source: pydicom.Dataset) -> pydicom.Dataset:
    return build_overlay(findings(source), ALGORITHM)


def body(overlay: pydicom.Dataset, source: pydicom.Dataset) -> np.ndarray:
    """The image part of the overlay, below the header band."""
    header = int(overlay.Rows) - int(source.Rows)
    return overlay.pixel_array[header:].astype(int)


def is_grey(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])


def test_overlay_passes_dciodvfy(overlay: pydicom.Dataset) -> None:
    assert dciodvfy_errors(overlay) == []


def test_overlay_is_rgb_burned_in_and_references_source(
    overlay: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    assert overlay.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert overlay.PhotometricInterpretation == "RGB"
    assert overlay.SamplesPerPixel == 3
    assert overlay.BitsAllocated == 8
    assert overlay.BurnedInAnnotation == "YES"
    reference = overlay.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert overlay.Columns == source.Columns
    assert overlay.Rows > source.Rows  # a header band above the full image


def test_overlay_keeps_patient_and_study_in_a_new_series(
    overlay: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    assert overlay.StudyInstanceUID == source.StudyInstanceUID
    assert overlay.PatientID == source.PatientID
    assert overlay.PatientName == source.PatientName
    assert overlay.SeriesInstanceUID != source.SeriesInstanceUID
    assert overlay.SeriesNumber == 9902
    assert overlay.Manufacturer == "dicomnode"
    assert "cxr-pneumothorax-demo 1.0.0" in overlay.SeriesDescription
    assert "research demo" in overlay.SeriesDescription


def test_overlay_uids_repeat_on_rerun_and_change_with_model_version(
    overlay: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    again = build_overlay(findings(source), ALGORITHM)
    assert again.SeriesInstanceUID == overlay.SeriesInstanceUID
    assert again.SOPInstanceUID == overlay.SOPInstanceUID
    newer = build_overlay(findings(source), Algorithm(name=ALGORITHM.name, version="2.0.0"))
    assert newer.SeriesInstanceUID != overlay.SeriesInstanceUID
    assert newer.SOPInstanceUID != overlay.SOPInstanceUID
    sr = build_sr([findings(source)], ALGORITHM)
    assert sr.SeriesInstanceUID != overlay.SeriesInstanceUID


def test_overlay_colours_heat_map_around_peak_only(
    overlay: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    pixels = body(overlay, source)
    column, row = PEAK
    # 15 px below the peak: heat 0.8, clear of the marker ring.
    near = pixels[row + 15, column - 3 : column + 4]
    assert not is_grey(near).any()
    spread = np.abs(near - near.mean(axis=-1, keepdims=True)).max()
    assert spread > 40
    # Far from the blob the image is untouched grey.
    assert is_grey(pixels[-40:, -40:]).all()


def test_heat_map_is_blended_over_grey_as_in_floating_point() -> None:
    """Every (heat, grey) pair: the colour map blended over the grey with an opacity rising
    from 0.3 at the floor to 0.6 at full heat, within one level of doing it in floating point;
    under the floor the grey as it is."""
    rng = np.random.default_rng(5)
    grey = rng.random((256, 512), dtype=np.float32)
    heat = np.tile(np.linspace(0.0, 1.0, 512, dtype=np.float32), (256, 1))
    finding = Finding(PNEUMOTHORAX, probability=0.9, threshold=0.5, critical=True, heatmap=heat)
    rendered = render_overlay(grey, [finding], ALGORITHM)
    pixels = rendered[rendered.shape[0] - 256 :].astype(int)

    alpha = np.where(heat >= HEATMAP_FLOOR, 0.3 + 0.3 * (heat - HEATMAP_FLOOR) / 0.7, 0.0)
    colour = COLOUR_LUT[np.round(heat * 255).astype(int)]
    blended = (1 - alpha[..., None]) * grey[..., None].astype(float) + alpha[..., None] * colour
    expected = np.round(blended * 255).astype(int)

    assert np.abs(pixels - expected).max() <= 1
    under = heat < HEATMAP_FLOOR - 1 / 255
    assert (pixels[under] == np.round(grey[under] * 255).astype(int)[:, None]).all()
    # Full heat is mostly the colour map's dark red.
    assert (pixels[:, -1, 0] > pixels[:, -1, 1] + 40).all()


def test_overlay_without_heat_map_or_peak_leaves_image_grey(source: pydicom.Dataset) -> None:
    evaluation = findings(source, heatmap=False)
    evaluation.findings[0].peak = None
    pixels = body(build_overlay(evaluation, ALGORITHM), source)
    assert is_grey(pixels).all()


def test_overlay_marks_peak_without_heat_map(source: pydicom.Dataset) -> None:
    pixels = body(build_overlay(findings(source, heatmap=False), ALGORITHM), source)
    column, row = PEAK
    around = pixels[row - 10 : row + 11, column - 10 : column + 11]
    green = (around[..., 1] > 200) & (around[..., 0] < 80) & (around[..., 2] < 80)
    assert green.any()
    assert is_grey(pixels[-40:, -40:]).all()


def test_overlay_banner_is_burned_into_header(
    overlay: pydicom.Dataset, source: pydicom.Dataset
) -> None:
    header = overlay.pixel_array[: int(overlay.Rows) - int(source.Rows)].astype(int)
    # The banner is a dark red strip with yellow text across the top rows.
    red = (header[..., 0] == 150) & (header[..., 1] == 0) & (header[..., 2] == 0)
    assert red[:3].all()
    yellow = (header[..., 0] > 200) & (header[..., 1] > 200) & (header[..., 2] < 80)
    assert yellow[: header.shape[0] // 3].sum() > 20
    # The positive finding's legend line is drawn in orange.
    orange = (header[..., 0] > 200) & (header[..., 1] > 90) & (header[..., 1] < 190)
    assert orange.sum() > 20


def test_legend_line_states_probability_and_decision() -> None:
    positive, negative = findings(plain_dx(rows=64, columns=64), heatmap=False).findings
    assert legend_line(1, positive) == (
        "[1] Pneumothorax: 83% (POSITIVE at threshold 50%) CRITICAL"
    )
    assert legend_line(2, negative) == "[2] Cardiomegaly: 12% (negative at threshold 40%)"
    # Near the ends no output reads as certain (it read "100%" and "0%").
    sure, faint = replace(positive, probability=0.99915), replace(negative, probability=0.004)
    assert legend_line(1, sure).startswith("[1] Pneumothorax: >99% (POSITIVE")
    assert legend_line(2, faint).startswith("[2] Cardiomegaly: <1% (negative")


def test_overlay_downsamples_large_sources_keeping_aspect() -> None:
    source = plain_dx(3, rows=2600, columns=2200)
    overlay = build_overlay(findings(source), ALGORITHM)
    assert overlay.Columns == round(2200 * MAX_SIDE / 2600)
    body_rows = MAX_SIDE
    assert int(overlay.Rows) > body_rows
    header = int(overlay.Rows) - body_rows
    assert header < body_rows // 4
    assert dciodvfy_errors(overlay) == []


def test_overlay_rejects_heat_map_of_wrong_shape(source: pydicom.Dataset) -> None:
    evaluation = findings(source)
    evaluation.findings[0].heatmap = np.zeros((10, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="heat map shape"):
        build_overlay(evaluation, ALGORITHM)


def test_overlay_rejects_empty_findings(source: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="has no findings"):
        build_overlay(ImageFindings(source=source, findings=[]), ALGORITHM)


def test_overlay_rejects_a_source_that_is_not_a_dataset() -> None:
    with pytest.raises(ValueError, match="pydicom Dataset"):
        build_overlay(ImageFindings(source="image.dcm", findings=[]), ALGORITHM)


def test_overlay_shows_monochrome1_as_it_is_read() -> None:
    cxr = pytest.importorskip("dicomnode.synth.cxr")
    looks = []
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        source = cxr.make_cxr(5, pneumothorax=False, size=128, photometric=photometric)[0]
        evaluation = findings(source, heatmap=False)
        evaluation.findings[0].peak = None
        looks.append(body(build_overlay(evaluation, ALGORITHM), source))
    assert np.abs(looks[0] - looks[1]).mean() < 1.0


def _no_orientation(ds: pydicom.Dataset) -> None:
    ds.PatientOrientation = None


def _no_body_part(ds: pydicom.Dataset) -> None:
    del ds.BodyPartExamined


def _empty_laterality_without_image_laterality(ds: pydicom.Dataset) -> None:
    ds.Laterality = None
    del ds.ImageLaterality


def _left_without_body_part(ds: pydicom.Dataset) -> None:
    del ds.BodyPartExamined
    ds.ImageLaterality = "L"


@pytest.mark.parametrize(
    "vary",
    [
        _no_orientation,
        _no_body_part,
        _empty_laterality_without_image_laterality,
        _left_without_body_part,
    ],
)
def test_overlay_stays_valid_for_source_variants(vary: Callable[[pydicom.Dataset], None]) -> None:
    source = plain_dx(rows=160, columns=128)
    vary(source)
    overlay = build_overlay(findings(source, heatmap=False), ALGORITHM)
    assert dciodvfy_errors(overlay) == []


@pytest.mark.parametrize("defect", DEFECTS, ids=DEFECT_IDS)
def test_overlay_of_a_defective_source_passes_dciodvfy(defect: Defect) -> None:
    """The overlay takes only identity, study and series facts from its source: a source
    lacking what its own IOD requires (e.g. an empty Body Part Examined, which says no more
    than an absent one about laterality) still gives a valid Secondary Capture."""
    source = defect.source()
    rows, columns = int(source.Rows), int(source.Columns)
    centre = (columns / 2, rows / 2)
    heatmap = blob(rows, columns, centre, sigma=rows / 6)
    finding = Finding(PNEUMOTHORAX, 0.83, 0.5, critical=True, peak=centre, heatmap=heatmap)
    overlay = build_overlay(ImageFindings(source, [finding]), ALGORITHM)
    assert dciodvfy_errors(overlay) == []
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


NODULE = CodedConcept("27925004", "SCT", "Nodule")
TUBE_TIP = CodedConcept("RID49652", "RADLEX", "Endotracheal tube tip")
BOX = (20, 30, 60, 70)  # (col0, row0, col1, row1), half-open


def localised(source: pydicom.Dataset) -> ImageFindings:
    return ImageFindings(
        source,
        [
            Finding(NODULE, 0.9, 0.5, critical=False, box=tuple(float(v) for v in BOX)),
            Finding(NODULE, 0.2, 0.5, critical=False, box=(90.0, 90.0, 120.0, 120.0)),
            Finding(TUBE_TIP, 0.8, 0.5, critical=False, point=(100.0, 20.0)),
        ],
    )


def lung_mask(rows: int, columns: int) -> np.ndarray:
    mask = np.zeros((rows, columns), dtype=bool)
    mask[80:150, 10:70] = True
    return mask


def test_overlay_draws_boxes_landmarks_and_outlines() -> None:
    source = plain_dx(4, rows=160, columns=128)
    overlay = build_overlay(localised(source), ALGORITHM, {"Lung": lung_mask(160, 128)})
    assert dciodvfy_errors(overlay) == []
    pixels = body(overlay, source)
    orange = (pixels[..., 0] > 200) & (pixels[..., 1] > 100) & (pixels[..., 1] < 180)
    orange &= pixels[..., 2] < 60
    col0, row0, col1, row1 = BOX
    # The present box's edges are orange, its middle untouched grey.
    assert orange[row0 + 10 : row1 - 10, col0].all()
    assert orange[row1 - 1, col0 + 10 : col1 - 10].all()
    assert is_grey(pixels[row0 + 8 : row1 - 8, col0 + 8 : col1 - 8]).all()
    # The absent nodule's box is not drawn.
    assert is_grey(pixels[92:118, 90:120]).all()
    # Landmark: a green ring round (100, 20).
    around = pixels[10:31, 90:111]
    assert ((around[..., 1] > 200) & (around[..., 0] < 80) & (around[..., 2] < 80)).any()
    # The lung outline is cyan on the mask's edge only.
    cyan = (pixels[..., 0] < 40) & (pixels[..., 1] > 220) & (pixels[..., 2] > 220)
    assert cyan[80, 20:60].all() and cyan[149, 20:60].all() and cyan[90:140, 10].all()
    assert not cyan[90:140, 15:65].any()
    # The legend names the outline in its colour.
    header = overlay.pixel_array[: int(overlay.Rows) - int(source.Rows)].astype(int)
    assert ((header[..., 0] < 40) & (header[..., 1] > 200) & (header[..., 2] > 200)).sum() > 10


def test_overlay_scales_boxes_and_outlines_with_large_sources() -> None:
    source = plain_dx(6, rows=2600, columns=2200)
    mask = np.zeros((2600, 2200), dtype=bool)
    mask[1000:2000, 200:1000] = True
    evaluation = ImageFindings(
        source, [Finding(NODULE, 0.9, 0.5, critical=False, box=(1300.0, 1300.0, 1800.0, 1900.0))]
    )
    overlay = build_overlay(evaluation, ALGORITHM, {"Lung": mask})
    scale = MAX_SIDE / 2600
    pixels = overlay.pixel_array[int(overlay.Rows) - MAX_SIDE :].astype(int)
    orange = (pixels[..., 0] > 200) & (pixels[..., 1] > 100) & (pixels[..., 1] < 180)
    assert orange[round(1600 * scale), round(1300 * scale)]
    cyan = (pixels[..., 0] < 40) & (pixels[..., 1] > 220) & (pixels[..., 2] > 220)
    assert cyan[round(1500 * scale), round(200 * scale)]
    assert not cyan[round(1500 * scale), round(600 * scale)]


def test_overlay_rejects_masks_of_wrong_shape(source: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="segmentation mask 'Lung' has shape"):
        build_overlay(findings(source), ALGORITHM, {"Lung": np.ones((10, 10), dtype=bool)})


def test_ct_overlay_is_drawn_in_the_models_window_not_the_images_own() -> None:
    """A nodule detector sees a lung window; a CT slice stored with a soft-tissue window shows
    the lung black. Its overlay is the picture the model saw, with the box on it."""
    from dciodvfy import ct_series

    from dicomnode.pipeline.presentation_values import presentation_pixels

    source = ct_series(3, rows=64, columns=64)[1]
    source.WindowCenter, source.WindowWidth = 40, 400  # soft tissue: lung (-850 HU) is black
    lung_window = (-600.0, 1500.0)
    box = (12.0, 20.0, 24.0, 40.0)
    evaluation = ImageFindings(source, [Finding(NODULE, 0.9, 0.5, critical=False, box=box)])
    overlay = build_overlay(evaluation, ALGORITHM, window=lung_window)
    assert dciodvfy_errors(overlay) == []
    assert "model's window (centre -600, width 1500)" in overlay.DerivationDescription
    pixels = body(overlay, source)
    grey = np.rint(presentation_pixels(source, window=lung_window) * 255)
    # Away from the box and its number (drawn over a black rim), the picture is the window's.
    untouched = np.ones(grey.shape, dtype=bool)
    untouched[8:44, 8:28] = False
    assert np.array_equal(pixels[..., 0][untouched], grey[untouched])
    assert is_grey(pixels[untouched]).all()
    # The left lung (inside the box, below the nodule) is a dark grey, not black.
    lung = pixels[34:38, 15:21, 0]
    assert is_grey(pixels[34:38, 15:21]).all() and 10 < lung.mean() < 100
    # Without the card's window the image's own soft-tissue window shows it black.
    own = body(build_overlay(evaluation, ALGORITHM), source)
    assert own[34:38, 15:21, 0].max() == 0


@pytest.mark.parametrize("width", [256, 512, 2048])
def test_the_research_demo_notice_is_written_whole_in_a_small_overlay(width: int) -> None:
    """Every line naming the model fits the header's width, and the research demo notice is
    among them whole: in a 256 px CT overlay the one line was cut to 'Research demo, not
    for' even at the smallest font."""
    from dicomnode import RESEARCH_DEMO_NOTICE
    from dicomnode.findings import Algorithm
    from dicomnode.results.overlay import model_lines

    room = width - 2 * max(4, width // 100)
    demo = Algorithm("ct-nodule-demo", "1.0.0")
    lines, font = model_lines(demo, room, round(width / 40))
    assert all(font.getlength(line) <= room for line in lines), (lines, font.size)
    assert any(line.endswith(RESEARCH_DEMO_NOTICE) for line in lines), lines
    assert len(lines) == (2 if width == 256 else 1), lines
    clinical = Algorithm("ct-nodule", "2.0.0", research_demo=False)
    (line,), font = model_lines(clinical, room, round(width / 40))
    assert RESEARCH_DEMO_NOTICE not in line and font.getlength(line) <= room


def _spacing(keyword: str, value: list[float]) -> Callable[[pydicom.Dataset], None]:
    def state(ds: pydicom.Dataset) -> None:
        del ds.ImagerPixelSpacing
        setattr(ds, keyword, value)

    return state


# (how the source states its pixels' aspect, pixels' height / width)
NON_SQUARE = [
    pytest.param(_spacing("PixelSpacing", [0.2, 0.1]), 2.0, id="PixelSpacing 0.2 x 0.1"),
    pytest.param(_spacing("ImagerPixelSpacing", [0.1, 0.25]), 0.4, id="ImagerPixelSpacing wide"),
    pytest.param(_spacing("PixelAspectRatio", [2, 1]), 2.0, id="PixelAspectRatio 2:1"),
]


@pytest.mark.parametrize(("state", "aspect"), NON_SQUARE)
def test_overlay_of_non_square_pixels_is_resampled_to_square_ones(
    state: Callable[[pydicom.Dataset], None], aspect: float
) -> None:
    """A Secondary Capture has no Pixel Spacing: the overlay of pixels twice as high as wide
    (160 rows x 256 columns, 32 x 25.6 mm at 0.2 x 0.1 mm) is written in square pixels of the
    finer spacing (320 x 256), so that viewers and the study page show the anatomy in its shape,
    as they show the source; it was written 160 x 256, squashed to half its height."""
    source = plain_dx(7, rows=160, columns=256)
    state(source)
    peak = (100.0, 60.0)  # (column, row) in the source's pixels
    heatmap = blob(160, 256, peak, sigma=12)
    finding = Finding(PNEUMOTHORAX, 0.83, 0.5, critical=True, peak=peak, heatmap=heatmap)
    overlay = build_overlay(ImageFindings(source, [finding]), ALGORITHM)
    assert dciodvfy_errors(overlay) == []

    rows, columns = (round(160 * aspect), 256) if aspect > 1 else (160, round(256 / aspect))
    assert int(overlay.Columns) == columns
    header = int(overlay.Rows) - rows
    assert 0 < header < max(rows, columns) // 4  # a band above the whole image
    # Square pixels: no Pixel Aspect Ratio, and none needed (Image Pixel module, Type 1C).
    assert "PixelAspectRatio" not in overlay and "PixelSpacing" not in overlay
    assert "square pixels" in overlay.DerivationDescription
    assert "research demo" in overlay.DerivationDescription
    # The heat map and the marker lie where the peak lies on the resampled image.
    pixels = overlay.pixel_array[header:].astype(int)
    column = round((peak[0] + 0.5) * columns / 256 - 0.5)
    row = round((peak[1] + 0.5) * rows / 160 - 0.5)
    red = pixels[..., 0] - pixels[..., 2]
    hot_rows, hot_columns = np.nonzero(red > 60)
    assert abs(np.median(hot_rows) - row) <= 3 and abs(np.median(hot_columns) - column) <= 3
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    green_rows, green_columns = np.nonzero(green)
    # The marker's ring (its number is drawn to its right) is round, centred on the peak.
    radius = (green_rows.max() - green_rows.min()) / 2
    assert abs(green_rows.min() + radius - row) <= 2
    assert abs(green_columns.min() + radius - column) <= 2
    assert is_grey(pixels[-20:, -20:]).all()


def test_overlay_of_non_square_pixels_stays_within_the_largest_side() -> None:
    source = plain_dx(8, rows=1500, columns=1200)
    source.ImagerPixelSpacing = [0.2, 0.1]  # 300 x 120 mm
    evaluation = findings(source, heatmap=False)
    overlay = build_overlay(evaluation, ALGORITHM)
    body_rows, columns = MAX_SIDE, round(1200 * MAX_SIDE / 3000)
    assert int(overlay.Columns) == columns
    assert int(overlay.Rows) > body_rows and int(overlay.Rows) - body_rows < body_rows // 4
    assert "from 1500 x 1200 to 2048 x 819 square pixels" in overlay.DerivationDescription
