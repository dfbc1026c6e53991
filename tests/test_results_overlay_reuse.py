"""The overlay reuses the presentation of a source image for every model's overlay of it,
and never a stale one: pixels are those of a fresh computation, for the image as it is now."""

from __future__ import annotations

import copy
import gc

import numpy as np
from dciodvfy import chest_xray

from dicomnode.findings import Algorithm, CodedConcept, Finding, ImageFindings
from dicomnode.pipeline.presentation_values import presentation_pixels
from dicomnode.results import overlay as overlay_module
from dicomnode.results.overlay import build_overlay, render_overlay

PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
FIRST = Algorithm(name="cxr-pneumothorax-demo", version="1.0.0")
SECOND = Algorithm(name="cxr-triage-demo", version="1.0.0")


def evaluation(source) -> ImageFindings:
    rows, columns = int(source.Rows), int(source.Columns)
    row, column = np.mgrid[0:rows, 0:columns]
    heat = np.exp(-((column - 90) ** 2 + (row - 110) ** 2) / (2 * 30.0**2)).astype(np.float32)
    finding = Finding(PNEUMOTHORAX, 0.9, 0.5, critical=True, peak=(90.0, 110.0), heatmap=heat)
    return ImageFindings(source=source, findings=[finding])


def fresh(source, algorithm: Algorithm) -> np.ndarray:
    """The overlay pixels computed from scratch (no reuse)."""
    grey = np.asarray(presentation_pixels(source), dtype=np.float32)
    return render_overlay(grey, evaluation(source).findings, algorithm)


def test_second_overlay_of_an_image_equals_a_fresh_one_and_reuses_the_presentation() -> None:
    source = chest_xray(21, size=256)
    first = build_overlay(evaluation(source), FIRST)
    assert id(source) in overlay_module._presented
    second = build_overlay(evaluation(source), SECOND)
    np.testing.assert_array_equal(first.pixel_array, fresh(source, FIRST))
    np.testing.assert_array_equal(second.pixel_array, fresh(source, SECOND))


def test_changed_pixel_data_is_presented_again() -> None:
    source = chest_xray(22, size=256)
    before = build_overlay(evaluation(source), FIRST).pixel_array
    other = chest_xray(23, size=256)
    source.PixelData = other.PixelData  # new Pixel Data object: the kept presentation is stale
    after = build_overlay(evaluation(source), FIRST).pixel_array
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, fresh(source, FIRST))


def test_presentation_is_dropped_with_its_dataset() -> None:
    source = copy.deepcopy(chest_xray(24, size=256))
    build_overlay(evaluation(source), FIRST)
    key = id(source)
    assert key in overlay_module._presented
    del source
    gc.collect()
    assert key not in overlay_module._presented
