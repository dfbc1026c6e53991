"""Which models run on which images: the model cards' selection rules (pure)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from dicomnode import made_by_this_node
from dicomnode.findings import Finding
from dicomnode.models.registry import ModelCard, SelectionRules
from dicomnode.pipeline.attributes import value_or_none

# Image SOP classes whose instances are raw detector data, Presentation Intent Type or not.
FOR_PROCESSING_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray - For Processing
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray - For Processing
    }
)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

# Derivation Code (CID 7203) that lossy compression records, and the purpose of reference
# (CID 7202) of the Source Image Sequence item naming the image compressed.
LOSSY_COMPRESSION = ("113040", "DCM")
UNCOMPRESSED_PREDECESSOR = ("121320", "DCM")
# Derivation Description as compression tools write it, one compression each: dcmtk
# (dcmcjpeg: lossy and lossless JPEG; dcmcjpls: near-lossless JPEG-LS) and gdcm (gdcmconv
# --lossy). dcmtk puts an earlier description after its own in brackets ("... [earlier]").
_RATIO = r"[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"
COMPRESSION_DESCRIPTIONS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"lossy compression with jpeg (?:baseline|extended sequential [0-9]+ bit|spectral "
        rf"selection [0-9]+ bit|full progression [0-9]+ bit), ijg quality factor [0-9]+, "
        rf"compression ratio {_RATIO}",
        r"lossless jpeg compression, selection value [0-9]+, point transform [0-9]+, "
        rf"compression ratio {_RATIO}",
        rf"near lossless jpeg-ls compression, factor {_RATIO} \(near=[0-9]+\)",
        r"lossy conversion",
    )
)


@dataclass(frozen=True)
class ImageFacts:
    modality: str
    body_part: str
    view: str
    sop_class_uid: str
    # Image Type values, upper case ("ORIGINAL", "PRIMARY", "AXIAL"...).
    image_types: tuple[str, ...] = ()
    # Unit normal of the image plane (row x column direction of Image Orientation Patient), in
    # patient x, y, z; None without a usable Image Orientation Patient.
    slice_normal: tuple[float, float, float] | None = None
    samples_per_pixel: int = 1
    photometric: str = ""
    number_of_frames: int = 1
    # Presentation Intent Type ("FOR PRESENTATION", "FOR PROCESSING"), "" when absent.
    presentation_intent: str = ""
    manufacturer: str = ""
    # Rescale Intercept and Rescale Slope both present and not empty.
    rescaled: bool = True
    # DERIVED only because it was lossy-compressed on the way (lossy_compression_only).
    derived_by_lossy_compression_only: bool = False


# Words in Body Part Examined or in the descriptions that mean the chest. Sites spell it many
# ways, and many chest radiographs carry no Body Part Examined at all.
CHEST_WORDS = ("CHEST", "THORAX", "TORAX", "THORAKS", "LUNG", "CXR", "PULM", "POUMON")
DESCRIPTIONS = (
    "ProtocolName",
    "SeriesDescription",
    "StudyDescription",
    "PerformedProcedureStepDescription",
)


def body_part(ds: Dataset) -> str:
    """Body Part Examined, with the chest's other spellings (THORAX, LUNG, CHEST_PA, ...) read
    as CHEST; when absent, CHEST if a protocol or description names the chest."""
    value = _text(ds, "BodyPartExamined")
    if value:
        return "CHEST" if any(word in value for word in CHEST_WORDS) else value
    for keyword in DESCRIPTIONS:
        text = _text(ds, keyword)
        if any(word in text for word in CHEST_WORDS):
            return "CHEST"
    return ""


def _text(ds: Dataset, keyword: str) -> str:
    """The attribute's text in upper case; "" when it is absent or empty."""
    return str(value_or_none(ds, keyword) or "").strip().upper()


def _integer(ds: Dataset, keyword: str, default: int) -> int:
    # A malformed value is the decoder's to report, with the file named; selection goes on.
    try:
        return int(value_or_none(ds, keyword) or default)
    except (TypeError, ValueError):
        return default


def _image_types(ds: Dataset) -> tuple[str, ...]:
    value = value_or_none(ds, "ImageType")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(item).strip().upper() for item in values)


def _codes(ds: Dataset, keyword: str) -> list[tuple[str, str]]:
    """(Code Value, Coding Scheme Designator) of each item of a code sequence, upper case."""
    items = value_or_none(ds, keyword) or []
    if not isinstance(items, (list, Sequence)):  # not a sequence: malformed
        return [("", "")]
    return [
        (_text(item, "CodeValue"), _text(item, "CodingSchemeDesignator"))
        if isinstance(item, Dataset)
        else ("", "")
        for item in items
    ]


def _describes_compression_only(description: str) -> bool:
    """True when every part of a Derivation Description (dcmtk brackets earlier ones) is one
    that a compression tool writes."""
    parts = [part.strip() for part in re.split(r"[\[\]]", description)]
    return all(
        any(pattern.fullmatch(" ".join(part.split())) for pattern in COMPRESSION_DESCRIPTIONS)
        for part in parts
        if part
    )


def lossy_compression_only(ds: Dataset, image_types: tuple[str, ...]) -> bool:
    """True for an image that is DERIVED only because it was lossy-compressed on the way (an
    archive or router did it; it is still the acquired image), as dcmtk and gdcm record it:
    Image Type DERIVED\\PRIMARY (PRIMARY: made by the examination, not after it), Lossy
    Image Compression 01, a Derivation Code Sequence of Lossy Compression (DCM 113040) only, a
    Derivation Description (at least one of the two present) of compressions only, and any
    Source Image Sequence naming uncompressed predecessors (DCM 121320) only. Both tools
    replace the code sequence of an image derived before, so an earlier derivation shows in
    the description (dcmtk keeps it in brackets) or in Image Type SECONDARY (gdcm)."""
    if image_types[:2] != ("DERIVED", "PRIMARY") or _text(ds, "LossyImageCompression") != "01":
        return False
    codes = _codes(ds, "DerivationCodeSequence")
    description = str(value_or_none(ds, "DerivationDescription") or "")
    if not codes and not description.strip():
        return False  # DERIVED with nothing to say how: processed, as far as anyone can tell
    sources = value_or_none(ds, "SourceImageSequence") or []
    return (
        all(code == LOSSY_COMPRESSION for code in codes)
        and _describes_compression_only(description)
        and isinstance(sources, (list, Sequence))
        and all(
            isinstance(item, Dataset)
            and _codes(item, "PurposeOfReferenceCodeSequence") == [UNCOMPRESSED_PREDECESSOR]
            for item in sources
        )
    )


def uncompressed_predecessors(ds: Dataset) -> frozenset[str]:
    """The SOP Instance UIDs that the Source Image Sequence names as uncompressed
    predecessors (DCM 121320): ``ds`` is a lossy-compressed copy of each (an archive sent the
    original and the copy it made)."""
    items = value_or_none(ds, "SourceImageSequence") or []
    if not isinstance(items, (list, Sequence)):
        return frozenset()
    return frozenset(
        str(item.ReferencedSOPInstanceUID).strip()
        for item in items
        if isinstance(item, Dataset)
        and _codes(item, "PurposeOfReferenceCodeSequence") == [UNCOMPRESSED_PREDECESSOR]
        and value_or_none(item, "ReferencedSOPInstanceUID")
    )


def lossy_lineage(images: Sequence[Dataset]) -> dict[str, frozenset[str]]:
    """Each image's SOP Instance UID -> the images among ``images`` it is a lossy-compressed
    copy of, directly or through other copies (a copy of a copy); empty for an original."""
    held = {str(ds.SOPInstanceUID) for ds in images}
    direct = {str(ds.SOPInstanceUID): uncompressed_predecessors(ds) & held for ds in images}
    lineage: dict[str, frozenset[str]] = {}
    for uid, predecessors in direct.items():
        found: set[str] = set()
        todo = list(predecessors)
        while todo:
            if (ancestor := todo.pop()) not in found:
                found.add(ancestor)
                todo.extend(direct.get(ancestor, ()))
        lineage[uid] = frozenset(found - {uid})
    return lineage


def slice_normal(ds: Dataset) -> tuple[float, float, float] | None:
    """Unit normal of the image plane from Image Orientation Patient, None when it is absent or
    not two non-parallel direction vectors."""
    try:
        values = [float(v) for v in value_or_none(ds, "ImageOrientationPatient") or ()]
    except (TypeError, ValueError):
        return None
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        return None
    (rx, ry, rz), (cx, cy, cz) = values[:3], values[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(c * c for c in normal))
    if length < 1e-6:
        return None
    return (normal[0] / length, normal[1] / length, normal[2] / length)


def image_plane(normal: tuple[float, float, float] | None, tolerance_deg: float) -> str:
    """AXIAL, CORONAL or SAGITTAL: the patient axis (z, y, x) nearest the slice normal, when
    within ``tolerance_deg`` of it; OBLIQUE when further from every axis; "" without a normal."""
    if normal is None:
        return ""
    planes = (("SAGITTAL", abs(normal[0])), ("CORONAL", abs(normal[1])), ("AXIAL", abs(normal[2])))
    plane, cosine = max(planes, key=lambda item: item[1])
    if cosine < math.cos(math.radians(tolerance_deg)) - 1e-9:
        return "OBLIQUE"
    return plane


def _presentation_intent(ds: Dataset, sop_class_uid: str) -> str:
    value = _text(ds, "PresentationIntentType")
    if not value and sop_class_uid in FOR_PROCESSING_CLASSES:
        return "FOR PROCESSING"
    return value


def image_facts(ds: Dataset) -> ImageFacts:
    """The attributes that selection rules look at (an empty one as if absent)."""
    sop_class_uid = str(value_or_none(ds, "SOPClassUID") or "").strip()
    image_types = _image_types(ds)
    return ImageFacts(
        modality=_text(ds, "Modality"),
        body_part=body_part(ds),
        view=_text(ds, "ViewPosition"),
        sop_class_uid=sop_class_uid,
        image_types=image_types,
        slice_normal=slice_normal(ds),
        samples_per_pixel=_integer(ds, "SamplesPerPixel", 1),
        photometric=_text(ds, "PhotometricInterpretation"),
        number_of_frames=_integer(ds, "NumberOfFrames", 1),
        presentation_intent=_presentation_intent(ds, sop_class_uid),
        manufacturer=_text(ds, "Manufacturer"),
        rescaled=all(
            value_or_none(ds, keyword) is not None
            for keyword in ("RescaleIntercept", "RescaleSlope")
        ),
        derived_by_lossy_compression_only=lossy_compression_only(ds, image_types),
    )


def without_hounsfield_units(facts: ImageFacts) -> bool:
    """True for a CT image without Rescale Intercept and Slope (Type 1 in the CT Image
    module): its stored values are not Hounsfield units, and a CT model's fixed window would
    see a shifted picture (stored HU + 1024 read as HU), so no model is given it."""
    return (facts.modality == "CT" or facts.sop_class_uid == CTImageStorage) and not facts.rescaled


def made_by_the_node(facts: ImageFacts) -> bool:
    """True for the node's own result objects (Manufacturer "dicomnode"): never analysed again,
    whatever a card says, or a PACS routing results back would feed them round and round."""
    return made_by_this_node(facts.manufacturer)


def selection_image_types(facts: ImageFacts) -> tuple[str, ...]:
    """Image Type as ``excluded_image_types`` reads it: an image DERIVED only by lossy
    compression on the way counts as ORIGINAL (a card excludes DERIVED to skip processed and
    secondary images, not the acquired image an archive compressed)."""
    if facts.derived_by_lossy_compression_only:
        return ("ORIGINAL", *facts.image_types[1:])
    return facts.image_types


def _admits(allowed: list[str], value: str) -> bool:
    return not allowed or value.upper() in {item.upper() for item in allowed}


def _upper(values: list[str]) -> set[str]:
    return {value.strip().upper() for value in values}


def _monochrome(facts: ImageFacts) -> bool:
    return facts.samples_per_pixel == 1 and facts.photometric in MONOCHROME


def rules_match(rules: SelectionRules, facts: ImageFacts) -> bool:
    """True when every rule admits the image (an empty allow-list admits any value) and the
    image is not one of the node's own results."""
    return (
        not made_by_the_node(facts)
        and not without_hounsfield_units(facts)
        and _admits(rules.modalities, facts.modality)
        and _admits(rules.body_parts, facts.body_part)
        and _admits(rules.views, facts.view)
        and (not rules.sop_classes or facts.sop_class_uid in rules.sop_classes)
        and not _upper(rules.excluded_image_types) & set(selection_image_types(facts))
        and facts.presentation_intent not in _upper(rules.excluded_presentation_intents)
        and (
            not rules.orientations
            or image_plane(facts.slice_normal, rules.orientation_tolerance_deg)
            in rules.orientations
        )
        and (not rules.monochrome_only or _monochrome(facts))
        and facts.number_of_frames <= rules.max_frames
    )


def select_models(cards: list[ModelCard], facts: ImageFacts) -> list[ModelCard]:
    """The models whose rules admit this image."""
    return [card for card in cards if rules_match(card.select, facts)]


def routed_view(card: ModelCard, findings: list[Finding]) -> str | None:
    """The view a router card (``model.sets = "view"``) assigns: its most probable label's
    fact_value when that label clears its threshold, else None (keep the header's view)."""
    if not findings:
        return None
    best = max(findings, key=lambda f: f.probability)
    if not best.present:
        return None
    label = next((lb for lb in card.labels if lb.concept == best.concept), None)
    return label.fact_value.upper() if label and label.fact_value else None


def with_view(facts: ImageFacts, view: str) -> ImageFacts:
    """The same facts with the view replaced (by a router's decision)."""
    return replace(facts, view=view.upper())
