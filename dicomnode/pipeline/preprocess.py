"""From a DICOM image to a model input, and from model maps back to the source image.

Pure functions: the only I/O is pydicom decoding the pixel data already in the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence

from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.attributes import value_or_none
from dicomnode.pipeline.decode import COLOUR, GREY, describe, first_frame, grey_from_colour

DEFAULT_WINDOW_PERCENTILES = (0.5, 99.5)
# What pydicom's apply_modality_lut and apply_voi_lut read of a dataset, besides its encoding.
_LUT_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)


def _photometric(ds: pydicom.Dataset) -> str:
    """Photometric Interpretation; MONOCHROME2 when absent or empty (decoding then says that
    it lacks one)."""
    return str(value_or_none(ds, "PhotometricInterpretation") or "MONOCHROME2")


def lut_item(ds: pydicom.Dataset, keyword: str) -> pydicom.Dataset | None:
    """The first item of a Modality or VOI LUT Sequence when it has a LUT Descriptor of three
    values and LUT Data; None when the sequence is absent or empty or its item lacks them
    (the node then uses the window, as everywhere it presents the image)."""
    items = value_or_none(ds, keyword)
    if not isinstance(items, Sequence):
        return None
    item = items[0]
    descriptor = value_or_none(item, "LUTDescriptor")
    if not isinstance(descriptor, (list, tuple, MultiValue)) or len(descriptor) != 3:
        return None
    return item if value_or_none(item, "LUTData") is not None else None


def lut_attributes(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The attributes pydicom's Modality and VOI LUT functions read, as the node reads them:
    empty ones left out (pydicom applies any attribute present, and an empty Rescale Intercept
    or VOI LUT Function makes it raise), a LUT Sequence only with a usable first item, and a
    Rescale Slope or Intercept without the other completed with the identity's (1 or 0:
    output = slope * stored + intercept, PS3.3 C.11.1.1.2; pydicom would drop the lone one).
    A new dataset holding the same elements: ``ds`` is not changed."""
    luts = pydicom.Dataset()
    for keyword in _LUT_KEYWORDS:
        if value_or_none(ds, keyword) is not None:
            luts[keyword] = ds[keyword]
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        if keyword in luts and lut_item(ds, keyword) is None:
            del luts[keyword]
    if "ModalityLUTSequence" not in luts:
        if "RescaleIntercept" in luts and "RescaleSlope" not in luts:
            luts.RescaleSlope = 1
        elif "RescaleSlope" in luts and "RescaleIntercept" not in luts:
            luts.RescaleIntercept = 0
    # Where OW LUT Data's byte order comes from (pydicom reads the File Meta's first).
    luts.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        luts.file_meta = meta
    return luts


def _modality_values(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Float64 of the stored values through the Modality LUT (rescale), as ``lut_attributes``
    reads it."""
    return np.asarray(apply_modality_lut(stored, lut_attributes(ds)), dtype=np.float64)


def _stored_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded stored values of the first frame of a greyscale image; DecodeError naming the
    file, instance and transfer syntax if they cannot be decoded."""
    photometric = _photometric(ds)
    pixels = first_frame(ds)
    if photometric not in GREY or pixels.ndim != 2:
        samples = value_or_none(ds, "SamplesPerPixel") or 1
        raise ValueError(
            f"{describe(ds)} is {photometric} with {samples} samples per pixel; only greyscale "
            "(MONOCHROME1/2) stored values can be used here"
        )
    return pixels


def first_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first Window Center / Width pair when both are usable (width >= 1), else None."""
    centres, widths = value_or_none(ds, "WindowCenter"), value_or_none(ds, "WindowWidth")
    if centres is None or widths is None:
        return None
    try:
        centre, width = _first(centres), _first(widths)
    except (TypeError, ValueError, IndexError):  # the first value empty, or not a number
        return None
    if not (np.isfinite(centre) and np.isfinite(width)) or width < 1:
        return None
    return centre, width


def voi_lut_table(ds: pydicom.Dataset) -> tuple[int, np.ndarray, int]:
    """The first VOI LUT of ``ds``: its first mapped input value, its entries (int64) and its
    bits per entry (LUT Descriptor values 2, LUT Data, descriptor value 3).

    Read here rather than looked up by pydicom 3.0's ``apply_voi_lut``, which indexes an 8-bit
    LUT through 8-bit integers: past 256 entries the indexes wrap (input 4095 of a 4096-entry
    8-bit LUT reads entry 255 - 256 * 15). ValueError when it has no usable VOI LUT."""
    item = lut_item(ds, "VOILUTSequence")
    if item is None:
        raise ValueError(
            f"{describe(ds)} has no usable VOI LUT (an item with LUT Descriptor and LUT Data)"
        )
    entries, first_mapped, bits = (int(value) for value in item.LUTDescriptor)
    entries = entries or 2**16
    data = item["LUTData"].value
    if isinstance(data, bytes):  # OW: 16-bit words, or 8-bit entries packed two to a word
        little = _little_endian(ds)
        if bits <= 8 and len(data) < 2 * entries:
            words = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little else ">u2")
            table = words.astype("<u2").view(np.uint8).astype(np.int64)
        else:
            table = np.frombuffer(data[: 2 * entries], dtype="<u2" if little else ">u2")
            table = table.astype(np.int64)
    else:
        table = np.asarray(data if isinstance(data, (list, tuple, MultiValue)) else [data])
        table = table.astype(np.int64)
    if table.size < entries:
        raise ValueError(
            f"{describe(ds)}: its VOI LUT has {table.size} entries, its LUT Descriptor says "
            f"{entries}"
        )
    return first_mapped, table[:entries], bits


def _little_endian(ds: pydicom.Dataset) -> bool:
    """Whether the dataset's OW values are little endian (as read, else as its transfer syntax
    says; little endian when neither is known, as nearly every DICOM file is)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_transfer_syntax:
        return bool(syntax.is_little_endian)
    read = ds.original_encoding[1]
    return True if read is None else bool(read)


def _apply_voi(
    ds: pydicom.Dataset, luts: pydicom.Dataset, values: np.ndarray
) -> tuple[np.ndarray, float, float] | None:
    """The dataset's own VOI transform (first VOI LUT, else first usable window, pydicom's
    implementation over ``luts``, its ``lut_attributes``) and its output range; None when it
    has none."""
    if lut_item(ds, "VOILUTSequence") is not None:
        first_mapped, table, bits = voi_lut_table(ds)
        # A LUT is indexed by integers: rescaled values are rounded (pydicom truncates floats).
        # Inputs below the first mapped value take the first entry, above the last the last.
        index = np.rint(values).astype(np.int64) - first_mapped
        np.clip(index, 0, table.size - 1, out=index)
        # PS3.3 C.11.2.1.1 / C.8.11.3.1.5: the output range is 0 to 2^n - 1, n the third
        # LUT Descriptor value, whatever part of it the entries use. Entries that do not fit n
        # bits (a descriptor that understates them) widen it to the bits they need.
        highest = int(table.max(initial=0))
        top = 2**bits - 1 if highest <= 2**bits - 1 else 2 ** highest.bit_length() - 1
        return table[index].astype(np.float64), 0.0, float(top)
    window = first_window(ds)
    if window is None:
        return None
    # Far outside any window: pydicom maps them to the ends of its output range.
    probe = apply_voi_lut(np.array([-1e15, 1e15]), luts, index=0, prefer_lut=False)
    out = apply_voi_lut(values, luts, index=0, prefer_lut=False)
    return out, float(probe.min()), float(probe.max())


def presentation_pixels(
    ds: pydicom.Dataset,
    window_percentiles: tuple[float, float] = DEFAULT_WINDOW_PERCENTILES,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Float32 rows x columns in 0..1 as a radiologist would see it: Modality LUT (rescale), then
    the fixed ``window`` (centre, width in modality units, e.g. a CT lung window) when given,
    else the image's VOI LUT or window (first of multiple values), else a percentile window;
    inverted where the image says so (MONOCHROME1, Presentation LUT Shape INVERSE: see
    ``is_inverted``) so bright = dense. Colour images (RGB / YBR secondary captures,
    palette) become their luma with a percentile window. Pixel Padding (stored values) is black
    and left out of the percentile window. Empty attributes are read as absent. DecodeError
    when undecodable."""
    photometric = _photometric(ds)
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
    padding = padding_mask(ds, frame)
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
    return lut_item(ds, "VOILUTSequence") is not None or first_window(ds) is not None


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
    outside ``padding``; inverted where the image says so (``is_inverted``)."""
    out = _voi_unit(ds, stored, window, window_percentiles, padding).astype(np.float32)
    if is_inverted(ds):
        out = 1.0 - out
    return out


def _voi_unit(
    ds: pydicom.Dataset,
    stored: np.ndarray,
    window: tuple[float, float] | None,
    window_percentiles: tuple[float, float],
    padding: np.ndarray | None,
) -> np.ndarray:
    """``_unit_interval`` before its inversion, unrounded (float64 for greyscale images)."""
    if _photometric(ds) in COLOUR:
        values, voi = stored, None
    else:
        luts = lut_attributes(ds)
        values = np.asarray(apply_modality_lut(stored, luts), dtype=np.float64)
        voi = None if window is not None else _apply_voi(ds, luts, values)
    if window is not None:
        centre, width = window
        low, high = centre - width / 2.0, centre + width / 2.0
    elif voi is not None:
        values, low, high = voi
    else:
        low, high = _percentiles(values, padding, window_percentiles)
    span = high - low
    if span <= 0:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / span, 0.0, 1.0)


def _percentiles(
    values: np.ndarray, padding: np.ndarray | None, window_percentiles: tuple[float, float]
) -> tuple[float, float]:
    """The percentile window of ``values`` outside ``padding`` (all of them when all are)."""
    image = values if padding is None or padding.all() else values[~padding]
    low, high = (float(v) for v in np.percentile(image, window_percentiles))
    return low, high


def is_inverted(ds: pydicom.Dataset) -> bool:
    """Whether a greyscale image is displayed inverted (low values white).

    MONOCHROME1 is (PS3.3 C.7.6.3.1.2: the minimum value is white after the VOI stage), and so
    is an image whose Presentation LUT Shape is INVERSE (C.11.6.1.2: P-Value = maximum - VOI
    output). The DX, CR, MG and IO image modules require INVERSE with MONOCHROME1 and IDENTITY
    with MONOCHROME2: there INVERSE restates MONOCHROME1's one inversion (MONOCHROME1 + INVERSE
    is inverted once, as every viewer shows it), and MONOCHROME2 + INVERSE, which those
    modules do not allow but images carry, is inverted by its Presentation LUT. MONOCHROME1
    with IDENTITY is taken as MONOCHROME1 says. Colour images are never inverted."""
    photometric = _photometric(ds)
    if photometric == "MONOCHROME1":
        return True
    shape = str(value_or_none(ds, "PresentationLUTShape") or "").strip().upper()
    return photometric == "MONOCHROME2" and shape == "INVERSE"


def padding_mask(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels marked as padding (Pixel Padding Value, up to Pixel Padding Range Limit, in stored
    values), or None when the image declares none."""
    value = value_or_none(ds, "PixelPaddingValue")
    if not isinstance(value, int) or isinstance(value, bool):
        return None  # absent, empty, or bytes of an undetermined VR
    limit = value_or_none(ds, "PixelPaddingRangeLimit")
    if not isinstance(limit, int) or isinstance(limit, bool):
        limit = value
    value, limit = _as_stored(ds, value), _as_stored(ds, limit)
    low, high = min(value, limit), max(value, limit)
    padding = (stored >= low) & (stored <= high)
    return padding if padding.any() else None


def _as_stored(ds: pydicom.Dataset, value: int) -> int:
    """A padding value as the stored pixel value it names. Pixel Padding Value and Range Limit
    are US or SS as Pixel Representation is (PS3.3 C.7.5.1.1.2); written as US on a signed
    image (an encoder's slip, or an implicit VR reader's default) a negative value reads as its
    two's complement over Bits Allocated, e.g. 63536 for -2000."""
    if int(value_or_none(ds, "PixelRepresentation") or 0) != 1:
        return value
    bits = int(value_or_none(ds, "BitsAllocated") or 16)
    if 2 ** (bits - 1) <= value < 2**bits:
        return value - 2**bits
    return value


@dataclass(frozen=True)
class Letterbox:
    """Geometry between a model input and its source image (pixel-centre convention).

    ``scale`` maps source rows to input rows; ``col_scale`` source columns to input columns
    (equal to ``scale`` up to rounding for letterbox of square pixels; different for stretch,
    and for letterbox of non-square pixels, which it resamples to square ones).
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

    def to_input(self, row: float, col: float) -> tuple[float, float]:
        """Model-input (row, col) of a source pixel position (the inverse of ``to_source``)."""
        return (
            (row + 0.5) * self.scale + self.pad_rows - 0.5,
            (col + 0.5) * self._col_scale + self.pad_cols - 0.5,
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
    the aspect of the anatomy, resampling non-square pixels to square ones, and pads with 0;
    or stretch), normalisation ('zscore' -> (x-mean)/std, 'unit' -> as is), channels repeated
    if C>1. ``pixels``: the presentation pixels of ``ds`` for this spec when the caller already
    has them (several models on one image: as a Presentation, which keeps their resamplings
    for the others)."""
    if pixels is None:
        pixels = presentation_pixels(ds, window_percentiles or spec.window_percentiles, spec.window)
    return _fit(pixels, spec, repeat=True, aspect=pixel_aspect(ds))


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
    fitted = [
        _fit(presented, spec, repeat=False, aspect=pixel_aspect(ds))
        for ds, presented in zip(neighbours, pixels, strict=True)
    ]
    shapes = {sample.shape for sample, _ in fitted}
    if len(shapes) != 1:
        raise ValueError(f"adjacent slices differ in size: {sorted(shapes)}")
    stacked = np.concatenate([sample for sample, _ in fitted], axis=0)
    return stacked, fitted[len(fitted) // 2][1]


def pixel_aspect(ds: pydicom.Dataset) -> float:
    """Height / width of the image's pixels: row spacing / column spacing of Pixel Spacing,
    else Imager Pixel Spacing, else Nominal Scanned Pixel Spacing, else the vertical /
    horizontal Pixel Aspect Ratio (PS3.3 C.7.6.3.1.7). 1 (square) when none is usable, when
    the ratio is within 0.1 % of 1 (rounding in the spacings: under half a pixel at 512) or
    implausible (beyond 10:1, a mistyped spacing)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        aspect = _ratio(value_or_none(ds, keyword))
        if aspect is not None:
            break
    else:
        aspect = _ratio(value_or_none(ds, "PixelAspectRatio"))
    if aspect is None or abs(aspect - 1.0) <= 1e-3 or not 0.1 <= aspect <= 10.0:
        return 1.0
    return aspect


def _ratio(pair: object) -> float | None:
    """The first of two positive finite numbers over the second, else None."""
    if not isinstance(pair, (list, tuple, MultiValue)) or len(pair) != 2:
        return None
    try:
        first, second = float(pair[0]), float(pair[1])
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(first) and np.isfinite(second)) or first <= 0 or second <= 0:
        return None
    return first / second


def _fit(
    pixels: np.ndarray | Presentation, spec: InputSpec, *, repeat: bool, aspect: float = 1.0
) -> tuple[np.ndarray, Letterbox]:
    """Resize, pad and normalise presentation pixels per the card: (C,H,W) when ``repeat``
    (greyscale repeated over the card's channels), else (1,H,W). ``aspect``: the pixels'
    height / width (``pixel_aspect``); letterbox resamples them to square pixels in the same
    resize, and its Letterbox's row and column scales differ accordingly."""
    source = pixels if isinstance(pixels, Presentation) else Presentation(pixels)
    channels, rows, cols = spec.shape
    source_rows, source_cols = source.shape
    if spec.resize == "stretch":
        # The whole field of view fills the input, whatever the pixels' shape.
        geometry = Letterbox(
            (source_rows, source_cols), rows / source_rows, 0, 0, (rows, cols), cols / source_cols
        )
        canvas = source.resized(rows, cols)
    else:
        # The image's extent in column spacings (exactly its rows and columns for square pixels).
        height, width = source_rows * aspect, source_cols * 1.0
        scale = min(rows / height, cols / width)
        resized_rows = min(rows, max(1, round(height * scale)))
        resized_cols = min(cols, max(1, round(width * scale)))
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


def apply_correction(ds: pydicom.Dataset, correction: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The source's stored values plus an image-to-image model's ``correction`` (presentation
    units over the source grid, see ``postprocess.image_correction``), converted to stored
    units through the transform the model saw (Modality LUT, then the card's window, else the
    image's VOI LUT or window, else its percentile window; the inversion): new stored =
    transform^-1(transform(stored) + correction). Values outside the window keep their full
    range (nothing is clipped to the window), Pixel Padding is left as it is, and the result is
    rounded and clipped to Bits Stored."""
    stored = _stored_pixels(ds)
    padding = padding_mask(ds, stored)
    window = spec.window
    if window is None and not _has_voi(ds):
        # The percentile window presentation_pixels took, as a fixed window.
        values = _modality_values(ds, stored)
        low, high = _percentiles(values, padding, spec.window_percentiles)
        window = ((low + high) / 2.0, high - low)
    change = np.asarray(correction, dtype=np.float64)
    if is_inverted(ds):
        change = -change  # presentation is inverted: brighter = lower VOI output
    per_unit = _stored_per_presentation(ds, window)
    if per_unit is not None:
        change = change * per_unit
    else:
        change = _change_through_table(ds, stored, window, change)
    if padding is not None:
        change[padding] = 0.0
    out = np.add(stored, change, out=change)
    bits = int(value_or_none(ds, "BitsStored") or 16)
    signed = int(value_or_none(ds, "PixelRepresentation") or 0) == 1
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    np.rint(out, out=out)
    return np.clip(out, lowest, highest, out=out).astype(np.int32)


def _stored_per_presentation(
    ds: pydicom.Dataset, window: tuple[float, float] | None
) -> float | None:
    """Stored values per 0..1 presentation unit where stored value -> presentation is linear
    (Rescale Slope, then ``window`` or the image's LINEAR / LINEAR_EXACT window), else None
    (a Modality LUT, a VOI LUT or a SIGMOID window: see ``_change_through_table``)."""
    if lut_item(ds, "ModalityLUTSequence") is not None:
        return None
    slope = float(value_or_none(ds, "RescaleSlope") or 1)
    if window is not None:
        return float(window[1]) / slope
    if lut_item(ds, "VOILUTSequence") is not None:
        return None
    own = first_window(ds)
    if own is None:
        return None
    function = str(value_or_none(ds, "VOILUTFunction") or "LINEAR").strip().upper()
    if function == "LINEAR":  # PS3.3 C.11.2.1.2.1: output = ((x - (c - 0.5)) / (w - 1) + 0.5)
        return (own[1] - 1.0) / slope
    if function == "LINEAR_EXACT":  # C.11.2.1.3.2: output = (x - c) / w + 0.5
        return own[1] / slope
    return None


def _change_through_table(
    ds: pydicom.Dataset,
    stored: np.ndarray,
    window: tuple[float, float] | None,
    change: np.ndarray,
) -> np.ndarray:
    """The change of stored values that moves each pixel's presentation (before inversion) by
    ``change``, through the monotone table of the presentation of every stored value:
    VOI^-1(VOI(stored) + change), interpolated between whole stored values (for a SIGMOID
    window within a small fraction of a stored value of its exact inverse logit).

    Where the table is flat (inputs below or above a VOI LUT's ramp, a sigmoid's saturated
    tails) a pixel is moved from the end of the ramp, and targets beyond the table's ends
    continue at its mean slope: as for a window, nothing is clipped to the displayed range."""
    domain, index = _stored_domain(ds, stored)
    with np.errstate(over="ignore"):  # a sigmoid's exp far outside the window
        table = _voi_unit(ds, domain, window, DEFAULT_WINDOW_PERCENTILES, None)
    if table[-1] < table[0]:  # a falling VOI LUT: inverted on its mirror image
        table, change = -table, -change
    # A LUT that is not monotone is inverted on its rising envelope.
    table = np.maximum.accumulate(table)
    levels, first, counts = np.unique(table, return_index=True, return_counts=True)
    if levels.size < 2:
        return np.zeros(stored.shape, dtype=np.float64)  # one grey for every value
    last = first + counts - 1
    # Each level's stored value: the middle of its run of equal values (the steps of a LUT with
    # fewer output than input values), the inner end of the runs at either end (the ramp).
    anchors = (domain[first] + domain[last]) / 2.0
    anchors[0], anchors[-1] = domain[last[0]], domain[first[-1]]
    slope = (anchors[-1] - anchors[0]) / (levels[-1] - levels[0])
    presented = table[index]
    target = presented + change

    def inverse(values: np.ndarray) -> np.ndarray:
        inside = np.interp(values, levels, anchors)
        below = np.minimum(values - levels[0], 0.0)
        above = np.maximum(values - levels[-1], 0.0)
        return inside + (below + above) * slope

    return inverse(target) - inverse(presented)


def _stored_domain(ds: pydicom.Dataset, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every stored value the image's Bits Stored allows, ascending (the values present where
    that is over 16 bits or the pixels are not integers), and each pixel's index into them."""
    if stored.dtype.kind in "iu":
        bits = int(value_or_none(ds, "BitsStored") or 16)
        signed = int(value_or_none(ds, "PixelRepresentation") or 0) == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        low, high = min(low, int(stored.min())), max(high, int(stored.max()))
        if high - low < 2**16:
            domain = np.arange(low, high + 1, dtype=np.int64)
            return domain, stored.astype(np.int64) - low
    domain, index = np.unique(stored, return_inverse=True)
    return domain.astype(np.float64), index.reshape(stored.shape)


def percentile_window(source: pydicom.Dataset) -> tuple[float, float]:
    """Window Center / Width (LINEAR) giving the percentile window ``presentation_pixels``
    uses on an image without a usable VOI of its own: low percentile black, high white."""
    stored = first_frame(source)
    values = _modality_values(source, stored)
    low, high = _percentiles(values, padding_mask(source, stored), DEFAULT_WINDOW_PERCENTILES)
    if high <= low:
        # A flat image is black in the node's presentation: a 1-wide window above it.
        return low + 1.0, 1.0
    # LINEAR: values up to c - 0.5 - (w - 1) / 2 are black, from c - 0.5 + (w - 1) / 2 white.
    return (low + high) / 2 + 0.5, high - low + 1.0
