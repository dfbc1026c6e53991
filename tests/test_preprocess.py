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
from dicomnode.pipeline.letterbox import Letterbox
from dicomnode.pipeline.preprocess import Presentation, prepare_input
from dicomnode.pipeline.presentation_values import presentation_pixels
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
    from dicomnode.pipeline import presentation_values

    stored = ds.pixel_array
    padding = presentation_values.padding_mask(ds, stored)
    for window in (None, (300.0, 2500.0)):
        with np.errstate(over="ignore"):  # the sigmoid's exp for the darkest pixels
            direct = presentation_values._unit_interval(ds, stored, window, (0.5, 99.5), padding)
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


# --- inversion, padding, VOI LUT output range (imaging review items 9, 10, 13) ------------------


def test_presentation_lut_shape_inverse_inverts_monochrome2_once_and_monochrome1_once() -> None:
    mono2, _ = make_cxr(4, pneumothorax=False, size=128)
    assert mono2.PresentationLUTShape == "IDENTITY"
    reference = presentation_pixels(mono2)
    inverse = copy.deepcopy(mono2)
    inverse.PresentationLUTShape = "INVERSE"  # P-Value = max - VOI output (PS3.3 C.11.6.1.2)
    assert np.allclose(presentation_pixels(inverse), 1.0 - reference, atol=1e-6)
    # MONOCHROME1 with INVERSE (as the DX module requires) is one inversion, not two; without a
    # Presentation LUT Shape, or with IDENTITY, MONOCHROME1 alone says the same.
    mono1, _ = make_cxr(4, pneumothorax=False, size=128, photometric="MONOCHROME1")
    assert mono1.PresentationLUTShape == "INVERSE"
    looks = presentation_pixels(mono1)
    assert np.abs(looks - reference).max() < 2e-3
    for shape in (None, "IDENTITY"):
        other = copy.deepcopy(mono1)
        if shape is None:
            del other.PresentationLUTShape
        else:
            other.PresentationLUTShape = shape
        assert np.array_equal(presentation_pixels(other), looks)


def test_padding_value_written_as_us_on_a_signed_image_is_its_twos_complement() -> None:
    from dicomnode.pipeline import presentation_values

    ds, _ = make_cxr(6, pneumothorax=False, size=64)
    hounsfield = np.full((64, 64), -2000, dtype=np.int16)
    hounsfield[8:56, 8:56] = np.tile(np.linspace(-1000, 400, 48).astype(np.int16), (48, 1))
    ds.PixelRepresentation = 1
    ds.PixelData = hounsfield.astype("<i2").tobytes()
    del ds.WindowCenter, ds.WindowWidth
    ds.add_new(0x00280120, "US", 63536)  # -2000 as a 16-bit US
    padding = presentation_values.padding_mask(ds, ds.pixel_array)
    assert padding is not None and padding.sum() == 64 * 64 - 48 * 48
    # Left out of the percentile window: the image inside spans the whole 0..1.
    pixels = presentation_pixels(ds)
    assert pixels[8:56, 8:56].min() == 0.0 and pixels[8:56, 8:56].max() == 1.0
    assert np.all(pixels[padding] == 0.0)
    # A range limit written the same way; unsigned images keep large values as they are.
    ds.add_new(0x00280121, "US", 64536)  # -1000
    assert presentation_values.padding_mask(ds, ds.pixel_array).sum() == 64 * 64 - 48 * 47
    unsigned, _ = make_cxr(6, pneumothorax=False, size=64)
    unsigned.PixelPaddingValue = 4000
    assert presentation_values._as_stored(unsigned, 63536) == 63536


def _lut_item(descriptor: list[int], entries: list[int] | np.ndarray) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = [int(v) for v in entries]
    return item


def test_voi_lut_output_range_is_the_lut_bit_depth_not_its_entries() -> None:
    """PS3.3 C.11.2.1.1: a VOI LUT's output range is 0 to 2^n - 1 for n bits per entry; a LUT
    that uses part of it shows part of the grey scale (the table's own min..max stretched it)."""
    ds, _ = make_cxr(6, pneumothorax=False, size=128)
    stored = ds.pixel_array.astype(np.float64)
    half = [1000 + v // 4 for v in range(4096)]  # 1000..2023 of a 12-bit range
    ds.VOILUTSequence = Sequence([_lut_item([4096, 0, 12], half)])
    expected = (1000 + np.floor(stored / 4)) / 4095
    assert np.allclose(presentation_pixels(ds), expected, atol=1e-6)
    # 16 bits per entry: the same entries are a sixteenth as bright.
    ds.VOILUTSequence = Sequence([_lut_item([4096, 0, 16], half)])
    assert np.allclose(presentation_pixels(ds), (1000 + np.floor(stored / 4)) / 65535, atol=1e-6)
    # Entries that do not fit the declared bits widen them to the bits the entries need.
    ds.VOILUTSequence = Sequence([_lut_item([4096, 0, 8], range(4096))])
    assert np.allclose(presentation_pixels(ds), stored / 4095, atol=1e-6)


def test_eight_bit_voi_lut_of_more_than_256_entries_is_looked_up_whole() -> None:
    """pydicom 3.0 indexes 8-bit LUTs through uint8: input 4095 read entry 4095 - 16 * 256."""
    ds, _ = make_cxr(6, pneumothorax=False, size=128)
    stored = ds.pixel_array.astype(np.float64)
    ds.VOILUTSequence = Sequence([_lut_item([4096, 0, 8], [v // 16 for v in range(4096)])])
    assert np.allclose(presentation_pixels(ds), np.floor(stored / 16) / 255, atol=1e-6)
    # The same LUT as OW data, one 8-bit entry per 16-bit word and two to a word.
    for packing in ("<u2", "<u1"):
        ow = copy.deepcopy(ds)
        ow.VOILUTSequence[0].LUTData = (np.arange(4096) // 16).astype(packing).tobytes()
        ow.VOILUTSequence[0]["LUTData"].VR = "OW"
        assert np.array_equal(presentation_pixels(ow), presentation_pixels(ds)), packing


# --- non-square pixels (imaging review item 12) ---------------------------------------------------


def _disc_on_anisotropic_pixels(row_spacing: float, col_spacing: float) -> pydicom.Dataset:
    """300 columns x 200 rows with a disc of radius 8 mm centred on pixel (row 110, col 180)."""
    ds, _ = make_cxr(8, pneumothorax=False, size=64)
    rows, cols = np.indices((200, 300))
    disc = ((rows - 110) * row_spacing) ** 2 + ((cols - 180) * col_spacing) ** 2 <= 8.0**2
    out = _replace_pixels(ds, np.where(disc, 4000, 100).astype(np.uint16))
    out.WindowCenter, out.WindowWidth = 2050, 3900
    out.ImagerPixelSpacing = [row_spacing, col_spacing]
    return out


def test_pixel_aspect_from_spacings_or_aspect_ratio() -> None:
    from dicomnode.pipeline.letterbox import pixel_aspect

    ds, _ = make_cxr(8, pneumothorax=False, size=64)
    assert pixel_aspect(ds) == 1.0  # the phantom's square Imager Pixel Spacing
    ds.ImagerPixelSpacing = [0.2, 0.1]
    assert pixel_aspect(ds) == 2.0
    ds.PixelSpacing = [0.15, 0.3]  # at the patient: preferred to the detector's
    assert pixel_aspect(ds) == 0.5
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    ds.PixelAspectRatio = [5, 4]  # vertical : horizontal
    assert pixel_aspect(ds) == 1.25
    del ds.PixelAspectRatio
    for unusable in ([0.0, 0.1], [0.139, 0.1391], [0.139, 139.0]):  # zero, rounding, typo
        ds.PixelSpacing = unusable
        assert pixel_aspect(ds) == 1.0, unusable


@pytest.mark.parametrize(("row_spacing", "col_spacing"), [(0.2, 0.1), (0.1, 0.25)])
def test_non_square_pixels_are_resampled_square_and_map_back(
    row_spacing: float, col_spacing: float
) -> None:
    ds = _disc_on_anisotropic_pixels(row_spacing, col_spacing)
    sample, geometry = prepare_input(ds, InputSpec(shape=(1, 128, 128), normalisation="unit"))
    # The field of view keeps its shape in millimetres: 40 x 30 mm or 20 x 75 mm.
    rows, cols = geometry.resized_shape
    assert abs(rows / cols - (200 * row_spacing) / (300 * col_spacing)) < 0.02
    assert geometry.scale / geometry.col_scale == pytest.approx(row_spacing / col_spacing, 0.02)
    # The disc is round in the input (an ellipse of 2.5:1 in pixels when stretched by pixels).
    disc = sample[0] > 0.5
    inside_rows, inside_cols = np.nonzero(disc)
    height = inside_rows.max() - inside_rows.min() + 1
    width = inside_cols.max() - inside_cols.min() + 1
    assert abs(height - width) <= 1.5, (height, width)
    # Source -> input -> source within a pixel, and the disc's centre onto the disc's centre.
    for point in ((60.0, 200.0), (0.0, 0.0), (199.0, 299.0), (123.4, 56.7)):
        back = geometry.to_source(*geometry.to_input(*point))
        assert np.allclose(back, point, atol=1e-9)
    centre = geometry.to_input(110.0, 180.0)
    assert np.allclose(centre, (inside_rows.mean(), inside_cols.mean()), atol=1.0)
    source_centre = geometry.to_source(inside_rows.mean(), inside_cols.mean())
    assert np.allclose(source_centre, (110.0, 180.0), atol=1.0)
    # A map over the input (the disc itself, at a quarter of its resolution) comes back as the
    # disc over the source pixels.
    coarse = sample[0].reshape(32, 4, 32, 4).mean(axis=(1, 3))
    heatmap = geometry.map_to_source(coarse)
    truth = ds.pixel_array > 2000
    assert heatmap.shape == truth.shape
    overlap = ((heatmap > 0.5) & truth).sum() / ((heatmap > 0.5) | truth).sum()
    assert overlap > 0.8, overlap
