"""From a DICOM image to a model input, and from model maps back to the source image.

Pure functions: the only I/O is pydicom decoding the pixel data already in the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicomnode.models.registry import InputSpec

DEFAULT_WINDOW_PERCENTILES = (0.5, 99.5)


def _stored_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded stored values of the first frame; ValueError naming the instance if impossible."""
    sop_instance_uid = ds.get("SOPInstanceUID", "<no SOP Instance UID>")
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "<unknown>")
    if "PixelData" not in ds:
        raise ValueError(f"SOP Instance {sop_instance_uid} has no Pixel Data to preprocess")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises several types for missing codecs
        name = getattr(transfer_syntax, "name", "")
        raise ValueError(
            f"cannot decode the pixel data of SOP Instance {sop_instance_uid} "
            f"(transfer syntax {transfer_syntax} {name}): {error}. The pixel data is corrupt or "
            "its codec is missing: install the pydicom pixel data plugin for this transfer syntax "
            "or have the sender use an uncompressed one"
        ) from error
    if ds.get("SamplesPerPixel", 1) != 1:
        raise ValueError(
            f"SOP Instance {sop_instance_uid} has {ds.SamplesPerPixel} samples per pixel; "
            "only greyscale (MONOCHROME1/2) images can be preprocessed"
        )
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    return pixels


def _voi_range(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """Output range of the dataset's VOI transform, or None when it has none."""
    if ds.get("VOILUTSequence"):
        lut = ds.VOILUTSequence[0]
        data = np.asarray(lut.LUTData, dtype=np.float64)
        return float(data.min()), float(data.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # Far outside any window: pydicom maps them to the ends of its output range.
        probe = apply_voi_lut(np.array([-1e15, 1e15]), ds, index=0)
        return float(probe[0]), float(probe[1])
    return None


def presentation_pixels(
    ds: pydicom.Dataset,
    window_percentiles: tuple[float, float] = DEFAULT_WINDOW_PERCENTILES,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Float32 rows x columns in 0..1 as a radiologist would see it: Modality LUT (rescale), then
    the fixed ``window`` (centre, width in modality units, e.g. a CT lung window) when given,
    else the image's VOI LUT or window (first of multiple values), else a percentile window;
    MONOCHROME1 inverted so bright = dense."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(
            f"SOP Instance {ds.get('SOPInstanceUID', '?')} is {photometric}; "
            "only MONOCHROME1/2 images can be preprocessed"
        )
    values = apply_modality_lut(_stored_pixels(ds), ds).astype(np.float64)
    voi_range = None if window is not None else _voi_range(ds)
    if window is not None:
        centre, width = window
        low, high = centre - width / 2.0, centre + width / 2.0
    elif voi_range is not None:
        if ds.get("VOILUTSequence") and np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)  # a LUT is indexed by integer values
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        low, high = voi_range
    else:
        low, high = (float(v) for v in np.percentile(values, window_percentiles))
    span = high - low
    if span <= 0:
        out = np.zeros(values.shape, dtype=np.float32)
    else:
        out = np.clip((values - low) / span, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


@dataclass(frozen=True)
class Letterbox:
    """Geometry between a model input and its source image (pixel-centre convention).

    ``scale`` maps source rows to input rows; ``col_scale`` source columns to input columns
    (equal to ``scale`` up to rounding for letterbox, different for stretch).
    """

    source_shape: tuple[int, int]
    scale: float
    pad_rows: int
    pad_cols: int
    input_shape: tuple[int, int]
    col_scale: float | None = None

    @property
    def _col_scale(self) -> float:
        return self.scale if self.col_scale is None else self.col_scale

    @property
    def resized_shape(self) -> tuple[int, int]:
        """Rows and columns the source image occupies inside the input."""
        return (
            round(self.source_shape[0] * self.scale),
            round(self.source_shape[1] * self._col_scale),
        )

    def to_source(self, row: float, col: float) -> tuple[float, float]:
        """Source (row, col) of a model-input pixel position."""
        return (
            (row - self.pad_rows + 0.5) / self.scale - 0.5,
            (col - self.pad_cols + 0.5) / self._col_scale - 0.5,
        )

    def map_to_source(self, model_map: np.ndarray) -> np.ndarray:
        """Resample an H x W map over the model input (any resolution) to source rows x cols."""
        model_map = np.asarray(model_map, dtype=np.float32)
        if model_map.ndim != 2:
            raise ValueError(f"map_to_source needs a 2-D map, got shape {model_map.shape}")
        map_rows, map_cols = model_map.shape
        rows_per_input = map_rows / self.input_shape[0]
        cols_per_input = map_cols / self.input_shape[1]
        resized_rows, resized_cols = self.resized_shape
        # The part of the map that covers the image (not the padding), in map pixel units.
        box = (
            self.pad_cols * cols_per_input,
            self.pad_rows * rows_per_input,
            (self.pad_cols + resized_cols) * cols_per_input,
            (self.pad_rows + resized_rows) * rows_per_input,
        )
        image = Image.fromarray(model_map, mode="F")
        size = (self.source_shape[1], self.source_shape[0])
        resampled = image.resize(size, resample=Image.Resampling.BILINEAR, box=box)
        return np.asarray(resampled, dtype=np.float32)


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Resize a float image: area averaging when shrinking, bilinear when enlarging."""
    if image.shape == (rows, cols):
        return image.astype(np.float32, copy=False)
    shrinking = rows < image.shape[0] or cols < image.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize((cols, rows), resample)
    return np.asarray(resized, dtype=np.float32)


def prepare_input(
    ds: pydicom.Dataset,
    spec: InputSpec,
    window_percentiles: tuple[float, float] | None = None,
) -> tuple[np.ndarray, Letterbox]:
    """(C,H,W) float32 model input per the card: presentation pixels, resize (letterbox keeps
    aspect, pads with 0; or stretch), normalisation ('zscore' -> (x-mean)/std, 'unit' -> as
    is), channels repeated if C>1."""
    pixels = presentation_pixels(ds, window_percentiles or spec.window_percentiles, spec.window)
    return _fit(pixels, spec, repeat=True)


def prepare_stack(
    neighbours: list[pydicom.Dataset], spec: InputSpec
) -> tuple[np.ndarray, Letterbox]:
    """(C,H,W) 2.5D input: the presentation pixels of ``spec.slices`` adjacent slices (in slice
    order, the analysed slice in the middle) as channels, each fitted like ``prepare_input``."""
    if len(neighbours) != spec.slices or spec.shape[0] != spec.slices:
        raise ValueError(
            f"a 2.5D input of {spec.slices} slices needs {spec.slices} channels and slices, got "
            f"{spec.shape[0]} channels and {len(neighbours)} slices"
        )
    fitted = [
        _fit(presentation_pixels(ds, spec.window_percentiles, spec.window), spec, repeat=False)
        for ds in neighbours
    ]
    shapes = {sample.shape for sample, _ in fitted}
    if len(shapes) != 1:
        raise ValueError(f"adjacent slices differ in size: {sorted(shapes)}")
    stacked = np.concatenate([sample for sample, _ in fitted], axis=0)
    return stacked, fitted[len(fitted) // 2][1]


def _fit(pixels: np.ndarray, spec: InputSpec, *, repeat: bool) -> tuple[np.ndarray, Letterbox]:
    """Resize, pad and normalise presentation pixels per the card: (C,H,W) when ``repeat``
    (greyscale repeated over the card's channels), else (1,H,W)."""
    channels, rows, cols = spec.shape
    source_rows, source_cols = pixels.shape
    if spec.resize == "stretch":
        geometry = Letterbox(
            (source_rows, source_cols), rows / source_rows, 0, 0, (rows, cols), cols / source_cols
        )
        canvas = _resize(pixels, rows, cols)
    else:
        scale = min(rows / source_rows, cols / source_cols)
        resized_rows = min(rows, max(1, round(source_rows * scale)))
        resized_cols = min(cols, max(1, round(source_cols * scale)))
        pad_rows = (rows - resized_rows) // 2
        pad_cols = (cols - resized_cols) // 2
        geometry = Letterbox(
            (source_rows, source_cols),
            resized_rows / source_rows,
            pad_rows,
            pad_cols,
            (rows, cols),
            resized_cols / source_cols,
        )
        canvas = np.zeros((rows, cols), dtype=np.float32)
        canvas[pad_rows : pad_rows + resized_rows, pad_cols : pad_cols + resized_cols] = _resize(
            pixels, resized_rows, resized_cols
        )
    if spec.normalisation == "zscore":
        if spec.std <= 0:
            raise ValueError(f"input spec std must be positive for zscore, got {spec.std}")
        canvas = (canvas - np.float32(spec.mean)) / np.float32(spec.std)
    sample = np.repeat(canvas[None, :, :], channels if repeat else 1, axis=0)
    return sample.astype(np.float32, copy=False), geometry


def _first(value: object) -> float:
    """The first of a multi-valued DICOM number (window centre/width may hold several)."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)


def stored_from_presentation(
    ds: pydicom.Dataset, values: np.ndarray, spec: InputSpec
) -> np.ndarray:
    """Map 0..1 presentation values over the source grid (e.g. an image-to-image model's output)
    back to the source's stored-value range: the inverse of the card's linear window on the
    stored values (percentiles or fixed window), MONOCHROME1 re-inverted, rounded and clipped
    to Bits Stored."""
    stored = _stored_pixels(ds).astype(np.float64)
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = 1.0 - values
    window = spec.window
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    if window is not None and not ds.get("VOILUTSequence"):
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        centre, width = window
        low = (centre - width / 2.0 - intercept) / slope
        high = (centre + width / 2.0 - intercept) / slope
    else:
        low, high = (float(v) for v in np.percentile(stored, spec.window_percentiles))
    out = low + values * (high - low)
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return np.clip(np.round(out), lowest, highest).astype(np.int32)
