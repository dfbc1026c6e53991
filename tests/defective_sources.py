"""Source images with the slips real modalities and archives make: a Type 1 attribute of their
IOD missing or empty, a Type 2 one missing. The node's results of them must still be valid.

Each defect says whether the node can still write a derived image of the source's own class
(it can supply what is missing without guessing: a Type 2 empty, a value the IOD fixes) or must
write a Secondary Capture (only the modality knows it: patient orientation, geometry, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dciodvfy import ct_series
from pydicom.dataset import Dataset

from dicomnode.synth.cxr import make_cxr

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class Defect:
    """``slip`` spoils a ``kind`` ("DX", "CR", "CT") source; ``same_class``: whether its
    derived image keeps the source's SOP class."""

    name: str
    kind: str
    slip: Callable[[Dataset], None]
    same_class: bool

    def source(self) -> Dataset:
        source = conforming(self.kind)
        self.slip(source)
        return source


def conforming(kind: str) -> Dataset:
    """A dciodvfy-valid source of ``kind``: the synthetic chest DX or CR, or a CT slice."""
    if kind == "CT":
        return ct_series(1, rows=48, columns=40)[0]
    return make_cxr(3, size=64, modality=kind)[0]


def _missing(*keywords: str) -> Callable[[Dataset], None]:
    def slip(source: Dataset) -> None:
        for keyword in keywords:
            delattr(source, keyword)

    return slip


def _empty(*keywords: str) -> Callable[[Dataset], None]:
    def slip(source: Dataset) -> None:
        for keyword in keywords:
            source[keyword].value = None
        if "AnatomicRegionSequence" in keywords:
            source.AnatomicRegionSequence = []

    return slip


def _bare_bones(source: Dataset) -> None:
    """Only what identifies the image and describes its pixels, as some converters write."""
    keep = {
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
    }
    for element in list(source):
        if element.keyword not in keep:
            del source[element.tag]


def _lateral(
    laterality: str, spoil: Callable[..., Callable[[Dataset], None]]
) -> Callable[[Dataset], None]:
    """A radiograph of a paired part whose series says ``laterality`` and whose Image
    Laterality is spoilt: DX requires that (Type 1) and the node takes it from Laterality,
    which it shall match."""

    def slip(source: Dataset) -> None:
        source.BodyPartExamined = "HAND"
        source.AnatomicRegionSequence[0].CodeValue = "85562004"
        source.AnatomicRegionSequence[0].CodeMeaning = "Hand"
        source.Laterality = laterality
        spoil("ImageLaterality")(source)

    return slip


def _chest_with_laterality(
    laterality: str, image_laterality: str | None
) -> Callable[[Dataset], None]:
    """A chest radiograph whose series says ``laterality``: General Series Laterality (2C) is
    not allowed for an unpaired body part, so the node's objects leave it out. Image
    Laterality ``None``: it is missing too (Type 1 in DX); a derived DX image takes it from
    Laterality, with which it shall be consistent, as for a paired part."""

    def slip(source: Dataset) -> None:
        assert source.BodyPartExamined == "CHEST"
        source.Laterality = laterality
        if image_laterality is not None:
            source.ImageLaterality = image_laterality
        elif "ImageLaterality" in source:
            del source.ImageLaterality

    return slip


def _centre_without_width(source: Dataset) -> None:
    del source.WindowWidth


def _defects() -> list[Defect]:
    sc, same = False, True
    dx = [
        Defect("no PatientOrientation", "DX", _missing("PatientOrientation"), sc),
        Defect("empty PatientOrientation", "DX", _empty("PatientOrientation"), sc),
        Defect("no ImagerPixelSpacing", "DX", _missing("ImagerPixelSpacing"), sc),
        Defect("empty ImageLaterality", "DX", _empty("ImageLaterality"), sc),
        Defect("no ImageLaterality, Laterality L", "DX", _lateral("L", _missing), same),
        Defect("empty ImageLaterality, Laterality R", "DX", _lateral("R", _empty), same),
        Defect("no PixelIntensityRelationship", "DX", _missing("PixelIntensityRelationship"), sc),
        Defect(
            "empty PixelIntensityRelationshipSign",
            "DX",
            _empty("PixelIntensityRelationshipSign"),
            sc,
        ),
        Defect("no BurnedInAnnotation", "DX", _missing("BurnedInAnnotation"), sc),
        Defect("no LossyImageCompression", "DX", _missing("LossyImageCompression"), sc),
        Defect("empty Modality", "DX", _empty("Modality"), sc),
        Defect("empty AnatomicRegionSequence", "DX", _empty("AnatomicRegionSequence"), sc),
        Defect("bare bones", "DX", _bare_bones, sc),
        Defect("no PresentationIntentType", "DX", _missing("PresentationIntentType"), same),
        Defect("empty PresentationLUTShape", "DX", _empty("PresentationLUTShape"), same),
        Defect(
            "no rescale",
            "DX",
            _missing("RescaleIntercept", "RescaleSlope", "RescaleType"),
            same,
        ),
        Defect(
            "no window",
            "DX",
            _missing("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"),
            same,
        ),
        Defect("window centre without width", "DX", _centre_without_width, same),
        Defect("empty ViewCodeSequence", "DX", _empty("ViewCodeSequence"), same),
        Defect(
            "no DetectorType, PositionerType, AcquisitionContextSequence",
            "DX",
            _missing("DetectorType", "PositionerType", "AcquisitionContextSequence"),
            same,
        ),
        Defect("empty BodyPartExamined", "DX", _empty("BodyPartExamined"), same),
        Defect(
            "CHEST with Laterality R, Image Laterality U",
            "DX",
            _chest_with_laterality("R", "U"),
            same,
        ),
        Defect(
            "CHEST with Laterality L, Image Laterality L",
            "DX",
            _chest_with_laterality("L", "L"),
            same,
        ),
        Defect(
            "CHEST with Laterality L, no ImageLaterality",
            "DX",
            _chest_with_laterality("L", None),
            same,
        ),
        Defect(
            "no patient and study Type 2",
            "DX",
            _missing("PatientName", "PatientBirthDate", "AccessionNumber", "StudyID"),
            same,
        ),
    ]
    cr = [
        Defect("no RescaleIntercept", "CR", _missing("RescaleIntercept"), sc),
        Defect("no Modality", "CR", _missing("Modality"), sc),
        Defect("no PatientOrientation", "CR", _missing("PatientOrientation"), same),
        Defect(
            "no BodyPartExamined and ViewPosition",
            "CR",
            _missing("BodyPartExamined", "ViewPosition"),
            same,
        ),
        Defect("no RescaleType", "CR", _missing("RescaleType"), same),
        Defect("empty BodyPartExamined", "CR", _empty("BodyPartExamined"), same),
        Defect("CHEST with Laterality R", "CR", _chest_with_laterality("R", None), same),
    ]
    ct = [
        Defect("no ImagePositionPatient", "CT", _missing("ImagePositionPatient"), sc),
        Defect("empty ImageOrientationPatient", "CT", _empty("ImageOrientationPatient"), sc),
        Defect("empty PixelSpacing", "CT", _empty("PixelSpacing"), sc),
        Defect("no FrameOfReferenceUID", "CT", _missing("FrameOfReferenceUID"), sc),
        Defect("no ImageType", "CT", _missing("ImageType"), sc),
        Defect("no RescaleIntercept", "CT", _missing("RescaleIntercept"), sc),
        Defect("bare bones", "CT", _bare_bones, sc),
        Defect(
            "no KVP, AcquisitionNumber, PatientPosition",
            "CT",
            _missing("KVP", "AcquisitionNumber", "PatientPosition"),
            same,
        ),
        Defect("empty SliceThickness", "CT", _empty("SliceThickness"), same),
        Defect("no SliceThickness", "CT", _missing("SliceThickness"), same),
        Defect("no BodyPartExamined", "CT", _missing("BodyPartExamined"), same),
        Defect("empty BodyPartExamined", "CT", _empty("BodyPartExamined"), same),
    ]
    return dx + cr + ct


DEFECTS = _defects()
DEFECT_IDS = [f"{defect.kind} {defect.name}" for defect in DEFECTS]
