"""Real DICOM files (those shipped in pydicom's wheel) through decode, presentation and model
input: compressed (JPEG baseline / 12-bit extended / lossless, JPEG-LS, JPEG 2000, RLE),
deflated, big endian, colour secondary captures, a real CT slice, multi-valued windows. Every
shipped file with pixel data is run; the ones that cannot be decoded here must fail with a
DecodeError that names the file and its transfer syntax, never give a silently wrong image."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import spool_and_index
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless

from dicomnode.config import Settings, WorklistSettings
from dicomnode.db.models import Study
from dicomnode.jobs.queue import enqueue
from dicomnode.models.registry import InputSpec, load_card
from dicomnode.pipeline.analyse import StageTimes
from dicomnode.pipeline.decode import DecodeError, first_frame
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.pipeline.presentation_values import presentation_pixels
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.tasks import run_model
from dicomnode.web.study_view import study_detail
from dicomnode.worker import Worker
from dicomnode.worklist.policy import UNREADABLE_ERROR

# Only the files in the wheel: pydicom's get_testdata_file would try to download the others.
TEST_FILES = Path(DATA_ROOT) / "test_files"
MODELS = Path(__file__).resolve().parents[1] / "models"

CXR_SPEC = InputSpec(shape=(1, 256, 256), normalisation="zscore", mean=0.5, std=0.25)
CT_SPEC = InputSpec(shape=(1, 128, 128), normalisation="unit", window=(-600.0, 1500.0))

# Files that cannot be decoded here, and the words their DecodeError must contain.
UNDECODABLE = {
    # A non-conformant 12-bit JPEG (invalid SOS parameters): libjpeg refuses it, Pillow and
    # pydicom's GDCM plugin (python-gdcm 3.2.6, tried) have no 12-bit JPEG; dcmtk's dcmdjpeg
    # decodes it (with a warning) to exactly JPGExtended.dcm's pixels.
    "JPEG-lossy.dcm": ("1.2.840.10008.1.2.4.51", "JPEG Extended", "could not decode"),
    # Its codestream is cut short by a sequence delimiter inside the fragment.
    "JPEG2000-embedded-sequence-delimiter.dcm": (
        "1.2.840.10008.1.2.4.91",
        "JPEG 2000",
        "could not decode",
    ),
    "MR_truncated.dcm": ("1.2.840.10008.1.2.1", "Explicit VR Little Endian", "less than expected"),
    "badVR.dcm": ("Number of Frames", "'1A'"),
    # Group 0028 missing: there is pixel data but nothing says how to read it.
    "meta_missing_tsyntax.dcm": ("lacks", "BitsAllocated"),
    "nested_priv_SQ.dcm": ("lacks", "BitsAllocated"),
}


def _read(name: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some files are deliberately odd
        return pydicom.dcmread(TEST_FILES / name, force=True)


def _files_with_pixels() -> list[str]:
    names = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
        if "PixelData" in ds:
            names.append(path.name)
    return names


PIXEL_FILES = _files_with_pixels()
DECODABLE = [name for name in PIXEL_FILES if name not in UNDECODABLE]


def test_the_wheel_ships_the_files_this_test_is_about() -> None:
    # If pydicom stops shipping them, this says so instead of silently testing less.
    wanted = {
        "JPGExtended.dcm",  # 12-bit JPEG extended, 1024 x 256
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline YBR_FULL secondary capture
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG2000.dcm",
        "693_J2KI.dcm",  # lossy JPEG 2000 CT slice
        "MR_small_RLE.dcm",
        "image_dfl.dcm",  # deflated
        "MR_small_bigendian.dcm",
        "CT_small.dcm",
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
        "examples_overlay.dcm",  # two windows
    }
    assert wanted <= set(PIXEL_FILES)
    assert set(UNDECODABLE) <= set(PIXEL_FILES)
    assert len(DECODABLE) >= 50


@pytest.mark.parametrize("name", DECODABLE)
def test_real_file_decodes_and_prepares(name: str) -> None:
    ds = _read(name)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frame = first_frame(ds)
    colour = int(ds.get("SamplesPerPixel", 1)) == 3
    assert frame.shape == ((rows, cols, 3) if colour else (rows, cols))

    pixels = presentation_pixels(ds)
    assert pixels.shape == (rows, cols) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    if len(np.unique(frame)) > 1:
        assert pixels.max() - pixels.min() > 0.5, "contrast lost"

    sample, geometry = prepare_input(ds, CXR_SPEC)
    assert sample.shape == (1, 256, 256) and sample.dtype == np.float32
    assert np.isfinite(sample).all()
    # Letterbox: the image keeps its aspect ratio (within a pixel) and sits centred.
    resized_rows, resized_cols = geometry.resized_shape
    assert max(resized_rows, resized_cols) == 256
    assert abs(resized_rows * cols - resized_cols * rows) <= max(rows, cols)
    assert geometry.pad_rows == (256 - resized_rows) // 2
    assert geometry.pad_cols == (256 - resized_cols) // 2

    if colour or ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        # A CT window is in HU; a colour image has none: refuse, naming the file.
        with pytest.raises(ValueError, match=re.escape(name)):
            prepare_input(ds, CT_SPEC)
    else:
        windowed, _ = prepare_input(ds, CT_SPEC)
        assert windowed.shape == (1, 128, 128) and np.isfinite(windowed).all()
        assert windowed.min() >= 0.0 and windowed.max() <= 1.0


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_file_names_file_and_transfer_syntax(name: str) -> None:
    ds = _read(name)
    with pytest.raises(DecodeError) as error:
        presentation_pixels(ds)
    message = str(error.value)
    assert name in message
    for words in UNDECODABLE[name]:
        assert words in message
    with pytest.raises(DecodeError, match=re.escape(name)):
        prepare_input(ds, CXR_SPEC)


def test_missing_codec_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a node without JPEG-LS plugins: pydicom's decoder has no available plugin.
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(
        decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")}
    )
    ds = _read("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(DecodeError) as error:
        presentation_pixels(ds)
    message = str(error.value)
    assert "MR_small_jpeg_ls_lossless.dcm" in message and str(ds.SOPInstanceUID) in message
    assert "1.2.840.10008.1.2.4.80 (JPEG-LS Lossless Image Compression)" in message
    assert "no codec for it is installed" in message and "pylibjpeg-libjpeg" in message


def test_unknown_transfer_syntax_is_named() -> None:
    ds = _read("JPEG2000.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"  # a private codec
    with pytest.raises(DecodeError) as error:
        presentation_pixels(ds)
    assert "JPEG2000.dcm" in str(error.value)
    assert "1.2.826.0.1.3680043.9.9999.1" in str(error.value)
    assert "no decoder" in str(error.value)


def test_compressed_encodings_give_the_same_picture() -> None:
    # One MR slice stored 8 ways: lossless codecs and byte orders must not change the picture.
    reference = presentation_pixels(_read("MR_small.dcm"))
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_padded.dcm",
    ):
        assert np.array_equal(presentation_pixels(_read(name)), reference), name


def test_rgb_secondary_capture_becomes_grey() -> None:
    ds = _read("SC_rgb_rle.dcm")  # RGB, lossless
    rgb = ds.pixel_array.astype(np.float64)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    low, high = np.percentile(luma, (0.5, 99.5))
    expected = np.clip((luma - low) / (high - low), 0, 1)
    pixels = presentation_pixels(ds)
    assert np.allclose(pixels, expected, atol=1e-5)
    # The same picture as lossy JPEG in YBR_FULL / YBR_FULL_422 and as JPEG 2000: pydicom's
    # colour conversion must have happened before the grey one (else the error is ~0.3).
    for name in (
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_gdcm_KY.dcm",
    ):
        assert np.abs(presentation_pixels(_read(name)) - pixels).mean() < 0.03, name


def test_monochrome1_is_inverted() -> None:
    # A real 12-bit image stored as MONOCHROME1 (stored values inverted) looks the same.
    ds = _read("JPGExtended.dcm")
    mono2 = presentation_pixels(ds)
    stored = ds.pixel_array
    inverted = Dataset()
    inverted.update(ds)
    inverted.file_meta = ds.file_meta
    inverted.PhotometricInterpretation = "MONOCHROME1"
    inverted.set_pixel_data((4095 - stored).astype(np.uint16), "MONOCHROME1", 12)
    assert np.abs(presentation_pixels(inverted) - mono2).max() < 1e-5
    assert np.corrcoef(inverted.pixel_array.ravel(), mono2.ravel())[0, 1] < -0.95


def _with_voi_lut_sequence(ds: Dataset) -> Dataset:
    """CT_small with a non-linear VOI LUT over -200..+300 HU stored as OW (as real files do),
    written and read back so that LUT Data comes back as bytes."""
    entries = 501
    curve = (np.linspace(0.0, 1.0, entries) ** 0.5 * 4095).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [entries, -200, 12]
    item.add_new("LUTData", "OW", curve.tobytes())
    item.LUTExplanation = "sqrt soft tissue"
    ds.VOILUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 40, 400  # the LUT wins over the window
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_voi_lut_sequence_matches_pydicom() -> None:
    ds = _with_voi_lut_sequence(_read("CT_small.dcm"))
    assert isinstance(ds.VOILUTSequence[0].LUTData, bytes)
    hu = apply_modality_lut(ds.pixel_array, ds)
    expected = apply_voi_lut(np.rint(hu).astype(np.int64), ds, prefer_lut=True) / 4095.0
    pixels = presentation_pixels(ds)
    assert np.allclose(pixels, expected, atol=1e-6)
    assert (pixels == 0).any() and (pixels == 1).any()  # both ends of the LUT are reached


@pytest.mark.parametrize("name", ["examples_overlay.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_first_of_several_windows_matches_pydicom(name: str) -> None:
    ds = _read(name)
    assert ds["WindowCenter"].VM > 1
    values = apply_modality_lut(ds.pixel_array, ds)
    windowed = apply_voi_lut(values, ds, index=0, prefer_lut=False)
    ends = apply_voi_lut(np.array([-1e15, 1e15]), ds, index=0, prefer_lut=False)
    expected = (windowed - ends[0]) / (ends[1] - ends[0])
    pixels = presentation_pixels(ds)
    assert np.allclose(pixels, expected, atol=1e-6)
    second = apply_voi_lut(values, ds, index=1, prefer_lut=False)
    if not np.allclose(windowed, second):
        assert not np.allclose(pixels, (second - ends[0]) / (ends[1] - ends[0]), atol=1e-3)


def test_unusable_window_falls_back_to_percentiles() -> None:
    ds = _read("CT_small.dcm")
    reference = presentation_pixels(ds)  # CT_small has no window: percentiles
    for centre, width in (("", ""), (40, 0), ([40], [])):
        ds.WindowCenter, ds.WindowWidth = centre, width
        assert np.array_equal(presentation_pixels(ds), reference), (centre, width)


def test_missing_optional_attributes_and_no_file_meta() -> None:
    ds = _read("CT_small.dcm")
    hu_window = presentation_pixels(ds, window=(40.0, 400.0))
    for keyword in (
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "PixelSpacing",
        "BodyPartExamined",
        "ViewPosition",
        "WindowCenter",
        "WindowWidth",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    # Written without a File Meta header (as some old archives hold them) and read back.
    buffer = io.BytesIO()
    ds.file_meta = FileMetaDataset()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    buffer.seek(0)
    bare = pydicom.dcmread(buffer, force=True)
    assert "TransferSyntaxUID" not in bare.file_meta
    pixels = presentation_pixels(bare)
    stored = bare.pixel_array.astype(np.float64)
    low, high = np.percentile(stored, (0.5, 99.5))
    assert np.allclose(pixels, np.clip((stored - low) / (high - low), 0, 1), atol=1e-6)
    # Without its rescale the same window is 1024 off: the stored values are not HU.
    assert not np.allclose(presentation_pixels(bare, window=(40.0, 400.0)), hu_window)
    sample, _ = prepare_input(bare, CXR_SPEC)
    assert np.isfinite(sample).all()


def test_compressed_data_without_transfer_syntax_is_refused() -> None:
    ds = _read("JPEG2000.dcm")
    ds.file_meta = FileMetaDataset()
    with pytest.raises(DecodeError, match="no File Meta Transfer Syntax UID"):
        presentation_pixels(ds)


def test_non_square_letterbox_geometry() -> None:
    ds = _read("JPGExtended.dcm")  # 1024 rows x 256 columns
    pixels = presentation_pixels(ds)
    sample, geometry = prepare_input(ds, CXR_SPEC)
    assert geometry.resized_shape == (256, 64)
    assert (geometry.pad_rows, geometry.pad_cols) == (0, 96)
    padding = -CXR_SPEC.mean / CXR_SPEC.std
    assert np.allclose(sample[0][:, :96], padding) and np.allclose(sample[0][:, 160:], padding)
    # Each input pixel is the mean of its 4 x 4 source block.
    blocks = pixels.reshape(256, 4, 64, 4).mean(axis=(1, 3))
    assert np.allclose(sample[0][:, 96:160] * CXR_SPEC.std + CXR_SPEC.mean, blocks, atol=1e-5)
    assert np.allclose(geometry.to_source(127.5, 127.5), (511.5, 127.5))


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm", "693_J2KI.dcm"])
def test_demo_model_analyses_a_real_image(name: str) -> None:
    card = load_card(MODELS / "cxr_pneumothorax_demo.toml")
    ds = _read(name)
    run = run_model(card, [ds], Runtime(["CPUExecutionProvider"]), StageTimes())
    assert len(run.images) == 1 and run.images[0].source is ds
    (finding,) = run.images[0].findings
    assert 0.0 <= finding.probability <= 1.0
    assert finding.heatmap is not None
    assert finding.heatmap.shape == (ds.Rows, ds.Columns)
    assert np.isfinite(finding.heatmap).all()


def test_worker_marks_a_study_with_an_undecodable_image_failed_with_the_reason(
    sessions, tmp_path: Path
) -> None:
    # A chest DX header on the non-conformant 12-bit JPEG: selected, then undecodable.
    ds = _read("JPEG-lossy.dcm")
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"max_attempts": 1})
    with sessions() as session:
        study_id, path = spool_and_index(session, settings.storage_path, ds)
        enqueue(session, "analyse", study_id, {})
        session.commit()
    worker = Worker(settings, sessions, [load_card(MODELS / "cxr_pneumothorax_demo.toml")])
    while worker.run_once():
        pass
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study.analysis_status == "failed"
        # Marked as a study none of whose images can be read (its row says so), then why.
        assert study.analysis_error.startswith(UNREADABLE_ERROR + "cannot decode the pixel data")
        assert str(path) in study.analysis_error
        assert "1.2.840.10008.1.2.4.51 (JPEG Extended (Process 2 and 4))" in study.analysis_error
        # The page and the API show why without the file's path on the server.
        shown = study_detail(session, str(ds.StudyInstanceUID), WorklistSettings()).analysis_error
        assert shown.startswith(UNREADABLE_ERROR + "cannot decode the pixel data")
        assert str(path) not in shown and f"SOP Instance {ds.SOPInstanceUID}" in shown, shown


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_pixel_padding_is_black_and_left_out_of_the_percentile_window(photometric: str) -> None:
    # CT_small (Pixel Padding Value -2000, none used) with a third of it padded, as a
    # collimated radiograph or a CT outside its field of view is.
    ds = _read("CT_small.dcm")
    ds.PhotometricInterpretation = photometric
    stored = ds.pixel_array.copy()
    inside = stored[:, 43:].astype(np.float64)
    stored[:, :43] = -2000
    ds.PixelData = stored.astype("<i2").tobytes()
    pixels = presentation_pixels(ds)
    assert np.all(pixels[:, :43] == 0.0)
    low, high = np.percentile(inside, (0.5, 99.5))
    expected = np.clip((inside - low) / (high - low), 0, 1)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert np.allclose(pixels[:, 43:], expected, atol=1e-6)
    del ds.PixelPaddingValue  # undeclared: -2000 is an ordinary value and widens the window
    assert not np.allclose(presentation_pixels(ds)[:, 43:], expected, atol=1e-2)
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = -2100, -1990  # a range of stored values
    assert np.allclose(presentation_pixels(ds), pixels, atol=1e-6)
