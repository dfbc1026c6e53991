"""Grayscale Softcopy Presentation State: a model's boxes and landmarks drawn over the source."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

from dicomnode import EQUIPMENT_MANUFACTURER, RESEARCH_DEMO_NOTICE, __version__
from dicomnode.findings import Algorithm, Finding, ImageFindings, probability_text
from dicomnode.pipeline.letterbox import pixel_aspect_ratio
from dicomnode.pipeline.presentation_values import (
    first_window,
    is_inverted,
    lut_item,
    percentile_window,
    voi_lut_table,
)
from dicomnode.results.geometry import box_outline, pixel_centre
from dicomnode.results.overlay import BANNER, legend_line
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.source import character_set, copy_laterality, copy_patient_study
from dicomnode.results.sr import (
    ordinals,
    series_description,
    validate_evaluation,
    with_notice,
)
from dicomnode.results.uids import result_instance_uid, result_series_uid, result_uid

GSPS_SERIES_NUMBER = 9904
CONTENT_LABEL = "AI_RESULT"
FINDINGS_LAYER = "AI_FINDINGS"
NOTICE_LAYER = "AI_NOTICE"
# CIELab display colours (L*, a*, b*): orange-ish for findings, yellow for the notice.
_FINDINGS_COLOUR = hd.color.CIELabColor(70.0, 40.0, 70.0)
_NOTICE_COLOUR = hd.color.CIELabColor(95.0, -10.0, 90.0)
_LINE_HEIGHT = 0.035  # DISPLAY units: fraction of the displayed area's height per text line
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def build_gsps(
    evaluation: ImageFindings,
    algorithm: Algorithm,
    *,
    window: tuple[float, float] | None = None,
) -> pydicom.Dataset:
    """Return a GSPS that draws ``evaluation``'s present boxes and landmarks on its source.

    Boxes become closed POLYLINE rectangles and landmarks a POINT in a CIRCLE, each labelled
    with the finding and its probability; a notice and a legend of every finding sit in the
    top left corner. The source's modality LUT is kept, and its VOI as the node presents the
    image (see :func:`voi_transformation`), or ``window``: the model card's fixed window
    (centre, width in modality units, e.g. a CT lung window), the picture the model saw, as
    the overlay shows it.
    """
    source = validate_evaluation(evaluation)
    if int(source.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(
            f"build_gsps needs a greyscale source; SOP Instance UID {source.SOPInstanceUID} "
            f"has SamplesPerPixel={source.SamplesPerPixel}"
        )
    # The source's header as the presentation state takes it over (invalid values emptied or
    # left out); its pixels and LUTs are read from the source itself.
    reference = sanitised_reference(source)
    findings_layer = hd.pr.GraphicLayer(
        layer_name=FINDINGS_LAYER,
        order=1,
        description=f"Findings of {algorithm.name} {algorithm.version}"[:64],
        display_color=_FINDINGS_COLOUR,
    )
    notice_layer = hd.pr.GraphicLayer(
        layer_name=NOTICE_LAYER,
        order=2,
        description="AI result notice and legend",
        display_color=_NOTICE_COLOUR,
    )
    graphics: list[hd.pr.GraphicObject] = []
    labels: list[hd.pr.TextObject] = []
    rows, columns = int(source.Rows), int(source.Columns)
    radius = max(3.0, max(rows, columns) / 80)
    numbered = zip(evaluation.findings, ordinals(evaluation.findings), strict=True)
    for number, (finding, ordinal) in enumerate(numbered, start=1):
        if not finding.present or (finding.box is None and finding.point is None):
            continue
        tracking = _tracking(source, finding, ordinal, algorithm)
        text = f"[{number}] {finding.concept.meaning} {probability_text(finding.probability)}"
        if finding.box is not None:
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=box_outline(finding.box),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    tracking_id=text[:64],
                    tracking_uid=tracking,
                )
            )
            anchor = (float(finding.box[0]), float(finding.box[1]))
        else:
            centre = pixel_centre(finding.point)
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POINT,
                    graphic_data=centre,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    tracking_id=text[:64],
                    tracking_uid=tracking,
                )
            )
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
                    graphic_data=_circle(centre[0], radius, columns),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                )
            )
            anchor = (float(centre[0][0]), float(centre[0][1]))
        labels.append(
            hd.pr.TextObject(
                text_value=text[:1024],
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=anchor,
                anchor_point_visible=False,
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
    annotations = [
        hd.pr.GraphicAnnotation(
            referenced_images=[reference],
            graphic_layer=notice_layer,
            text_objects=_legend(evaluation.findings, algorithm),
        )
    ]
    if graphics:
        annotations.insert(
            0,
            hd.pr.GraphicAnnotation(
                referenced_images=[reference],
                graphic_layer=findings_layer,
                graphic_objects=graphics,
                text_objects=labels,
            ),
        )
    presentation_lut = None
    if is_inverted(source):
        # Keep the source's "low values are white" look after the VOI window.
        presentation_lut = hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
        )
    study_uid = str(source.StudyInstanceUID)
    description = with_notice(f"AI {algorithm.name} {algorithm.version}", algorithm)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        **character_set(reference),
        referenced_images=[reference],
        series_instance_uid=result_series_uid(study_uid, algorithm, "gsps"),
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=result_instance_uid([str(source.SOPInstanceUID)], algorithm, "gsps"),
        instance_number=int(reference.get("InstanceNumber") or 1),
        manufacturer=EQUIPMENT_MANUFACTURER,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=f"dicomnode {__version__}",
        device_serial_number=algorithm.version[:64],
        content_label=CONTENT_LABEL,
        content_description=description,
        graphic_annotations=annotations,
        graphic_layers=[findings_layer, notice_layer],
        presentation_lut_transformation=presentation_lut,
        voi_lut_transformations=[voi_transformation(source, window)],
        series_description=series_description(algorithm, "GSPS"),
    )
    copy_patient_study(reference, gsps)
    copy_laterality(reference, gsps)
    # highdicom writes Presentation Pixel Aspect Ratio 1\1 whatever the image: a viewer
    # applying the GSPS would show pixels of 0.2 x 0.1 mm as square (the anatomy squashed to
    # half its height). The source's own aspect (Displayed Area module, PS3.3 C.10.4: required
    # where Presentation Pixel Spacing is absent) shows it as without the GSPS.
    aspect = pixel_aspect_ratio(source)
    if aspect is not None:
        for area in gsps.DisplayedAreaSelectionSequence:
            area.PresentationPixelAspectRatio = list(aspect)
    return gsps


def _tracking(source: pydicom.Dataset, finding: Finding, ordinal: int, algorithm: Algorithm) -> str:
    return result_uid(
        "gsps-graphic",
        str(source.SOPInstanceUID),
        finding.concept.scheme,
        finding.concept.value,
        str(ordinal),
        algorithm.manufacturer,
        algorithm.name,
        algorithm.version,
    )


def _circle(centre: np.ndarray, radius: float, columns: int) -> np.ndarray:
    # CIRCLE is (centre, a point on the circumference); keep that point inside the image.
    column, row = float(centre[0]), float(centre[1])
    edge = column + radius if column + radius <= columns else column - radius
    return np.array([[column, row], [max(0.0, edge), row]], dtype=float)


def _legend(findings: list[Finding], algorithm: Algorithm) -> list[hd.pr.TextObject]:
    notice = f"{BANNER} - {algorithm.name} {algorithm.version}"
    if algorithm.research_demo:
        notice += f" - {RESEARCH_DEMO_NOTICE}"
    lines = [notice] + [
        legend_line(number, finding) for number, finding in enumerate(findings, start=1)
    ]
    return [
        hd.pr.TextObject(
            text_value=text[:1024],
            units=hd.pr.AnnotationUnitsValues.DISPLAY,
            bounding_box=(
                0.01,
                0.01 + index * _LINE_HEIGHT,
                0.99,
                0.01 + (index + 1) * _LINE_HEIGHT,
            ),
            text_justification=hd.pr.TextJustificationValues.LEFT,
        )
        for index, text in enumerate(lines[:25])
    ]


def voi_transformation(
    source: pydicom.Dataset, window: tuple[float, float] | None = None
) -> hd.pr.SoftcopyVOILUTTransformation:
    """``window`` (a model card's fixed window) when given, else the source's VOI as the node
    presents it (``presentation_values.presentation_pixels``): its first VOI LUT, else its first
    Window Center / Width when usable (width >= 1, with the explanation of that window when the
    source gives one per window), else the percentile window of its modality values outside Pixel
    Padding.

    Built here rather than copied by highdicom, which refuses sources that the standard allows
    (a window together with a VOI LUT Sequence, fewer explanations than windows) or that are
    common in the field (Window Width 0).
    """
    if window is not None:
        return hd.pr.SoftcopyVOILUTTransformation(
            window_center=[float(window[0])],
            window_width=[float(window[1])],
            window_explanation=["AI MODEL WINDOW"],
        )
    item = lut_item(source, "VOILUTSequence")
    if item is not None:
        return hd.pr.SoftcopyVOILUTTransformation(voi_luts=[_voi_lut(source, item)])
    window = _first_window(source)
    if window is not None:
        centre, width, explanation = window
        function = str(source.get("VOILUTFunction", "") or "").strip().upper()
        return hd.pr.SoftcopyVOILUTTransformation(
            # One-element lists: highdicom writes a lone string explanation letter by letter.
            window_center=[centre],
            window_width=[width],
            window_explanation=None if explanation is None else [explanation],
            voi_lut_function=function if function in _VOI_FUNCTIONS else None,
        )
    centre, width = percentile_window(source)
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=[centre],
        window_width=[width],
        window_explanation=["AI PERCENTILE WINDOW"],
    )


def _first_window(source: pydicom.Dataset) -> tuple[float, float, str | None] | None:
    """``presentation_values.first_window``, with the explanation of that window when the source
    gives one per window and it is a valid LO."""
    window = first_window(source)
    if window is None:
        return None
    centres = source.get("WindowCenter")
    count = len(centres) if isinstance(centres, MultiValue) else 1
    explanations = source.get("WindowCenterWidthExplanation")
    if isinstance(explanations, MultiValue):
        explanation = str(explanations[0]).strip() if len(explanations) == count else None
    else:
        explanation = str(explanations).strip() if explanations and count == 1 else None
    return *window, explanation if explanation and _long_string(explanation) else None


def _long_string(text: str) -> bool:
    """Whether ``text`` is a valid LO value (highdicom raises on others)."""
    return len(text) <= 64 and "\\" not in text and text.isprintable()


def _voi_lut(source: pydicom.Dataset, item: pydicom.Dataset) -> hd.VOILUT:
    """The source's VOI LUT item as highdicom's, with its own first mapped value (US, or SS
    when negative). A softcopy VOI LUT has 8 or 16 bits per entry; an image's may have 10 to
    16: other depths are widened to 16 bits, their entries scaled so the display is the same
    (the output range is 0 to 2^bits - 1)."""
    first_mapped, table, bits = voi_lut_table(source)
    if bits == 8:
        data = table.astype(np.uint8)
    elif bits == 16:
        data = table.astype(np.uint16)
    else:
        scale = (2**16 - 1) / (2**bits - 1)
        data = np.clip(np.rint(table * scale), 0, 2**16 - 1).astype(np.uint16)
    explanation = str(item.get("LUTExplanation", "") or "").strip()
    lut = hd.VOILUT(
        first_mapped_value=max(0, first_mapped),
        lut_data=data,
        lut_explanation=explanation if explanation and _long_string(explanation) else None,
    )
    if first_mapped < 0:
        # highdicom takes unsigned values only; LUT Descriptor is US or SS (the first and
        # third values are written unsigned either way).
        written = [int(v) for v in lut.LUTDescriptor]
        lut["LUTDescriptor"] = DataElement(0x00283002, "SS", [written[0], first_mapped, written[2]])
    return lut
