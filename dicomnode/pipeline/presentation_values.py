"""Presentation values: how an image's stored pixels become what a radiologist sees.

Photometric Interpretation, the Modality LUT (rescale), the VOI LUT or window (the image's own,
a fixed one, else a percentile window), the inversion (MONOCHROME1, Presentation LUT Shape
INVERSE) and Pixel Padding. Pure functions: the only I/O is pydicom decoding the pixel data
already in the dataset.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence

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


def modality_values(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Float64 of the stored values through the Modality LUT (rescale), as ``lut_attributes``
    reads it."""
    return np.asarray(apply_modality_lut(stored, lut_attributes(ds)), dtype=np.float64)


def stored_pixels(ds: pydicom.Dataset) -> np.ndarray:
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


def _first(value: object) -> float:
    """The first of a multi-valued DICOM number (window centre/width may hold several)."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)


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
    if lookup is not None and (window is not None or has_voi(ds)):
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


def has_voi(ds: pydicom.Dataset) -> bool:
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
    out = voi_unit(ds, stored, window, window_percentiles, padding).astype(np.float32)
    if is_inverted(ds):
        out = 1.0 - out
    return out


def voi_unit(
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
        low, high = percentiles(values, padding, window_percentiles)
    span = high - low
    if span <= 0:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / span, 0.0, 1.0)


def percentiles(
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


def percentile_window(source: pydicom.Dataset) -> tuple[float, float]:
    """Window Center / Width (LINEAR) giving the percentile window ``presentation_pixels``
    uses on an image without a usable VOI of its own: low percentile black, high white."""
    stored = first_frame(source)
    values = modality_values(source, stored)
    low, high = percentiles(values, padding_mask(source, stored), DEFAULT_WINDOW_PERCENTILES)
    if high <= low:
        # A flat image is black in the node's presentation: a 1-wide window above it.
        return low + 1.0, 1.0
    # LINEAR: values up to c - 0.5 - (w - 1) / 2 are black, from c - 0.5 + (w - 1) / 2 white.
    return (low + high) / 2 + 0.5, high - low + 1.0
