"""TID 1500 Measurement Report (Comprehensive 3D SR) holding a model's findings on chest X-rays."""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from dicomnode import EQUIPMENT_MANUFACTURER, RESEARCH_DEMO_NOTICE, __version__
from dicomnode.findings import Algorithm, Finding, ImageFindings
from dicomnode.results.anatomy import paired_region
from dicomnode.results.geometry import box_outline, pixel_centre
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.source import character_set, copy_patient_study
from dicomnode.results.uids import result_instance_uid, result_series_uid, result_uid

SR_SERIES_NUMBER = 9901

# Procedure reported (TID 1500 row 4): plain radiography of the chest, whatever the view count.
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
CHEST_CT = hd.sr.CodedConcept("169069000", "SCT", "Computed tomography of chest")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
# TID 1500 row 12 "Qualitative Evaluations"; the research notice is a TEXT item in it.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")

_LO_MAX = 64  # Series Description is LO: at most 64 characters

__all__ = [
    "build_sr",
    "copy_patient_study",
    "device_observer",
    "lossy_note",
    "name_predecessors",
    "series_description",
    "validate_evaluation",
    "with_notice",
]


# Modalities whose Image Library entries highdicom describes further (TID 1603 projection
# radiography, TID 1604 cross-sectional), and the attributes it reads for them unchecked.
_PROJECTION = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}
_CROSS_SECTIONAL = {"CT", "MR", "PT"}
_LIBRARY_COMMON = ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID")


def _values(ds: pydicom.Dataset, keyword: str, count: int) -> list | None:
    """The attribute's ``count`` values when it has them all, each non-empty; else None."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if len(values) != count or any(v is None or str(v).strip() == "" for v in values):
        return None
    return values


def library_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """What the SR's Image Library (TID 1601) describes of ``source``: SOP class and instance,
    matrix, frame of reference, and the descriptors of its modality (TID 1603: patient
    orientation and pixel spacing; TID 1604: spacing, slice thickness, orientation and
    position) when the image has every one of them. highdicom reads those without checking,
    so an ordinary image lacking one (a CR without Imager Pixel Spacing, an empty Patient
    Orientation, a CT slice with empty Slice Thickness) cost the study its whole report; such
    an image's entry keeps the common descriptors only (its view has no Modality). A CR's
    Pixel Spacing stands in for the Imager Pixel Spacing it may lack."""
    view = pydicom.Dataset()
    for keyword in _LIBRARY_COMMON:
        if keyword in source:
            setattr(view, keyword, source[keyword].value)
    modality = str(source.get("Modality", "") or "")
    view.Modality = ""
    if modality in _PROJECTION:
        orientation = _values(source, "PatientOrientation", 2)
        spacing = _values(source, "ImagerPixelSpacing", 2) or _values(source, "PixelSpacing", 2)
        if orientation and spacing:
            view.Modality = modality
            view.PatientOrientation = orientation
            view.ImagerPixelSpacing = spacing
    elif modality in _CROSS_SECTIONAL:
        wanted = {
            "PixelSpacing": _values(source, "PixelSpacing", 2),
            "SliceThickness": _values(source, "SliceThickness", 1),
            "ImageOrientationPatient": _values(source, "ImageOrientationPatient", 6),
            "ImagePositionPatient": _values(source, "ImagePositionPatient", 3),
        }
        if all(wanted.values()):
            view.Modality = modality
            for keyword, values in wanted.items():
                setattr(view, keyword, values[0] if keyword == "SliceThickness" else values)
            between = _values(source, "SpacingBetweenSlices", 1)
            if between:
                view.SpacingBetweenSlices = between[0]
    return view


def build_sr(evaluations: Sequence[ImageFindings], algorithm: Algorithm) -> pydicom.Dataset:
    """Return a TID 1500 Comprehensive 3D SR of ``algorithm``'s findings on one study's images."""
    if not evaluations:
        raise ValueError("build_sr needs at least one ImageFindings; got none")
    sources = [validate_evaluation(evaluation) for evaluation in evaluations]
    study_uids = {str(source.StudyInstanceUID) for source in sources}
    if len(study_uids) != 1:
        raise ValueError(
            f"build_sr reports on one study; the evaluations span {len(study_uids)} studies: "
            f"{sorted(study_uids)}"
        )
    sop_uids = [str(source.SOPInstanceUID) for source in sources]
    duplicates = sorted({uid for uid in sop_uids if sop_uids.count(uid) > 1})
    if duplicates:
        raise ValueError(f"build_sr got the same source image more than once: {duplicates}")

    # The sources' headers as the report takes them over: invalid values emptied or left out.
    references = [sanitised_reference(source) for source in sources]
    groups = [
        _measurement_group(reference, finding, ordinal, algorithm)
        for evaluation, reference in zip(evaluations, references, strict=True)
        for finding, ordinal in zip(evaluation.findings, ordinals(evaluation.findings), strict=True)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=(
            CHEST_CT if all(source.get("Modality") == "CT" for source in sources) else CHEST_XRAY
        ),
        imaging_measurements=groups,
        referenced_images=[library_view(reference) for reference in references],
    )
    report[0].ContentSequence.append(_notice(algorithm, lossy_note(sources)))

    study_uid = study_uids.pop()
    sr = hd.sr.Comprehensive3DSR(
        **character_set(references[0]),
        evidence=references,
        content=report[0],
        series_instance_uid=result_series_uid(study_uid, algorithm, "sr"),
        series_number=SR_SERIES_NUMBER,
        # One report per model version and set of images reported on: a re-run on the same
        # images gives the same instance, one with late images a new one (a UID names one
        # content), which names this one its predecessor (name_predecessors).
        sop_instance_uid=result_instance_uid(sop_uids, algorithm, "sr"),
        instance_number=1,
        manufacturer=EQUIPMENT_MANUFACTURER,
        is_complete=True,
        # Preliminary: no physician has verified it, and a re-run may replace it.
        is_final=False,
        is_verified=False,
        series_description=series_description(algorithm, "SR"),
        software_versions=f"dicomnode {__version__}",
    )
    copy_patient_study(references[0], sr)
    return sr


def name_predecessors(sr: pydicom.Dataset, previous: Sequence[tuple[str, str, str]]) -> None:
    """Name earlier versions of the report ``sr`` (its model's reports on fewer of the
    study's images) in its Predecessor Documents Sequence (SR Document General Module,
    PS3.3 C.17.2); ``previous``: their (Series Instance, SOP Class, SOP Instance) UIDs, in
    the report's study."""
    if not previous:
        return
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for series_uid, sop_class_uid, sop_instance_uid in previous:
        reference = pydicom.Dataset()
        reference.ReferencedSOPClassUID = sop_class_uid
        reference.ReferencedSOPInstanceUID = sop_instance_uid
        by_series.setdefault(series_uid, []).append(reference)
    study = pydicom.Dataset()
    study.StudyInstanceUID = sr.StudyInstanceUID
    study.ReferencedSeriesSequence = []
    for series_uid, references in sorted(by_series.items()):
        series = pydicom.Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = references
        study.ReferencedSeriesSequence.append(series)
    sr.PredecessorDocumentsSequence = [study]


def validate_evaluation(evaluation: ImageFindings, allow_empty: bool = False) -> pydicom.Dataset:
    """Check an ImageFindings against its source image and return the source Dataset
    (``allow_empty``: no findings is fine, e.g. an overlay of segmentation outlines only)."""
    source = evaluation.source
    if not isinstance(source, pydicom.Dataset):
        raise ValueError(
            f"ImageFindings.source must be a pydicom Dataset, got {type(source).__name__}"
        )
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
        if not source.get(keyword):
            raise ValueError(f"source image lacks {keyword}; cannot reference it in a result")
    where = f"SOP Instance UID {source.SOPInstanceUID}"
    if not evaluation.findings and not allow_empty:
        raise ValueError(f"ImageFindings for {where} has no findings")
    seen: dict[tuple[str, str], bool] = {}
    for finding in evaluation.findings:
        if not isinstance(finding, Finding):
            raise ValueError(f"{where}: findings must be Finding, got {type(finding).__name__}")
        _check_finding(finding, int(source.Rows), int(source.Columns), where)
        key = (finding.concept.scheme, finding.concept.value)
        # A concept may repeat only as several localised findings (e.g. three nodules, each
        # with its box); an unlocalised repeat would be two answers to one question.
        localised = finding.box is not None or finding.point is not None
        if key in seen and not (localised and seen[key]):
            raise ValueError(
                f"{where}: finding {finding.concept} is listed more than once; repeats are "
                "allowed only when every one has a box or a point"
            )
        seen[key] = localised
    return source


def series_description(algorithm: Algorithm, kind: str, short: str = "") -> str:
    """Return a Series Description naming the model, e.g. "AI SR cxr-demo 1.0.0 (research demo)".

    Within LO's 64 characters the model's name and version are kept whole (a viewer's series
    list is where a reader tells which model and version made a series). A ``kind`` too long
    for the room left gives way to the writer's ``short`` label of it (a derived image's
    "derived" for "Bone suppression (soft-tissue image)": the model's name tells which
    derivation, and "Bone suppres~" or "Bone~" read worse), else is cut after its last whole
    word that fits, else within a word; a cut ends in "~". Only a name too long for any kind
    is cut itself."""
    suffix = " (research demo)" if algorithm.research_demo else ""
    model = f"{algorithm.name} {algorithm.version}"
    room = max(_LO_MAX - len("AI  ") - len(model) - len(suffix), 8)
    if len(kind) > room:
        kind = short if short and len(short) <= room else _cut(kind, room)
    head = f"AI {kind} "
    room = _LO_MAX - len(head) - len(suffix)
    if len(model) > room:
        model = model[: room - 1] + "~"
    return f"{head}{model}{suffix}"


def _cut(text: str, room: int) -> str:
    """``text`` cut to ``room`` characters ending in "~": after its last whole word that fits
    (punctuation before the cut dropped), or within its first word when none does."""
    head = text[:room]  # one more than is kept: is the cut at a space?
    if " " in head:
        words = head[: head.rindex(" ")].rstrip(" ,;:-(")
        if words:
            return words + "~"
    return text[: room - 1] + "~"


def with_notice(text: str, algorithm: Algorithm, limit: int = _LO_MAX) -> str:
    """``text`` then, for a research demo, " - research demo, not for clinical use", within
    ``limit`` characters: ``text`` is cut (ending in "~"), never the notice."""
    if not algorithm.research_demo:
        return text[:limit]
    suffix = f" - {RESEARCH_DEMO_NOTICE.lower()}"
    room = limit - len(suffix)
    if len(text) > room:
        text = text[: room - 1] + "~"
    return text + suffix


def _check_finding(finding: Finding, rows: int, columns: int, where: str) -> None:
    concept = finding.concept
    label = f"{where}, finding {concept.meaning!r}"
    if not (concept.value and concept.scheme and concept.meaning):
        raise ValueError(f"{where}: finding code needs value, scheme and meaning, got {concept}")
    for name in ("probability", "threshold"):
        value = getattr(finding, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
            raise ValueError(f"{label}: {name} must be a number in 0..1, got {value!r}")
    if finding.peak is not None:
        column, row = finding.peak
        if not (0 <= column < columns and 0 <= row < rows):
            raise ValueError(
                f"{label}: peak (column, row) = {finding.peak} lies outside the "
                f"{columns} x {rows} image"
            )
    if finding.box is not None:
        if len(finding.box) != 4 or not all(math.isfinite(v) for v in finding.box):
            raise ValueError(f"{label}: box must be 4 finite numbers, got {finding.box!r}")
        column0, row0, column1, row1 = finding.box
        if not (0 <= column0 < column1 <= columns and 0 <= row0 < row1 <= rows):
            raise ValueError(
                f"{label}: box (col0, row0, col1, row1) = {finding.box} is empty or lies "
                f"outside the {columns} x {rows} image"
            )
    if finding.point is not None:
        column, row = finding.point
        if not (0 <= column < columns and 0 <= row < rows):
            raise ValueError(
                f"{label}: point (column, row) = {finding.point} lies outside the "
                f"{columns} x {rows} image"
            )
    if finding.heatmap is not None:
        heatmap = np.asarray(finding.heatmap)
        if heatmap.shape != (rows, columns):
            raise ValueError(
                f"{label}: heat map shape {heatmap.shape} differs from the image "
                f"(rows, columns) = {(rows, columns)}; resample it to the source image first"
            )
        # min and max are NaN if any value is, and then fail the comparison: two passes over
        # the (source-sized) map instead of three.
        if not (heatmap.min() >= 0 and heatmap.max() <= 1):
            raise ValueError(f"{label}: heat map values must be finite and within 0..1")


def device_observer(algorithm: Algorithm) -> hd.sr.ObserverContext:
    """The model as the device observer of an SR or KOS (TID 1002/1004): Device Observer
    Model Name its name, Manufacturer its manufacturer, and Name its name and version (TID
    1004 has no version row; the UID, one per model version, is no reader's text). The SR's
    measurement groups also give the version in their Algorithm Identification (TID 4019); a
    KOS has no such item (its Key Object Description text names it)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", algorithm.manufacturer, algorithm.name, algorithm.version),
        name=f"{algorithm.name} {algorithm.version}",
        manufacturer_name=algorithm.manufacturer,
        model_name=algorithm.name,
    )
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )


def _observation_context(algorithm: Algorithm) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_device_context=device_observer(algorithm))


def ordinals(findings: Sequence[Finding]) -> list[int]:
    """Return, per finding, how many findings of the same concept come before it (0, 1, ...)."""
    counts: dict[tuple[str, str], int] = {}
    result = []
    for finding in findings:
        key = (finding.concept.scheme, finding.concept.value)
        result.append(counts.get(key, 0))
        counts[key] = result[-1] + 1
    return result


def _measurement_group(
    source: pydicom.Dataset, finding: Finding, ordinal: int, algorithm: Algorithm
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    concept = hd.sr.CodedConcept(
        finding.concept.value, finding.concept.scheme, finding.concept.meaning
    )
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    # The first finding of a concept keeps the UID it had before repeats were allowed; later
    # ones (a second nodule) add their ordinal.
    repeat = (str(ordinal),) if ordinal else ()
    number = f" #{ordinal + 1}" if ordinal else ""
    tracking = hd.sr.TrackingIdentifier(
        uid=result_uid(
            "tracking",
            str(source.SOPInstanceUID),
            finding.concept.scheme,
            finding.concept.value,
            algorithm.manufacturer,
            algorithm.name,
            algorithm.version,
            *repeat,
        ),
        identifier=f"{finding.concept.meaning}{number} ({algorithm.name} {algorithm.version})",
    )
    evaluation = hd.sr.QualitativeEvaluation(
        name=concept, value=PRESENT if finding.present else ABSENT
    )
    probability = hd.sr.Measurement(
        name=PROBABILITY,
        value=float(finding.probability),
        unit=PROBABILITY_UNIT,
        algorithm_id=algorithm_id,
    )
    common = {
        "tracking_identifier": tracking,
        "finding_type": concept,
        "algorithm_id": algorithm_id,
        "measurements": [probability],
        "qualitative_evaluations": [evaluation],
        "finding_sites": _finding_sites(source),
    }
    region = _region(source, finding)
    if region is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
            **common,
        )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def _finding_sites(source: pydicom.Dataset) -> list[hd.sr.FindingSite] | None:
    """The side of a finding on a paired body part (a hand, a knee): the region the source
    shows as the group's Finding Site, its Laterality (CID 244) as the site's modifier (TID
    1410/1501). An SR has no General Series Laterality, so its groups are where a reader
    learns which hand. None for an unpaired part (a chest), an unknown side or a region no
    code names: the group then names no site."""
    paired = paired_region(source)
    if paired is None:
        return None
    region, side = paired
    return [hd.sr.FindingSite(anatomic_location=region, laterality=side)]


def _region(source: pydicom.Dataset, finding: Finding) -> hd.sr.ImageRegion | None:
    # One region per measurement group: the most specific localisation the model gave.
    if finding.box is not None:
        graphic_type, data = hd.sr.GraphicTypeValues.POLYLINE, box_outline(finding.box)
    elif finding.point is not None:
        graphic_type, data = hd.sr.GraphicTypeValues.POINT, pixel_centre(finding.point)
    elif finding.peak is not None and finding.present:
        # A CAM peak says where the model saw a finding; an absent one's would mislead.
        graphic_type, data = hd.sr.GraphicTypeValues.POINT, pixel_centre(finding.peak)
    else:
        return None
    return hd.sr.ImageRegion(
        graphic_type=graphic_type,
        graphic_data=data,
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def lossy_note(sources: Sequence[pydicom.Dataset]) -> str:
    """What the report says of images it was made on that were lossy-compressed (Lossy Image
    Compression 01: by the modality, or by an archive or router on the way); "" for none."""
    lossy = sum(
        str(source.get("LossyImageCompression") or "").strip() == "01" for source in sources
    )
    if not lossy:
        return ""
    if len(sources) == 1:
        return "The image analysed was lossy-compressed."
    if lossy == len(sources):
        return f"The {lossy} images analysed were lossy-compressed."
    verb = "was" if lossy == 1 else "were"
    return f"{lossy} of the {len(sources)} images analysed {verb} lossy-compressed."


def _notice(algorithm: Algorithm, note: str = "") -> hd.sr.ContainerContentItem:
    model = f"{algorithm.name} {algorithm.version} ({algorithm.manufacturer})"
    if algorithm.research_demo:
        text = f"{RESEARCH_DEMO_NOTICE}. AI result of {model}, not verified by a physician."
    else:
        text = f"AI result of {model}, not verified by a physician."
    text = f"{text} {note}".strip()
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container
