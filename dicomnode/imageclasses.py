"""Which stored instances are images: a picture the analysis decodes and a radiologist reads.

Pure: no I/O. An image has Pixel Data (what the analysis decodes, ``pipeline.analyse``) and a
SOP Class that is a picture; structured reports (a radiologist's report, a dose report, key
object selections), presentation states, segmentations, RT objects, encapsulated documents
(PDF, CDA), waveforms, raw data and spectroscopy are not, nor video the node does not decode.
Any other class with Pixel Data is an image, a private one included; a class without it (a
vendor's private non-image object) is not.
"""

from __future__ import annotations

# SOP class UID prefixes that are no picture: SR (KOS among them), presentation states, raw
# data / spatial registration / SEG / surface segmentation, RT, encapsulated documents,
# waveforms, MR spectroscopy.
NOT_IMAGES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.481.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.9.",
    "1.2.840.10008.5.1.4.1.1.4.2",
)
# And these, by their whole UID (the still images beside them, e.g. VL Endoscopic 77.1.1 or
# Ophthalmic Photography 77.1.5.1, are images): video (MPEG-2, H.264, HEVC) that the node
# does not decode, and the pixel-less Stereometric Relationship.
NOT_IMAGE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.3",  # Stereometric Relationship Storage
    }
)


# Pictures among the classes under a prefix above: RT Image (a portal or simulator radiograph).
IMAGES_DESPITE_PREFIX = frozenset({"1.2.840.10008.5.1.4.1.1.481.1"})


def image_class(sop_class_uid: str) -> bool:
    """Whether instances of this SOP Class are pictures (any class not named above)."""
    if sop_class_uid in IMAGES_DESPITE_PREFIX:
        return True
    return not sop_class_uid.startswith(NOT_IMAGES) and sop_class_uid not in NOT_IMAGE_CLASSES


def is_image(sop_class_uid: str, has_pixel_data: bool) -> bool:
    """Whether an instance is an image: Pixel Data in a SOP Class that is a picture."""
    return has_pixel_data and image_class(sop_class_uid)
