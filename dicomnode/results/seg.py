"""DICOM Segmentation (highdicom SEG) of a model's segments over one image or a CT series.

A SEG of a CT volume has one orientation (Plane Orientation in its shared functional groups):
its sources must be one orientation by ``series.same_orientation``, the predicate that stacks
them as one volume, so that Image Orientation (Patient) values written with other rounding
(1e-6 apart) give one SEG, not one per value. The SEG carries the first source's value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from dicomnode import EQUIPMENT_MANUFACTURER, __version__
from dicomnode.findings import Algorithm, CodedConcept, Segmentation
from dicomnode.pipeline.letterbox import pixel_aspect_ratio
from dicomnode.pipeline.series import ORIENTATION_TOLERANCE, same_orientation
from dicomnode.results.anatomy import paired_region
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.source import (
    character_set,
    check_source,
    copy_laterality,
    copy_patient_study,
    one_study,
)
from dicomnode.results.sr import series_description, with_notice
from dicomnode.results.uids import result_instance_uid, result_series_uid, result_uid

SEG_SERIES_NUMBER = 9903
ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
ARTIFICIAL_INTELLIGENCE = codes.cid7162.ArtificialIntelligence

# Normal anatomy a model may outline; every other concept is taken for a lesion. Codes of
# CID 7140-ish chest structures in SNOMED CT and their RadLex equivalents.
ANATOMY_CODES = frozenset(
    {
        ("SCT", "39607008"),  # Lung structure
        ("SCT", "3341006"),  # Right lung
        ("SCT", "44029006"),  # Left lung
        ("SCT", "80891009"),  # Heart
        ("SCT", "44567001"),  # Trachea
        ("SCT", "955009"),  # Bronchus
        ("SCT", "51185008"),  # Thorax
        ("SCT", "181613000"),  # Mediastinum
        ("SCT", "76752008"),  # Breast
        ("SCT", "113197003"),  # Rib
        ("SCT", "51299004"),  # Clavicle
        ("SCT", "421060004"),  # Spine
        ("RADLEX", "RID1301"),  # lung
        ("RADLEX", "RID1302"),  # right lung
        ("RADLEX", "RID1326"),  # left lung
        ("RADLEX", "RID1385"),  # heart
        ("RADLEX", "RID1247"),  # trachea
        ("RADLEX", "RID1384"),  # thorax
    }
)


def build_seg(
    segmentation: Segmentation,
    algorithm: Algorithm,
    *,
    fractional: bool = False,
    category: CodedConcept | None = None,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """Return a SEG of ``segmentation`` referencing its source image(s).

    BINARY holds each segment's mask (probability >= its threshold); FRACTIONAL holds the
    probabilities in 8 bits. Every source frame gets a frame per segment, empty or not, for
    viewers that mishandle sparse SEG. The segmented property category is Anatomical
    Structure for the codes in ANATOMY_CODES, else Morphologically Abnormal Structure, unless
    ``category`` names one for all segments. A model's SEGs of one study share a series:
    ``instance_number`` tells them apart (1, 2, ... in the order of its segmentations).
    """
    sources, pixels = _validated(segmentation)
    study_uid = one_study(sources, "the SEG's source images")
    # The sources' headers as the SEG takes them over: invalid values emptied or left out.
    references = [sanitised_reference(source) for source in sources]
    source = references[0]
    family = f"{algorithm.name} {algorithm.version}"
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=ARTIFICIAL_INTELLIGENCE, version=algorithm.version
    )
    descriptions = []
    for number, segment in enumerate(segmentation.segments, start=1):
        concept = hd.sr.CodedConcept(
            segment.concept.value, segment.concept.scheme, segment.concept.meaning
        )
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment.concept.meaning[:64],
                segmented_property_category=_category(segment.concept, category),
                segmented_property_type=concept,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_id,
                tracking_uid=result_uid(
                    "segment",
                    study_uid,
                    segment.concept.scheme,
                    segment.concept.value,
                    str(number),
                    algorithm.manufacturer,
                    algorithm.name,
                    algorithm.version,
                ),
                tracking_id=f"{segment.concept.meaning} ({family})"[:64],
                anatomic_regions=_anatomic_regions(source),
            )
        )
        # Segment Description (ST): what viewers show beside the segment's label.
        descriptions[-1].SegmentDescription = with_notice(
            f"{segment.concept.meaning} by {family} ({algorithm.manufacturer})", algorithm, 1024
        )
    segmentation_type = (
        hd.seg.SegmentationTypeValues.FRACTIONAL
        if fractional
        else hd.seg.SegmentationTypeValues.BINARY
    )
    seg = hd.seg.Segmentation(
        **character_set(source),
        source_images=_one_orientation(references),
        pixel_array=pixels if fractional else pixels >= _thresholds(segmentation),
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=result_series_uid(study_uid, algorithm, "seg"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=result_instance_uid(
            [str(ds.SOPInstanceUID) for ds in sources], algorithm, "seg"
        ),
        instance_number=instance_number,
        manufacturer=EQUIPMENT_MANUFACTURER,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=f"dicomnode {__version__}",
        device_serial_number=algorithm.version[:64],
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_label="AI_SEG",
        content_description=_content_description(algorithm),
        series_description=series_description(algorithm, "SEG"),
        # Sparse SEGs (no frame where a segment is empty) confuse some viewers.
        omit_empty_frames=False,
    )
    copy_patient_study(source, seg)
    copy_laterality(source, seg)
    if "Laterality" in seg:
        # A SEG says the side in its segments (see _anatomic_regions): dciodvfy holds General
        # Series Laterality's condition unsatisfied in a Segmentation, with a value or empty.
        del seg.Laterality
    if "ImageOrientationPatient" not in source:
        # Projection radiographs have no plane geometry: Patient Orientation (Type 2C) says
        # how the image lies instead.
        orientation = [str(value) for value in source.get("PatientOrientation") or []]
        seg.PatientOrientation = orientation if len(orientation) == 2 else None
    if not _has_pixel_measures(seg):
        # Viewers lay the SEG's frames on its sources pixel for pixel, which they show in their
        # own aspect; shown alone, a SEG of non-square pixels without Pixel Measures (a
        # radiograph's) needs Pixel Aspect Ratio (Image Pixel module, Type 1C).
        aspect = pixel_aspect_ratio(source)
        if aspect is not None:
            seg.PixelAspectRatio = list(aspect)
    return seg


def _has_pixel_measures(seg: pydicom.Dataset) -> bool:
    """Whether the SEG states its pixels' physical spacing (Pixel Measures functional group)."""
    groups = list(seg.get("SharedFunctionalGroupsSequence") or [])
    groups += list(seg.get("PerFrameFunctionalGroupsSequence") or [])
    return any("PixelMeasuresSequence" in group for group in groups)


def _anatomic_regions(source: pydicom.Dataset) -> list[hd.sr.CodedConcept] | None:
    """The region a segment of a paired body part lies in, its side as the region's modifier
    (Segment Description: Anatomic Region Sequence > Anatomic Region Modifier Sequence, CID 244).

    A Segmentation says laterality so: not in General Series (see ``build_seg``), nor in Frame
    Anatomy, which is not one of the Segmentation IOD's functional groups (dciodvfy: "not present
    in standard DICOM IOD"). The region and side are ``anatomy.paired_region``'s. None for an
    unpaired part, an unknown side or a part no code names: the segments then say no region.
    """
    paired = paired_region(source)
    if paired is None:
        return None
    region, side = paired
    region.AnatomicRegionModifierSequence = [side]
    return [region]


def _one_orientation(references: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The sources' references (``sanitised_reference``: the writer's own copies) as highdicom
    takes them: every Image Orientation (Patient) the first's value exactly (highdicom
    compares the values as they are written). A reference that differs from it within
    ORIENTATION_TOLERANCE is given the first's value; one beyond it is refused."""
    written = references[0].get("ImageOrientationPatient")
    if written is None:
        return references
    first = [float(value) for value in written]
    for index, reference in enumerate(references):
        orientation = _cosines(reference.get("ImageOrientationPatient"))
        if orientation == first:
            continue
        if orientation is None or not same_orientation(first, orientation):
            raise ValueError(
                f"Segmentation.sources[{index}] (SOP Instance UID {reference.SOPInstanceUID}) "
                f"has Image Orientation (Patient) {orientation}, not that of sources[0] {first} "
                f"within {ORIENTATION_TOLERANCE} per direction cosine: a SEG has one "
                "orientation; give each orientation a Segmentation of its own"
            )
        # The reference shares the source's data elements: the orientation's element is
        # replaced, not changed in place, so that the source keeps its own.
        del reference.ImageOrientationPatient
        reference.ImageOrientationPatient = list(written)
    return references


def _cosines(value: Sequence[float] | None) -> list[float] | None:
    try:
        return [float(item) for item in value] if value is not None else None
    except (TypeError, ValueError):
        return None


def segment_category(concept: CodedConcept) -> hd.sr.CodedConcept:
    """Return the segmented property category of ``concept``: anatomy or abnormal structure."""
    if (concept.scheme.upper(), concept.value) in ANATOMY_CODES:
        return ANATOMICAL_STRUCTURE
    return ABNORMAL_STRUCTURE


def _category(concept: CodedConcept, override: CodedConcept | None) -> hd.sr.CodedConcept:
    if override is None:
        return segment_category(concept)
    return hd.sr.CodedConcept(override.value, override.scheme, override.meaning)


def _content_description(algorithm: Algorithm) -> str:
    return with_notice(f"AI {algorithm.name} {algorithm.version}", algorithm)


def _thresholds(segmentation: Segmentation) -> np.ndarray:
    return np.array([segment.threshold for segment in segmentation.segments], dtype=np.float32)


def _validated(segmentation: Segmentation) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Check the sources and segments; return the sources and (frames, rows, cols, segments)."""
    if not segmentation.sources:
        raise ValueError("build_seg needs at least one source image; got none")
    if not segmentation.segments:
        raise ValueError("build_seg needs at least one segment; got none")
    sources = [
        check_source(source, f"Segmentation.sources[{index}]")
        for index, source in enumerate(segmentation.sources)
    ]
    uids = [str(source.SOPInstanceUID) for source in sources]
    if len(set(uids)) != len(uids):
        raise ValueError("Segmentation.sources holds the same image more than once")
    if len({str(source.SeriesInstanceUID) for source in sources}) != 1:
        raise ValueError("Segmentation.sources must all belong to one series")
    for source in sources:
        if int(source.get("NumberOfFrames", 1)) != 1:
            raise ValueError(
                f"source {source.SOPInstanceUID} is multi-frame; build_seg takes single-frame "
                "images (one per slice)"
            )
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    stacked = []
    for segment in segmentation.segments:
        probabilities = np.asarray(segment.probabilities, dtype=np.float32)
        if probabilities.ndim == 2:
            probabilities = probabilities[None]
        label = f"segment {segment.concept.meaning!r}"
        if probabilities.shape != shape:
            raise ValueError(
                f"{label}: probabilities shape {probabilities.shape} differs from the sources' "
                f"(frames, rows, columns) = {shape}"
            )
        if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0:
            raise ValueError(f"{label}: probabilities must be finite and within 0..1")
        if probabilities.max() > 1:
            raise ValueError(f"{label}: probabilities must be finite and within 0..1")
        threshold = segment.threshold
        if not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise ValueError(f"{label}: threshold must be a number in 0..1, got {threshold!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"{label}: threshold must be in (0, 1], got {threshold!r}")
        stacked.append(probabilities)
    return sources, np.stack(stacked, axis=-1)
