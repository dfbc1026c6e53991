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
from dicomnode.pipeline.decode import COLOUR, GREY, describe, first_frame, grey_from_colour

DEFAULT_WINDOW_PERCENTILES = (0.5, 99.5)


def _stored_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded stored values of the first frame of a greyscale image; DecodeError naming the
    file, instance and transfer syntax if they cannot be decoded."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    pixels = first_frame(ds)
    if photometric not in GREY or pixels.ndim != 2:
        raise ValueError(
            f"{describe(ds)} is {photometric} with {ds.get('SamplesPerPixel', 1)} samples per "
            "pixel; only greyscale (MONOCHROME1/2) stored values can be used here"
        )
    return pixels


def _window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first Window Center / Width pair when both are usable (width >= 1), else None."""
    try:
        centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    except (TypeError, ValueError, IndexError):  # absent, empty or not a number
        return None
    if not (np.isfinite(centre) and np.isfinite(width)) or width < 1:
        return None
    return centre, width


def _apply_voi(ds: pydicom.Dataset, values: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """The dataset's own VOI transform (first VOI LUT, else first usable window, pydicom's
    implementation) and its output range; None when it has none."""
    if ds.get("VOILUTSequence"):
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries, first_mapped = int(descriptor[0]) or 2**16, int(descriptor[1])
        table = apply_voi_lut(np.arange(first_mapped, first_mapped + entries), ds, index=0)
        # A LUT is indexed by integers (pydicom truncates floats): round rescaled values.
        out = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True)
        return out.astype(np.float64), float(table.min()), float(table.max())
    window = _window(ds)
    if window is None:
        return None
    # Far outside any window: pydicom maps them to the ends of its output range.
    probe = apply_voi_lut(np.array([-1e15, 1e15]), ds, index=0, prefer_lut=False)
    out = apply_voi_lut(values, ds, index=0, prefer_lut=False)
    return out, float(probe.min()), float(probe.max())


def presentation_pixels(
    ds: pydicom.Dataset,
    window_percentiles: tuple[float, float] = DEFAULT_WINDOW_PERCENTILES,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Float32 rows x columns in 0..1 as a radiologist would see it: Modality LUT (rescale), then
    the fixed ``window`` (centre, width in modality units, e.g. a CT lung window) when given,
    else the image's VOI LUT or window (first of multiple values), else a percentile window;
    MONOCHROME1 inverted so bright = dense. Colour images (RGB / YBR secondary captures,
    palette) become their luma with a percentile window. Pixel Padding (stored values) is black
    and left out of the percentile window. DecodeError when undecodable."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in GREY + COLOUR:
        raise ValueError(
            f"{describe(ds)} is {photometric}; only MONOCHROME1/2, RGB, YBR and PALETTE COLOR "
            "images can be preprocessed"
        )
    frame = first_frame(ds)
    if photometric in COLOUR:
        if window is not None:
            raise ValueError(
                f"{describe(ds)} is a {photometric} colour image: the model's fixed window "
                f"{tuple(window)} is in modality units (e.g. HU), which a colour image lacks"
            )
        return _unit_interval(ds, grey_from_colour(ds, frame), None, window_percentiles, None)
    padding = _padding(ds, frame)
    lookup = _every_stored_value(frame)
    if lookup is not None and (window is not None or _has_voi(ds)):
        # Every step is a function of the stored value alone: computed once per value the
        # pixels can hold, then looked up (a 2048 px radiograph: ~15 ms instead of 100-130).
        domain, indices = lookup
        with np.errstate(over="ignore"):  # a sigmoid VOI's exp far outside the image's values
            table = _unit_interval(ds, domain, window, window_percentiles, None)
        out = table[indices]
    else:
        out = _unit_interval(ds, frame, window, window_percentiles, padding)
    if padding is not None:
        out[padding] = 0.0  # outside the image (collimator, CT field of view): black
    return out


def _has_voi(ds: pydicom.Dataset) -> bool:
    """Whether the dataset has a VOI transform of its own (what ``_apply_voi`` applies)."""
    return bool(ds.get("VOILUTSequence")) or _window(ds) is not None


def _every_stored_value(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """For stored values of 8 or 16 bit integers: every value of their type, ascending, and
    each pixel's index into them; None for other types (a lookup table would not pay)."""
    if frame.dtype.kind not in "iu" or frame.dtype.itemsize > 2:
        return None
    frame = frame.astype(frame.dtype.newbyteorder("="), copy=False)  # big endian: by value
    info = np.iinfo(frame.dtype)
    domain = np.arange(info.min, info.max + 1, dtype=frame.dtype)
    if info.min == 0:
        return domain, frame
    # Two's complement with the sign bit flipped orders signed values from the lowest.
    unsigned = np.dtype(f"u{frame.dtype.itemsize}")
    return domain, frame.view(unsigned) ^ unsigned.type(-info.min)


def _unit_interval(
    ds: pydicom.Dataset,
    stored: np.ndarray,
    window: tuple[float, float] | None,
    window_percentiles: tuple[float, float],
    padding: np.ndarray | None,
) -> np.ndarray:
    """Float32 0..1 of each stored value (greyscale; colour images' luma as they come):
    Modality LUT, then ``window``, the dataset's VOI, or a percentile window over the values
    outside ``padding``; MONOCHROME1 inverted."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric in COLOUR:
        values, voi = stored, None
    else:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        voi = None if window is not None else _apply_voi(ds, values)
    if window is not None:
        centre, width = window
        low, high = centre - width / 2.0, centre + width / 2.0
    elif voi is not None:
        values, low, high = voi
    else:
        image = values if padding is None or padding.all() else values[~padding]
        low, high = (float(v) for v in np.percentile(image, window_percentiles))
    span = high - low
    if span <= 0:
        out = np.zeros(values.shape, dtype=np.float32)
    else:
        out = np.clip((values - low) / span, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def _padding(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels marked as padding (Pixel Padding Value, up to Pixel Padding Range Limit, in stored
    values), or None when the image declares none."""
    value = ds.get("PixelPaddingValue")
    if not isinstance(value, int) or isinstance(value, bool):
        return None  # absent, or bytes of an undetermined VR
    limit = ds.get("PixelPaddingRangeLimit")
    if not isinstance(limit, int):
        limit = value
    low, high = min(value, limit), max(value, limit)
    padding = (stored >= low) & (stored <= high)
    return padding if padding.any() else None


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


class Presentation:
    """An image's presentation pixels, and what the models that take them share: their
    resamplings to each input size, from one Pillow image of them made at the first.

    (Made for each model, a 2048 px radiograph's Pillow image and its float copy cost ~25 ms,
    ten times the resampling itself.)
    """

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        self._picture: Image.Image | None = None
        self._resized: dict[tuple[int, int], np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.pixels.shape
        return rows, cols

    @property
    def nbytes(self) -> int:
        """Bytes held: the pixels, their Pillow image (float32) and the resamplings."""
        picture = self.pixels.size * 4 if self._picture is not None else 0
        return self.pixels.nbytes + picture + sum(r.nbytes for r in self._resized.values())

    def resized(self, rows: int, cols: int) -> np.ndarray:
        """The pixels at ``rows`` x ``cols``: area averaging when shrinking, bilinear when
        enlarging. Shared by every caller: not to be written."""
        if self.shape == (rows, cols):
            return self.pixels.astype(np.float32, copy=False)
        resized = self._resized.get((rows, cols))
        if resized is None:
            if self._picture is None:
                self._picture = Image.fromarray(self.pixels.astype(np.float32, copy=False), "F")
            shrinking = rows < self.shape[0] or cols < self.shape[1]
            resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
            resized = np.asarray(self._picture.resize((cols, rows), resample), dtype=np.float32)
            resized.flags.writeable = False
            self._resized[(rows, cols)] = resized
        return resized


def prepare_input(
    ds: pydicom.Dataset,
    spec: InputSpec,
    window_percentiles: tuple[float, float] | None = None,
    *,
    pixels: np.ndarray | Presentation | None = None,
) -> tuple[np.ndarray, Letterbox]:
    """(C,H,W) float32 model input per the card: presentation pixels, resize (letterbox keeps
    aspect, pads with 0; or stretch), normalisation ('zscore' -> (x-mean)/std, 'unit' -> as
    is), channels repeated if C>1. ``pixels``: the presentation pixels of ``ds`` for this spec
    when the caller already has them (several models on one image: as a Presentation, which
    keeps their resamplings for the others)."""
    if pixels is None:
        pixels = presentation_pixels(ds, window_percentiles or spec.window_percentiles, spec.window)
    return _fit(pixels, spec, repeat=True)


def prepare_stack(
    neighbours: list[pydicom.Dataset],
    spec: InputSpec,
    *,
    pixels: list[np.ndarray] | list[Presentation] | None = None,
) -> tuple[np.ndarray, Letterbox]:
    """(C,H,W) 2.5D input: the presentation pixels of ``spec.slices`` adjacent slices (in slice
    order, the analysed slice in the middle) as channels, each fitted like ``prepare_input``.
    ``pixels``: their presentation pixels when the caller already has them."""
    if len(neighbours) != spec.slices or spec.shape[0] != spec.slices:
        raise ValueError(
            f"a 2.5D input of {spec.slices} slices needs {spec.slices} channels and slices, got "
            f"{spec.shape[0]} channels and {len(neighbours)} slices"
        )
    if pixels is None:
        pixels = [
            presentation_pixels(ds, spec.window_percentiles, spec.window) for ds in neighbours
        ]
    fitted = [_fit(presented, spec, repeat=False) for presented in pixels]
    shapes = {sample.shape for sample, _ in fitted}
    if len(shapes) != 1:
        raise ValueError(f"adjacent slices differ in size: {sorted(shapes)}")
    stacked = np.concatenate([sample for sample, _ in fitted], axis=0)
    return stacked, fitted[len(fitted) // 2][1]


def _fit(
    pixels: np.ndarray | Presentation, spec: InputSpec, *, repeat: bool
) -> tuple[np.ndarray, Letterbox]:
    """Resize, pad and normalise presentation pixels per the card: (C,H,W) when ``repeat``
    (greyscale repeated over the card's channels), else (1,H,W)."""
    source = pixels if isinstance(pixels, Presentation) else Presentation(pixels)
    channels, rows, cols = spec.shape
    source_rows, source_cols = source.shape
    if spec.resize == "stretch":
        geometry = Letterbox(
            (source_rows, source_cols), rows / source_rows, 0, 0, (rows, cols), cols / source_cols
        )
        canvas = source.resized(rows, cols)
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
        canvas[pad_rows : pad_rows + resized_rows, pad_cols : pad_cols + resized_cols] = (
            source.resized(resized_rows, resized_cols)
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


def _stored_per_presentation(ds: pydicom.Dataset, stored: np.ndarray, spec: InputSpec) -> float:
    """Stored values per 0..1 presentation unit of the window ``presentation_pixels`` used
    (the card's fixed window, else the image's window, else its percentiles; for a VOI LUT the
    percentile span stands in for its slope)."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    window = spec.window if spec.window is not None else None
    if window is None and not ds.get("VOILUTSequence"):
        window = _window(ds)
    if window is not None:
        return float(window[1]) / abs(slope)
    padding = _padding(ds, stored)
    image = stored if padding is None or padding.all() else stored[~padding]
    low, high = (float(v) for v in np.percentile(image, spec.window_percentiles))
    return high - low


def apply_correction(ds: pydicom.Dataset, correction: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The source's stored values plus an image-to-image model's ``correction`` (presentation
    units over the source grid, see ``postprocess.image_correction``), converted to stored
    units through the window the model saw: values outside that window keep their full range
    (nothing is clipped to the window), Pixel Padding is left as it is, MONOCHROME1 is handled,
    and the result is rounded and clipped to Bits Stored."""
    stored = _stored_pixels(ds).astype(np.float64)
    change = np.asarray(correction, dtype=np.float64) * _stored_per_presentation(ds, stored, spec)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        change = -change  # presentation is inverted: brighter = lower stored values
    padding = _padding(ds, stored)
    if padding is not None:
        change[padding] = 0.0
    out = np.add(stored, change, out=change)
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    np.rint(out, out=out)
    return np.clip(out, lowest, highest, out=out).astype(np.int32)
