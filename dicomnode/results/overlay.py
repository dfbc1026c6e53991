"""Secondary Capture overlay: the source image as read, with heat maps and findings burned in,
in square pixels (a source of non-square ones resampled: see ``square_pixel_scale``)."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import EQUIPMENT_MANUFACTURER, RESEARCH_DEMO_NOTICE, __version__
from dicomnode.findings import Algorithm, Finding, ImageFindings, probability_text
from dicomnode.pipeline.decode import GREY
from dicomnode.pipeline.letterbox import pixel_aspect
from dicomnode.pipeline.presentation_values import presentation_pixels
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.source import (
    character_set,
    copy_laterality,
    copy_patient_study,
    source_reference,
)
from dicomnode.results.sr import (
    series_description,
    validate_evaluation,
    with_notice,
)
from dicomnode.results.uids import result_instance_uid, result_series_uid

OVERLAY_SERIES_NUMBER = 9902
BANNER = "AI RESULT - NOT FOR DIAGNOSTIC USE"
MAX_SIDE = 2048  # longest side of the overlay; larger sources are downsampled
HEATMAP_FLOOR = 0.3  # heat below this is not drawn, so the anatomy stays readable

# Jet-like colour map: (position, red, green, blue), interpolated into a 256-entry LUT.
_JET = np.array(
    [
        (0.000, 0.0, 0.0, 0.5),
        (0.125, 0.0, 0.0, 1.0),
        (0.375, 0.0, 1.0, 1.0),
        (0.625, 1.0, 1.0, 0.0),
        (0.875, 1.0, 0.0, 0.0),
        (1.000, 0.5, 0.0, 0.0),
    ]
)
_POSITIONS = np.linspace(0.0, 1.0, 256)
COLOUR_LUT = np.stack(
    [np.interp(_POSITIONS, _JET[:, 0], _JET[:, channel]) for channel in (1, 2, 3)], axis=1
)


def _heat_on_grey() -> np.ndarray:
    """RGB uint8 of every (heat level, grey level) pair, heat and grey quantised to 256 levels:
    the grey itself where the heat is under the floor, above it the colour map blended over the
    grey with an opacity that grows with the heat (the strongest evidence stands out most)."""
    heat = (np.arange(256) / 255)[:, None, None]
    grey = (np.arange(256) / 255)[None, :, None]
    alpha = np.where(heat >= HEATMAP_FLOOR, 0.3 + 0.3 * (heat - HEATMAP_FLOOR) / 0.7, 0.0)
    blended = (1.0 - alpha) * grey + alpha * COLOUR_LUT[:, None, :]
    rgbx = np.full((256, 256, 4), 255, dtype=np.uint8)
    rgbx[..., :3] = np.round(blended * 255)
    return rgbx.reshape(256 * 256, 4).view(np.uint32)[:, 0]


# A pixel's colour is one lookup of (heat level << 8) | grey level, as RGBX packed in 32 bits
# (Pillow's own layout of RGB): within one level of blending the image in floating point.
HEAT_ON_GREY = _heat_on_grey()

_BANNER_COLOUR = (255, 255, 0)
_BANNER_BACKGROUND = (150, 0, 0)
_MODEL_COLOUR = (200, 200, 200)
_POSITIVE_COLOUR = (255, 140, 0)
_NEGATIVE_COLOUR = (255, 255, 255)
_MARKER_COLOUR = (0, 255, 0)
_BOX_COLOUR = (255, 140, 0)
# Outline colours of segmentation masks, in the order the masks are given.
_OUTLINE_COLOURS = ((0, 255, 255), (255, 0, 255), (80, 160, 255), (255, 255, 0), (160, 255, 80))


def build_overlay(
    evaluation: ImageFindings,
    algorithm: Algorithm,
    segmentation_masks: dict[str, np.ndarray] | None = None,
    *,
    window: tuple[float, float] | None = None,
) -> pydicom.Dataset:
    """Return an RGB Secondary Capture of the source image with ``evaluation`` burned in.

    Heat maps, CAM peaks, detection boxes and landmarks of present findings are drawn, and
    ``segmentation_masks`` (name -> rows x columns boolean mask, e.g. {"Lung": mask}) as
    outlines named in the legend. ``window``: the model card's fixed window (centre, width in
    modality units, ``InputSpec.window``, e.g. a CT lung window) when it has one, so that the
    findings are drawn on the picture the model saw rather than in the image's own window
    (e.g. a soft-tissue window, where the lung is black); greyscale sources only.
    """
    source = validate_evaluation(evaluation, allow_empty=bool(segmentation_masks))
    masks = _checked_masks(segmentation_masks or {}, int(source.Rows), int(source.Columns))
    # Colour sources (e.g. a chest X-ray scanned or captured as an RGB secondary capture) are
    # drawn on their grey presentation.
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(
            f"build_overlay needs a single-frame source; SOP Instance UID "
            f"{source.SOPInstanceUID} has NumberOfFrames={source.get('NumberOfFrames')}"
        )
    if window is not None and str(source.get("PhotometricInterpretation", "")) not in GREY:
        window = None  # a colour image has no modality units (the model could not have run)
    window = None if window is None else (float(window[0]), float(window[1]))
    grey = _presentation(source, window)
    scale = square_pixel_scale(grey.shape, pixel_aspect(source))
    rgb = render_overlay(grey, evaluation.findings, algorithm, scale=scale, masks=masks)

    # The source's header as the overlay takes it over: invalid values emptied or left out.
    reference = sanitised_reference(source)
    orientation = [str(value) for value in reference.get("PatientOrientation") or []]
    overlay = hd.sc.SCImage.from_ref_dataset(
        **character_set(reference),
        ref_dataset=reference,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_series_uid(str(source.StudyInstanceUID), algorithm, "sc"),
        series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=result_instance_uid([str(source.SOPInstanceUID)], algorithm, "sc"),
        instance_number=int(reference.get("InstanceNumber") or 1),
        manufacturer=EQUIPMENT_MANUFACTURER,
        # Placeholder when the source has none; replaced by an empty value below.
        patient_orientation=tuple(orientation) if len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(algorithm, "SC overlay"),
        software_versions=f"dicomnode {__version__}",
    )
    if len(orientation) != 2:
        overlay.PatientOrientation = None
    copy_patient_study(reference, overlay)
    copy_laterality(reference, overlay)
    overlay.BurnedInAnnotation = "YES"
    resized = _resized_text(grey.shape, scale, pixel_aspect(source))
    shown = (
        "Source image as displayed (modality and VOI LUT)"
        if window is None
        else f"Source image in the model's window (centre {window[0]:g}, width {window[1]:g})"
    )
    overlay.DerivationDescription = with_notice(
        f"{shown}{resized}, with a header band above "
        f"it; heat maps, markers, boxes, outlines and findings of {algorithm.name} "
        f"{algorithm.version} burned in",
        algorithm,
        1024,
    )
    overlay.ImageComments = with_notice(
        f"{BANNER}: AI result of {algorithm.name} {algorithm.version}, not verified by a physician",
        algorithm,
        10240,
    )
    overlay.SourceImageSequence = [source_reference(source)]
    return overlay


def square_pixel_scale(shape: tuple[int, int], aspect: float) -> tuple[float, float]:
    """(row scale, column scale) that draws a rows x columns image whose pixels are ``aspect``
    times as high as wide (``pixel_aspect``) in square pixels, at most MAX_SIDE on its long
    side: the axis of the coarser spacing is resampled to the finer one (no detail lost), then
    both are scaled down together if the result is too large.

    The overlay is a Secondary Capture without Pixel Spacing: resampled to square pixels it
    shows the anatomy in its shape in every viewer and in the study page's preview, as the
    source is shown. Pixel Aspect Ratio (0028,0034) would instead rely on each viewer honouring
    it (many show an SC's pixels square) and would stretch the burned-in text and markers
    along with the image in those that do."""
    rows, columns = shape
    height, width = rows * max(aspect, 1.0), columns * max(1.0 / aspect, 1.0)
    fit = min(1.0, MAX_SIDE / max(height, width))
    return (
        max(1, round(height * fit)) / rows,
        max(1, round(width * fit)) / columns,
    )


def _resized_text(shape: tuple[int, int], scale: tuple[float, float], aspect: float) -> str:
    """What the Derivation Description says of the overlay's size: '' when it is the source's."""
    rows, columns = shape
    if aspect != 1.0:
        return (
            f", resampled from {rows} x {columns} to {round(rows * scale[0])} x "
            f"{round(columns * scale[1])} square pixels (the source's are {aspect:.4g} times "
            "as high as wide)"
        )
    return f", downsampled x{scale[0]:.3g}" if scale[0] < 1 else ""


# Every model's overlay of one image starts from the same presentation of it (decoding, LUTs,
# percentile window: ~0.15 s at 2048 px), so it is kept, per window, while that Dataset object
# lives and its Pixel Data is the same object (result builders never change their source).
_Window = tuple[float, float] | None
_presented: dict[int, tuple[weakref.ref, object, dict[_Window, np.ndarray]]] = {}
_presented_lock = threading.Lock()


def _presentation(source: pydicom.Dataset, window: _Window = None) -> np.ndarray:
    key, pixel_data = id(source), source.get("PixelData")
    with _presented_lock:
        kept = _presented.get(key)
        if kept is not None and kept[0]() is source and kept[1] is pixel_data:
            grey = kept[2].get(window)
            if grey is not None:
                return grey
    grey = np.asarray(presentation_pixels(source, window=window), dtype=np.float32)
    grey.setflags(write=False)
    with _presented_lock:
        kept = _presented.get(key)
        if kept is None or kept[0]() is not source or kept[1] is not pixel_data:
            # Gone with the Dataset: the callback runs before its id can be reused.
            gone = weakref.ref(source, lambda _, key=key: _presented.pop(key, None))
            kept = (gone, pixel_data, {})
            _presented[key] = kept
        kept[2][window] = grey
    return grey


def render_overlay(
    grey: np.ndarray,
    findings: list[Finding],
    algorithm: Algorithm,
    *,
    scale: float | tuple[float, float] = 1.0,
    masks: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Return RGB uint8 pixels: a header band above ``grey`` (0..1) with the findings drawn.

    ``scale``: the image's size in the overlay, one factor (at most 1) or (rows, columns)
    factors (``square_pixel_scale``: either may enlarge, up to 10, to make pixels square);
    findings given in the source's pixels are drawn where they lie on the resampled image."""
    if grey.ndim != 2 or not np.all(np.isfinite(grey)):
        raise ValueError(f"grey must be a finite 2-D image, got shape {grey.shape}")
    if isinstance(scale, tuple):
        row_scale, column_scale = (float(value) for value in scale)
        if not (0 < row_scale <= 10 and 0 < column_scale <= 10):
            raise ValueError(f"scale factors must be in (0, 10], got {scale}")
    elif not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    else:
        row_scale = column_scale = float(scale)
    rows, columns = grey.shape
    size = (max(1, round(columns * column_scale)), max(1, round(rows * row_scale)))
    resized = size != (columns, rows)
    # BOX (each pixel the mean of those it covers) to shrink; bilinear where an axis grows.
    resample = (
        Image.Resampling.BOX
        if size[0] <= columns and size[1] <= rows
        else Image.Resampling.BILINEAR
    )
    if resized:
        grey = _resize(grey, size, resample)

    # Only positive findings are localised: a heat map on a negative finding would mislead.
    heatmaps = [f.heatmap for f in findings if f.heatmap is not None and f.present]
    index = _levels(grey)
    if heatmaps:
        heat = np.asarray(heatmaps[0], dtype=np.float32)
        for other in heatmaps[1:]:
            heat = np.maximum(heat, np.asarray(other, dtype=np.float32))
        if resized:
            heat = _resize(heat, size, resample)
        index |= _levels(heat) << 8
    pixels = HEAT_ON_GREY[index]
    outlines = []
    for (name, mask), colour in zip((masks or {}).items(), _OUTLINE_COLOURS * 4, strict=False):
        if resized:
            mask = _resize(np.asarray(mask, dtype=np.float32), size, resample) >= 0.5
        edge = _outline(np.asarray(mask, dtype=bool), max(1, round(max(size) / 400)))
        pixels[edge] = np.array([*colour, 255], dtype=np.uint8).view(np.uint32)[0]
        outlines.append((name, colour))

    # RGBX: the fourth byte is padding.
    body = Image.frombuffer("RGBX", size, pixels, "raw", "RGBX", 0, 1)
    long_side = max(body.size)
    draw = ImageDraw.Draw(body)
    for number, finding in enumerate(findings, start=1):
        if not finding.present:
            continue
        if finding.box is not None:
            column0, row0, column1, row1 = finding.box
            box = (
                column0 * column_scale,
                row0 * row_scale,
                column1 * column_scale,
                row1 * row_scale,
            )
            _draw_box(draw, box, number, long_side)
        for place in (finding.point, finding.peak):
            if place is not None:
                # Pixel centres: the centre of source pixel c lies at (c + 0.5) * scale - 0.5.
                column, row = place
                centre = ((column + 0.5) * column_scale - 0.5, (row + 0.5) * row_scale - 0.5)
                _draw_marker(draw, centre, number, long_side)

    header = np.asarray(_header(findings, algorithm, width=body.size[0], outlines=outlines))
    canvas = np.empty((header.shape[0] + body.size[1], body.size[0], 3), dtype=np.uint8)
    canvas[: header.shape[0]] = header
    # Pillow packs RGBX to RGB much faster than numpy copies every fourth byte out.
    packed = np.frombuffer(body.tobytes("raw", "RGB"), dtype=np.uint8)
    canvas[header.shape[0] :] = packed.reshape(body.size[1], body.size[0], 3)
    return canvas


def _levels(values: np.ndarray) -> np.ndarray:
    """Values of 0..1 (clipped) as 256 levels, rounded half to even."""
    scaled = np.multiply(values, 255, dtype=np.float32)
    np.clip(scaled, 0, 255, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint16)


def legend_line(number: int, finding: Finding) -> str:
    """Return the legend text of one finding, e.g. "[1] Pneumothorax: 83% (POSITIVE at 50%)"."""
    decision = "POSITIVE" if finding.present else "negative"
    critical = " CRITICAL" if finding.present and finding.critical else ""
    return (
        f"[{number}] {finding.concept.meaning}: {probability_text(finding.probability)} "
        f"({decision} at threshold {finding.threshold:.0%}){critical}"
    )


def _resize(
    values: np.ndarray,
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BOX,
) -> np.ndarray:
    image = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, resample), dtype=np.float32)


def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=max(8, size))
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; the overlay needs scalable text")
    return font


def _fitting_font(lines: list[str], size: int, room: float) -> ImageFont.FreeTypeFont:
    size = max(10, size)
    font = _font(size)
    while size > 8 and max(font.getlength(text) for text in lines) > room:
        size -= 1
        font = _font(size)
    return font


def _checked_masks(masks: dict[str, np.ndarray], rows: int, columns: int) -> dict[str, np.ndarray]:
    checked = {}
    for name, mask in masks.items():
        array = np.asarray(mask)
        if not isinstance(name, str) or not name:
            raise ValueError(f"segmentation mask names must be non-empty str, got {name!r}")
        if array.shape != (rows, columns):
            raise ValueError(
                f"segmentation mask {name!r} has shape {array.shape}, the image is "
                f"(rows, columns) = {(rows, columns)}"
            )
        checked[name] = array.astype(bool)
    return checked


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Return the pixels of ``mask`` within ``width`` pixels of its edge (4-neighbourhood)."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _draw_box(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, ...],
    number: int,
    long_side: int,
) -> None:
    column0, row0, column1, row1 = box
    width = max(2, round(long_side / 300))
    # Half-open box: the last pixel inside is one before column1/row1.
    outline = (column0, row0, max(column0, column1 - 1), max(row0, row1 - 1))
    draw.rectangle(outline, outline=(0, 0, 0), width=width + 2)
    draw.rectangle(outline, outline=_BOX_COLOUR, width=width)
    size = max(10, round(long_side / 40))
    draw.text(
        (column0, max(0, row0 - size - width)),
        str(number),
        fill=_BOX_COLOUR,
        font=_font(size),
        stroke_width=1,
        stroke_fill=(0, 0, 0),
    )


def _draw_marker(
    draw: ImageDraw.ImageDraw, centre: tuple[float, float], number: int, long_side: int
) -> None:
    column, row = centre
    radius = max(6, round(long_side / 50))
    width = max(2, radius // 5)
    box = (column - radius, row - radius, column + radius, row + radius)
    # A dark ring under the bright one keeps the marker visible on bright and dark anatomy.
    draw.ellipse(box, outline=(0, 0, 0), width=width + 2)
    draw.ellipse(box, outline=_MARKER_COLOUR, width=width)
    draw.line((column - radius / 3, row, column + radius / 3, row), fill=_MARKER_COLOUR, width=1)
    draw.line((column, row - radius / 3, column, row + radius / 3), fill=_MARKER_COLOUR, width=1)
    draw.text(
        (column + radius + width, row - radius),
        str(number),
        fill=_MARKER_COLOUR,
        font=_font(round(radius * 1.4)),
        stroke_width=1,
        stroke_fill=(0, 0, 0),
    )


def model_lines(
    algorithm: Algorithm, room: float, size: int
) -> tuple[list[str], ImageFont.FreeTypeFont]:
    """The header's lines naming the model (and, for a research demo, saying so) and their
    font, fitted to ``room`` pixels from ``size`` down: one line where it fits, else the
    research demo notice on a line of its own (in a 256 px CT overlay even the smallest font
    cut it to "Research demo, not for")."""
    identity = f"{algorithm.name} {algorithm.version} ({algorithm.manufacturer})"
    if not algorithm.research_demo:
        return [identity], _fitting_font([identity], size, room)
    lines = [f"{identity} - {RESEARCH_DEMO_NOTICE}"]
    font = _fitting_font(lines, size, room)
    if font.getlength(lines[0]) > room:
        lines = [identity, RESEARCH_DEMO_NOTICE]
        font = _fitting_font(lines, size, room)
    return lines, font


def _header(
    findings: list[Finding],
    algorithm: Algorithm,
    *,
    width: int,
    outlines: Sequence[tuple[str, tuple[int, int, int]]] = (),
) -> Image.Image:
    legend = [
        (legend_line(number, finding), _POSITIVE_COLOUR if finding.present else _NEGATIVE_COLOUR)
        for number, finding in enumerate(findings, start=1)
    ]
    legend += [(f"Outline: {name}", colour) for name, colour in outlines]
    # Many labels go into columns so that the header stays a small part of the image.
    columns = 1 if len(legend) <= 5 else 2 if len(legend) <= 12 else 3
    per_column = math.ceil(len(legend) / columns)
    margin = max(4, width // 100)
    column_width = (width - 2 * margin) / columns
    # Fonts sized to the image, then shrunk until every line fits its place.
    banner_font = _fitting_font([BANNER], round(width / 32), width - 2 * margin)
    model, font = model_lines(algorithm, width - 2 * margin, round(width / 40))
    font = _fitting_font([text for text, _ in legend], font.size, column_width - margin)
    size = font.size
    spacing = round(size * 1.3)
    banner_height = round(banner_font.size * 1.3) + 2 * margin
    height = banner_height + margin + spacing * (len(model) + per_column)
    header = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(header)
    draw.rectangle((0, 0, width - 1, banner_height - 1), fill=_BANNER_BACKGROUND)
    draw.text(
        (margin, margin),
        BANNER,
        fill=_BANNER_COLOUR,
        font=banner_font,
        stroke_width=1 if banner_font.size >= 16 else 0,
        stroke_fill=_BANNER_COLOUR,
    )
    for line, text in enumerate(model):
        draw.text((margin, banner_height + line * spacing), text, fill=_MODEL_COLOUR, font=font)
    for index, (text, colour) in enumerate(legend):
        column, row = divmod(index, per_column)
        position = (margin + column * column_width, banner_height + (len(model) + row) * spacing)
        draw.text(position, text, fill=colour, font=font)
    return header
