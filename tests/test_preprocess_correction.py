"""An image-to-image model's change written back to stored values through the transform the
model saw (imaging review item 5): new stored = VOI^-1(VOI(stored) + change)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.correction import apply_correction
from dicomnode.pipeline.presentation_values import presentation_pixels
from dicomnode.synth.cxr import make_cxr

SPEC = InputSpec(shape=(1, 64, 64), normalisation="unit")


def _phantom(photometric: str = "MONOCHROME2") -> pydicom.Dataset:
    ds, _ = make_cxr(11, pneumothorax=False, size=128, bits=12, photometric=photometric)
    return ds


def _with_stored(ds: pydicom.Dataset, stored: np.ndarray) -> pydicom.Dataset:
    out = copy.deepcopy(ds)
    out.PixelData = stored.astype("<u2").tobytes()
    return out


def _correction(shape: tuple[int, int]) -> np.ndarray:
    """A smooth change of up to +-0.08 presentation units, both signs over the image."""
    rows, cols = np.indices(shape)
    return 0.08 * np.sin(rows / 9.0) * np.cos(cols / 13.0)


def _linear_lut(centre: float, width: float) -> Dataset:
    """The 12-bit VOI LUT of a LINEAR window (PS3.3 C.11.2.1.2.1) over stored values."""
    low = centre - 0.5 - (width - 1) / 2
    entries = np.clip((np.arange(4096) - low) / (width - 1), 0, 1) * 4095
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = np.rint(entries).astype("<u2").tobytes()
    item["LUTData"].VR = "OW"
    return item


def _window(ds: pydicom.Dataset, width: float = 1200) -> None:
    ds.WindowCenter, ds.WindowWidth = 2000, width


def _linear_exact(ds: pydicom.Dataset) -> None:
    ds.WindowCenter, ds.WindowWidth = 2000, 1200
    ds.VOILUTFunction = "LINEAR_EXACT"


def _sigmoid(ds: pydicom.Dataset) -> None:
    ds.WindowCenter, ds.WindowWidth = 2000, 900
    ds.VOILUTFunction = "SIGMOID"


def _linear_voi_lut(ds: pydicom.Dataset, width: float = 1200) -> None:
    del ds.WindowCenter, ds.WindowWidth
    ds.VOILUTSequence = Sequence([_linear_lut(2000, width)])


def _gamma_voi_lut(ds: pydicom.Dataset) -> None:
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [3000, 800, 12]
    item.LUTData = [round(4095 * (v / 2999) ** 0.6) for v in range(3000)]
    ds.VOILUTSequence = Sequence([item])


def _modality_lut(ds: pydicom.Dataset) -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "US"
    lut.LUTData = [round(3000 * (v / 4095) ** 1.5) for v in range(4096)]
    ds.ModalityLUTSequence = Sequence([lut])
    ds.WindowCenter, ds.WindowWidth = 1200, 1500


def _inverse(ds: pydicom.Dataset) -> None:
    ds.PresentationLUTShape = "INVERSE"


def _percentiles(ds: pydicom.Dataset) -> None:
    del ds.WindowCenter, ds.WindowWidth


TRANSFORMS: list[tuple[str, str, Callable[[pydicom.Dataset], None]]] = [
    ("window", "MONOCHROME2", _window),
    ("LINEAR_EXACT", "MONOCHROME2", _linear_exact),
    ("SIGMOID", "MONOCHROME2", _sigmoid),
    ("linear VOI LUT", "MONOCHROME2", _linear_voi_lut),
    ("gamma VOI LUT", "MONOCHROME2", _gamma_voi_lut),
    ("Modality LUT", "MONOCHROME2", _modality_lut),
    ("MONOCHROME1", "MONOCHROME1", _window),
    ("INVERSE", "MONOCHROME2", _inverse),
    ("percentiles", "MONOCHROME2", _percentiles),
]


def _fixed_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The percentile window the source was shown in, to show the result in the same one."""
    if "WindowCenter" in ds or ds.get("VOILUTSequence"):
        return None
    low, high = np.percentile(ds.pixel_array.astype(np.float64), SPEC.window_percentiles)
    return (low + high) / 2, high - low


@pytest.mark.parametrize(
    ("label", "photometric", "vary"), TRANSFORMS, ids=[t[0] for t in TRANSFORMS]
)
def test_result_shows_the_source_plus_the_change(
    label: str, photometric: str, vary: Callable[[pydicom.Dataset], None]
) -> None:
    ds = _phantom(photometric)
    vary(ds)
    window = _fixed_window(ds)
    before = presentation_pixels(ds, window=window).astype(np.float64)
    change = _correction(before.shape)
    stored = apply_correction(ds, change, SPEC)
    after = presentation_pixels(_with_stored(ds, stored), window=window).astype(np.float64)
    wanted = before + change
    # Where the picture is neither saturated before nor after (a change into black or white
    # cannot be seen), it moved by the change, up to rounding to whole stored values.
    seen = (before > 0.02) & (before < 0.98) & (wanted > 0.02) & (wanted < 0.98)
    assert seen.mean() > 0.25, label
    error = np.abs(after - wanted)[seen]
    assert error.mean() < 1.5e-3 and np.percentile(error, 99) < 5e-3, (label, error.max())
    # No change, no change: saturated pixels included.
    assert np.array_equal(apply_correction(ds, np.zeros_like(change), SPEC), ds.pixel_array)


def test_a_voi_lut_and_the_window_it_tabulates_write_the_same_image() -> None:
    """The review's repro: a 700-wide window and its own VOI LUT wrote 2.7 times the change."""
    windowed = _phantom()
    _window(windowed, 700)
    tabulated = _phantom()
    _linear_voi_lut(tabulated, 700)
    assert np.abs(presentation_pixels(windowed) - presentation_pixels(tabulated)).max() < 2e-3
    change = _correction((128, 128))
    source = windowed.pixel_array.astype(np.int64)
    through_window = apply_correction(windowed, change, SPEC) - source
    through_lut = apply_correction(tabulated, change, SPEC) - source
    # Inside and outside the window alike (values beyond it keep their distance from it).
    assert np.abs(through_lut - through_window).max() <= 1
    assert np.abs(through_lut).mean() == pytest.approx(np.abs(through_window).mean(), rel=0.02)


def test_sigmoid_window_is_inverted_by_its_logit() -> None:
    ds = _phantom()
    _sigmoid(ds)
    centre, width = 2000.0, 900.0
    stored = ds.pixel_array.astype(np.float64)
    shown = 1.0 / (1.0 + np.exp(-4.0 * (stored - centre) / width))
    change = _correction(stored.shape)
    target = shown + change
    inside = (target > 0.01) & (target < 0.99)
    target = np.clip(target, 0.01, 0.99)
    exact = centre + width / 4.0 * np.log(target / (1.0 - target))
    written = apply_correction(ds, change, SPEC).astype(np.float64)
    assert np.abs(written - np.clip(np.rint(exact), 0, 4095))[inside].max() <= 1.0
