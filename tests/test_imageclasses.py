"""Which SOP Classes are pictures (dicomnode.imageclasses): pure."""

from __future__ import annotations

from dicomnode.imageclasses import image_class, is_image


def test_rt_image_is_an_image_and_the_other_rt_objects_are_not() -> None:
    """RT Image (a portal radiograph) lies under the RT prefix the other RT objects share."""
    assert image_class("1.2.840.10008.5.1.4.1.1.481.1")  # RT Image
    for rt in ("1.2.840.10008.5.1.4.1.1.481.2", "1.2.840.10008.5.1.4.1.1.481.3"):
        assert not image_class(rt), rt  # RT Dose, RT Structure Set
    assert is_image("1.2.840.10008.5.1.4.1.1.481.1", has_pixel_data=True)
    assert not is_image("1.2.840.10008.5.1.4.1.1.481.1", has_pixel_data=False)


def test_reports_states_and_segmentations_are_not_images() -> None:
    for uid in (
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
        "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    ):
        assert not is_image(uid, has_pixel_data=True), uid
