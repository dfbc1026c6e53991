"""Preprocessing: what the radiologist sees, resized to the model input and mapped back."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.preprocess import (
    Letterbox,
    Presentation,
    prepare_input,
    presentation_pixels,
)
from dicomnode.synth.cxr import make_cxr


def _replace_pixels(ds: pydicom.Dataset, pixels: np.ndarray) -> pydicom.Dataset:
    """A copy of ``ds`` with other 16-bit unsigned pixel data (any rows x columns)."""
    out = ds.copy()
    out.Rows, out.Columns = pixels.shape
    out.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return out


def _marker_image(rows: int, cols: int, row: int, col: int) -> pydicom.Dataset:
    """Dark image with a bright 6 x 6 block whose centre is (row + 2.5, col + 2.5)."""
    ds, _ = make_cxr(8, pneumothorax=False, size=64)
    pixels = np.full((rows, cols), 100, dtype=np.uint16)
    pixels[row : row + 6, col : col + 6] = 4000
    out = _replace_pixels(ds, pixels)
    out.WindowCenter, out.WindowWidth = 2050, 3900
    return out


def _centroid(image: np.ndarray) -> tuple[float, float]:
    weights = np.clip(image - image.min(), 0, None)
    rows, cols = np.indices(image.shape)
    return float((rows * weights).sum() / weights.sum()), float(
        (cols * weights).sum() / weights.sum()
    )


def test_monochrome1_and_monochrome2_look_the_same() -> None:
    mono2, _ = make_cxr(4, pneumothorax=True, size=256)
    mono1, _ = make_cxr(4, pneumothorax=True, size=256, photometric="MONOCHROME1")
    assert not np.array_equal(mono1.pixel_array, mono2.pixel_array)
    first, second = presentation_pixels(mono2), presentation_pixels(mono1)
    assert first.dtype == np.float32 and first.shape == (256, 256)
    assert np.abs(first - second).max() < 2e-3
    # Without a window both fall back to the same percentile window.
    for ds in (mono1, mono2):
        del ds.WindowCenter, ds.WindowWidth
    assert np.abs(presentation_pixels(mono2) - presentation_pixels(mono1)).max() < 2e-3


def test_window_is_applied() -> None:
    ds, _ = make_cxr(6, pneumothorax=False, size=128)
    stored = ds.pixel_array.astype(np.float64)
    ds.WindowCenter, ds.WindowWidth = 2000, 1000
    pixels = presentation_pixels(ds)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert np.all(pixels[stored <= 1499] == 0.0)
    assert np.all(pixels[stored >= 2500] == 1.0)
    inside = (stored > 1600) & (stored < 2400)
    expected = (stored[inside] - 1999.5) / 999 + 0.5
    assert np.allclose(pixels[inside], expected, atol=1e-4)


def test_first_of_multiple_windows_and_rescale() -> None:
    ds, _ = make_cxr(6, pneumothorax=False, size=128)
    ds.WindowCenter, ds.WindowWidth = [2000, 500], [1000, 200]
    reference = presentation_pixels(ds)
    # The same picture with a modality rescale: the window is in rescaled units.
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = [2 * 2000 - 100 - 0.5, 0], [2 * 1000 - 1, 1]
    assert np.abs(presentation_pixels(ds) - reference).max() < 2e-3


def test_voi_lut_sequence_is_applied() -> None:
    ds, _ = make_cxr(6, pneumothorax=False, size=128)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = [4095 - v for v in range(4096)]  # an inverting LUT
    ds.VOILUTSequence = Sequence([item])
    expected = 1.0 - ds.pixel_array.astype(np.float64) / 4095
    assert np.allclose(presentation_pixels(ds), expected, atol=1e-5)


def _every_transform() -> list[tuple[str, pydicom.Dataset]]:
    """Radiographs whose presentation is a function of the stored value alone, one per
    transform: window, MONOCHROME1, VOI LUT, sigmoid VOI, Modality LUT, rescale with signed
    pixels and padding, the same big endian."""
    ds, _ = make_cxr(6, pneumothorax=False, size=128)
    cases = [("window", ds)]
    mono1, _ = make_cxr(6, pneumothorax=False, size=128, photometric="MONOCHROME1")
    cases.append(("MONOCHROME1", mono1))
    voi = copy.deepcopy(ds)
    item = Dataset()
    item.LUTDescriptor = [2048, 1000, 12]
    item.LUTData = [int(4095 * (v / 2047) ** 0.5) for v in range(2048)]
    voi.VOILUTSequence = Sequence([item])
    cases.append(("VOI LUT", voi))
    sigmoid = copy.deepcopy(ds)
    sigmoid.VOILUTFunction = "SIGMOID"
    cases.append(("sigmoid", sigmoid))
    modality = copy.deepcopy(ds)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "US"
    lut.LUTData = [v // 2 + 7 for v in range(4096)]
    modality.ModalityLUTSequence = Sequence([lut])
    modality.WindowCenter, modality.WindowWidth = 1000, 1500
    cases.append(("Modality LUT", modality))
    signed = copy.deepcopy(ds)
    stored = ds.pixel_array.astype(np.int16) - 2048
    stored[:8] = -2000
    signed.PixelRepresentation = 1
    signed.PixelData = stored.astype("<i2").tobytes()
    signed.RescaleSlope, signed.RescaleIntercept = 0.5, -3
    signed.WindowCenter, signed.WindowWidth = -200, 700
    signed.PixelPaddingValue = -2000
    cases.append(("signed, rescale, padding", signed))
    big = copy.deepcopy(signed)
    big.PixelData = stored.astype(">i2").tobytes()
    big.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    cases.append(("signed, big endian", big))
    return cases


@pytest.mark.parametrize(("label", "ds"), _every_transform())
def test_looked_up_presentation_equals_the_transforms_applied_to_every_pixel(
    label: str, ds: pydicom.Dataset
) -> None:
    from dicomnode.pipeline import preprocess

    stored = ds.pixel_array
    padding = preprocess._padding(ds, stored)
    for window in (None, (300.0, 2500.0)):
        with np.errstate(over="ignore"):  # the sigmoid's exp for the darkest pixels
            direct = preprocess._unit_interval(ds, stored, window, (0.5, 99.5), padding)
        if padding is not None:
            direct[padding] = 0.0
        looked_up = presentation_pixels(ds, window=window)
        assert looked_up.dtype == np.float32 and looked_up.shape == stored.shape
        assert np.array_equal(looked_up, direct), (label, window)
        assert looked_up.std() > 0.01, (label, window)  # a picture, not a constant


def test_models_of_one_input_size_share_one_resampling(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    ds, _ = make_cxr(6, pneumothorax=False, size=512)
    presentation = Presentation(presentation_pixels(ds))
    specs = [
        InputSpec(shape=(1, 128, 128), mean=0.4, std=0.2),
        InputSpec(shape=(3, 128, 128), normalisation="unit"),
        InputSpec(shape=(1, 64, 96), normalisation="unit", resize="stretch"),
        InputSpec(shape=(1, 128, 128), mean=0.5, std=0.25),
    ]
    alone = [prepare_input(ds, spec) for spec in specs]
    pictures: list[tuple[int, int]] = []
    real = Image.fromarray

    def fromarray(array: np.ndarray, mode: str | None = None) -> Image.Image:
        pictures.append(array.shape)
        return real(array, mode)

    monkeypatch.setattr(Image, "fromarray", fromarray)

    shared = [prepare_input(ds, spec, pixels=presentation) for spec in specs]

    for (sample, geometry), (expected, expected_geometry) in zip(shared, alone, strict=True):
        assert geometry == expected_geometry
        assert np.array_equal(sample, expected)
    assert pictures == [(512, 512)]  # one Pillow image for the four inputs
    assert presentation.nbytes > presentation.pixels.nbytes
    # What the models share cannot be written by one of them.
    with pytest.raises(ValueError, match="read-only"):
        presentation.resized(128, 128)[0, 0] = 1.0


def test_percentile_window_without_voi() -> None:
    ds, _ = make_cxr(6, pneumothorax=False, size=128)
    del ds.WindowCenter, ds.WindowWidth
    pixels = presentation_pixels(ds, window_percentiles=(5.0, 95.0))
    assert np.isclose((pixels == 0).mean(), 0.05, atol=0.01)
    assert np.isclose((pixels == 1).mean(), 0.05, atol=0.01)


def test_input_shape_dtype_and_normalisation() -> None:
    ds, _ = make_cxr(7, pneumothorax=False, size=256)
    unit, geometry = prepare_input(ds, InputSpec(shape=(3, 128, 128), normalisation="unit"))
    assert unit.shape == (3, 128, 128) and unit.dtype == np.float32
    assert np.array_equal(unit[0], unit[2])
    assert geometry == Letterbox((256, 256), 0.5, 0, 0, (128, 128), 0.5)
    zscore, _ = prepare_input(ds, InputSpec(shape=(1, 128, 128), mean=0.4, std=0.2))
    assert np.allclose(zscore[0], (unit[0] - 0.4) / 0.2, atol=1e-5)


def test_letterbox_round_trip_on_a_non_square_image() -> None:
    # 400 rows x 200 columns into 100 x 100: scale 1/4, 25 columns of padding on each side.
    ds = _marker_image(400, 200, row=300, col=40)
    spec = InputSpec(shape=(1, 100, 100), normalisation="zscore", mean=0.5, std=0.25)
    sample, geometry = prepare_input(ds, spec)
    assert (geometry.pad_rows, geometry.pad_cols, geometry.scale) == (0, 25, 0.25)
    assert np.allclose(sample[0][:, :25], -2.0)  # padding is 0 before normalisation
    row, col = _centroid(sample[0])
    source_row, source_col = geometry.to_source(row, col)
    assert abs(source_row - 302.5) < 1.0 and abs(source_col - 42.5) < 1.0


def test_letterbox_wide_image_pads_rows() -> None:
    ds = _marker_image(150, 300, row=20, col=250)
    sample, geometry = prepare_input(ds, InputSpec(shape=(1, 64, 64), normalisation="unit"))
    assert geometry.pad_cols == 0 and geometry.pad_rows == 16
    source_row, source_col = geometry.to_source(*_centroid(sample[0]))
    assert abs(source_row - 22.5) < 1.5 and abs(source_col - 252.5) < 1.5


def test_map_to_source_puts_a_coarse_map_back_on_the_image() -> None:
    ds = _marker_image(400, 200, row=300, col=40)
    _, geometry = prepare_input(ds, InputSpec(shape=(1, 128, 128), normalisation="unit"))
    # A 16 x 16 map (stride 8 over the input) with one hot cell over the marker.
    hot_row, hot_col = geometry.scale * 302.5, geometry.pad_cols + geometry.col_scale * 42.5
    coarse = np.zeros((16, 16), dtype=np.float32)
    coarse[int(hot_row // 8), int(hot_col // 8)] = 1.0
    heatmap = geometry.map_to_source(coarse)
    assert heatmap.shape == (400, 200) and heatmap.dtype == np.float32
    peak_row, peak_col = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    cell = 8 / geometry.scale  # one map cell in source pixels
    assert abs(peak_row - 302.5) <= cell and abs(peak_col - 42.5) <= cell


def test_stretch_resize() -> None:
    ds = _marker_image(400, 200, row=300, col=40)
    spec = InputSpec(shape=(1, 100, 100), normalisation="unit", resize="stretch")
    sample, geometry = prepare_input(ds, spec)
    assert sample.shape == (1, 100, 100) and geometry.pad_cols == 0
    source_row, source_col = geometry.to_source(*_centroid(sample[0]))
    assert abs(source_row - 302.5) < 1.5 and abs(source_col - 42.5) < 1.5


def test_first_frame_of_a_multi_frame_image() -> None:
    ds, _ = make_cxr(9, pneumothorax=False, size=64)
    frames = np.stack([ds.pixel_array, 4095 - ds.pixel_array])
    ds.NumberOfFrames = 2
    ds.PixelData = frames.astype("<u2").tobytes()
    single, _ = make_cxr(9, pneumothorax=False, size=64)
    assert np.array_equal(presentation_pixels(ds), presentation_pixels(single))


def test_unsupported_transfer_syntax_names_the_instance() -> None:
    ds, _ = make_cxr(10, pneumothorax=False, size=64)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3not a real stream"])
    ds["PixelData"].VR = "OB"
    with pytest.raises(ValueError, match=ds.SOPInstanceUID) as error:
        presentation_pixels(ds)
    assert "1.2.840.10008.1.2.4.100" in str(error.value)
