"""What the DX, CR and CT image IODs require of a derived image of the source's own class.

A derived image of the source's class is a copy of the source's attributes, so a source that
lacks what its IOD requires would pass its slip on to the node's own object, which dciodvfy then
fails. One table per SOP class lists those attributes (PS3.3 A.26 DX, A.2 CR, A.3 CT and the
modules they share) with how the node may supply one that is missing or empty:

- Type 2 (present, possibly empty): an empty value, which says "unknown" and guesses nothing;
- Type 1 whose value the standard fixes given the image itself (a DX image's Presentation Intent
  Type is its SOP class's, its Rescale Intercept 0, Slope 1 and Type US, its Presentation LUT
  Shape follows its photometric interpretation), or that is the node's own presentation choice
  (a window of its own pixels);
- a Type 1 that the standard says is consistent with another attribute that has a value (a
  DX image's Image Laterality with the series' Laterality);
- any other Type 1 (Patient Orientation, Image Laterality without Laterality, Imager Pixel
  Spacing, image plane geometry, ...) cannot be supplied: these describe the acquisition,
  which only the modality knows, and the caller writes a Secondary Capture instead, whose IOD
  does not require them.

Conditions (1C, 2C) are the parts of the standard's conditions that the node's derived images
can meet; a row applies only when its condition holds.
A 2C attribute the source has although its condition is unsatisfied is not allowed either:
General Series Laterality of an unpaired body part (a chest) goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydicom import uid
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from dicomnode.pipeline.attributes import value_or_none
from dicomnode.pipeline.presentation_values import percentile_window
from dicomnode.results.source import unpaired_body_part

CR_IMAGE = uid.ComputedRadiographyImageStorage
DX_FOR_PRESENTATION = uid.DigitalXRayImageStorageForPresentation
DX_FOR_PROCESSING = uid.DigitalXRayImageStorageForProcessing
CT_IMAGE = uid.CTImageStorage

# Sets the attribute on the image from what the image itself says; False when it cannot.
Supply = Callable[[Dataset, str], bool]


def has_value(image: Dataset, keyword: str) -> bool:
    """Whether ``keyword`` is in ``image`` with a value (not absent, not empty), as the
    model-input path reads it (``value_or_none``: blank text counts as empty)."""
    return value_or_none(image, keyword) is not None


def empty(image: Dataset, keyword: str) -> bool:
    """Supply an empty value: Type 2 says "unknown" so."""
    vr = dictionary_VR(keyword)
    image.add_new(keyword, vr, [] if vr == "SQ" else None)
    return True


def cannot(image: Dataset, keyword: str) -> bool:
    """Only the modality knows it: the node does not guess."""
    return False


def fixed(value: object) -> Supply:
    """Supply ``value``, the one the IOD allows."""

    def supply(image: Dataset, keyword: str) -> bool:
        setattr(image, keyword, value)
        return True

    return supply


@dataclass(frozen=True)
class Requirement:
    """An attribute an image IOD requires, and how the node supplies it when it is missing.

    ``type``: "1" a value, "2" present (may be empty), "3" optional but, when present, not
    empty (a sequence whose module asks for an item). ``when``: the condition of a 1C or 2C
    attribute. ``met``: what counts as having it, when more than a value (e.g. CT's third
    Image Type value). ``supply``: how the node gives it one; by default an empty value for
    Type 2 and nothing for Type 1.
    """

    keyword: str
    type: str
    when: Callable[[Dataset], bool] | None = None
    met: Callable[[Dataset], bool] | None = None
    supply: Supply | None = None
    label: str = ""

    def is_met(self, image: Dataset) -> bool:
        if self.met is not None:
            return self.met(image)
        if self.type == "2":
            return self.keyword in image
        return has_value(image, self.keyword)

    def name(self) -> str:
        return self.label or self.keyword


def presentation_intent(image: Dataset) -> str | None:
    """The Presentation Intent Type a DX image's SOP class names (DX Series module: each
    class allows its own value only); None for other classes."""
    intents = {DX_FOR_PRESENTATION: "FOR PRESENTATION", DX_FOR_PROCESSING: "FOR PROCESSING"}
    return intents.get(str(image.SOPClassUID))


def _intent_of_its_class(image: Dataset) -> bool:
    """A source may say the other intent than its class: the derived image keeps the class."""
    return str(image.get("PresentationIntentType", "") or "") == presentation_intent(image)


def _presentation_intent(image: Dataset, keyword: str) -> bool:
    """A DX image's Presentation Intent Type is named by its SOP class (DX Series module)."""
    intent = presentation_intent(image)
    if intent is not None:
        setattr(image, keyword, intent)
    return intent is not None


def _presentation_lut_shape(image: Dataset, keyword: str) -> bool:
    """DX: IDENTITY for MONOCHROME2, INVERSE for MONOCHROME1 (DX Image module)."""
    shapes = {"MONOCHROME2": "IDENTITY", "MONOCHROME1": "INVERSE"}
    shape = shapes.get(str(image.get("PhotometricInterpretation", "")))
    if shape is not None:
        setattr(image, keyword, shape)
    return shape is not None


def _own_window(image: Dataset, keyword: str) -> bool:
    """The window the node's own presentation uses for these pixels (they are the node's)."""
    centre, width = percentile_window(image)
    image.WindowCenter, image.WindowWidth = round(centre, 3), round(width, 3)
    return True


def _empty_unless_body_part_known(image: Dataset, keyword: str) -> bool:
    """Anatomic Region Sequence may be empty only when the anatomy is unknown: a Body Part
    Examined value says it is known, and the node does not translate it into a code."""
    return False if has_value(image, "BodyPartExamined") else empty(image, keyword)


def _anatomy_stated(image: Dataset) -> bool:
    """Anatomic Region Sequence is there, and empty only while the anatomy is unknown."""
    if "AnatomicRegionSequence" not in image:
        return False
    return has_value(image, "AnatomicRegionSequence") or not has_value(image, "BodyPartExamined")


def _for_presentation_without_voi_lut(image: Dataset) -> bool:
    intent = str(image.get("PresentationIntentType", "") or "")
    return intent == "FOR PRESENTATION" and "VOILUTSequence" not in image


def _laterality_unknown(image: Dataset) -> bool:
    """Laterality (2C) is required of a paired body part without Image Laterality; with no
    Body Part Examined the part may be paired, and an empty value says laterality is unknown."""
    return not has_value(image, "ImageLaterality") and not has_value(image, "BodyPartExamined")


def _from_laterality(image: Dataset, keyword: str) -> bool:
    """A DX image's Image Laterality shall be consistent with Laterality (DX Anatomy Imaged
    module): the series' Laterality, when it has a value (R or L), is the image's. Laterality
    then goes: General Series requires it (2C) only without Image Laterality, and does not
    allow it otherwise."""
    laterality = str(value_or_none(image, "Laterality") or "").strip().upper()
    if laterality not in ("R", "L"):
        return False
    setattr(image, keyword, laterality)
    del image.Laterality
    return True


def _any_of(*keywords: str) -> Callable[[Dataset], bool]:
    return lambda image: any(keyword in image for keyword in keywords)


def _third_image_type_value(image: Dataset) -> bool:
    values = list(image.get("ImageType") or [])
    return len(values) >= 3 and bool(str(values[2]).strip())


# Patient, General Study, General Series and General Image: every same-class image has them.
_COMMON = (
    Requirement("PatientName", "2"),
    Requirement("PatientID", "2"),
    Requirement("PatientBirthDate", "2"),
    Requirement("PatientSex", "2"),
    Requirement("StudyDate", "2"),
    Requirement("StudyTime", "2"),
    Requirement("ReferringPhysicianName", "2"),
    Requirement("StudyID", "2"),
    Requirement("AccessionNumber", "2"),
    Requirement("Modality", "1"),  # DX allows DX or PX: the SOP class does not say which
    Requirement("Laterality", "2", when=_laterality_unknown),
    Requirement("InstanceNumber", "2"),
)

_DX = (
    *_COMMON,
    Requirement(
        "PresentationIntentType", "1", met=_intent_of_its_class, supply=_presentation_intent
    ),
    Requirement("FrameOfReferenceUID", "1", when=_any_of("PositionReferenceIndicator")),
    Requirement("PositionReferenceIndicator", "2", when=_any_of("FrameOfReferenceUID")),
    Requirement("PatientOrientation", "1"),
    Requirement("BurnedInAnnotation", "1"),
    Requirement("LossyImageCompression", "1"),
    Requirement("PixelIntensityRelationship", "1"),
    Requirement("PixelIntensityRelationshipSign", "1"),
    Requirement("RescaleIntercept", "1", supply=fixed(0)),
    Requirement("RescaleSlope", "1", supply=fixed(1)),
    Requirement("RescaleType", "1", supply=fixed("US")),
    Requirement("PresentationLUTShape", "1", supply=_presentation_lut_shape),
    Requirement("WindowCenter", "1", when=_for_presentation_without_voi_lut, supply=_own_window),
    Requirement("ImageLaterality", "1", supply=_from_laterality),
    Requirement(
        "AnatomicRegionSequence", "2", met=_anatomy_stated, supply=_empty_unless_body_part_known
    ),
    Requirement("ImagerPixelSpacing", "1"),
    Requirement("DetectorType", "2"),
    Requirement("PositionerType", "2"),
    Requirement("ViewCodeSequence", "3"),
    Requirement("AcquisitionContextSequence", "2"),
)

_CR = (
    *_COMMON,
    Requirement("BodyPartExamined", "2"),
    Requirement("ViewPosition", "2"),
    # 2C: required of images without Image Orientation (Patient), as a radiograph is.
    Requirement("PatientOrientation", "2"),
    # Modality LUT: the three together or none; "US" (unspecified) names units the node
    # does not know.
    Requirement("RescaleIntercept", "1", when=_any_of("RescaleSlope", "RescaleType")),
    Requirement("RescaleSlope", "1", when=_any_of("RescaleIntercept", "RescaleType")),
    Requirement("RescaleType", "1", when=_any_of("RescaleIntercept"), supply=fixed("US")),
)

_CT = (
    *_COMMON,
    Requirement("ImageType", "1", met=_third_image_type_value, label="ImageType value 3"),
    Requirement("PatientPosition", "2"),
    Requirement("FrameOfReferenceUID", "1"),
    Requirement("PositionReferenceIndicator", "2"),
    Requirement("PixelSpacing", "1"),
    Requirement("ImageOrientationPatient", "1"),
    Requirement("ImagePositionPatient", "1"),
    Requirement("SliceThickness", "2"),
    Requirement("RescaleIntercept", "1"),
    Requirement("RescaleSlope", "1"),
    Requirement("KVP", "2"),
    Requirement("AcquisitionNumber", "2"),
)

# SOP Class UID -> what a derived image of that class needs, in the order supplied (later
# rows may read earlier ones: the window is made after the rescale it applies).
REQUIREMENTS: dict[str, tuple[Requirement, ...]] = {
    DX_FOR_PRESENTATION: _DX,
    DX_FOR_PROCESSING: _DX,
    CR_IMAGE: _CR,
    CT_IMAGE: _CT,
}


def supply_required(image: Dataset) -> list[str]:
    """Give ``image`` what its SOP class's IOD requires and the node can supply; return the
    names of what it still lacks (empty: the image may be written as its own class)."""
    unmet = []
    for requirement in REQUIREMENTS[str(image.SOPClassUID)]:
        if requirement.when is not None and not requirement.when(image):
            continue
        if requirement.type == "3":
            if requirement.keyword in image and image[requirement.keyword].is_empty:
                delattr(image, requirement.keyword)
            continue
        if requirement.is_met(image):
            continue
        supply = requirement.supply or (empty if requirement.type == "2" else cannot)
        if not supply(image, requirement.keyword) or not requirement.is_met(image):
            unmet.append(requirement.name())
    # General Series Laterality (2C) is not allowed of an unpaired body part (a chest): the
    # source's value is its slip, read above only for a DX image's Image Laterality.
    if "Laterality" in image and unpaired_body_part(image):
        del image.Laterality
    return unmet
