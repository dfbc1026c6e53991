"""Checks on a received dataset before it is acknowledged: parseable, consistent pixel data.

pydicom decodes lazily, so a dataset with a bad element only fails when that element is
read. ``check_dataset`` reads every element (sequences included, pixel data excepted) so a
malformed instance is refused at the door instead of failing later in analysis. Every
declared length is checked against what was sent; text values are not decoded while
pydicom's reading validation is off (as in the listener): pydicom then replaces what it
cannot decode instead of raising, so decoding them could refuse nothing and cost most of
the check.
"""

from __future__ import annotations

import pydicom.config
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID

UNDEFINED_LENGTH = 0xFFFFFFFF
# Value representations pydicom decodes as text (DS included: an invalid one stays a string).
TEXT_VRS = frozenset(
    ("AE", "AS", "CS", "DA", "DS", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT")
)
# Pixel Data must hold at least Rows x Columns x Samples x Frames x BitsAllocated/8 bytes.
_PIXEL_KEYWORDS = ("Rows", "Columns", "BitsAllocated")


class InvalidDataset(ValueError):
    """The dataset cannot be understood; the message says which attribute and why."""


def _present_bytes(raw: RawDataElement, stream_bytes: int | None) -> int:
    """Bytes of the value that were sent: read ones, or for a value left on disk
    (``dcmread(defer_size=...)``) what the file holds from its offset on."""
    if raw.value is None and raw.length and stream_bytes is not None:
        return max(0, min(raw.length, stream_bytes - raw.value_tell))
    return len(raw.value or b"")


def _text(raw: RawDataElement) -> bool:
    """Whether ``raw`` holds text (its VR as sent, or the dictionary's for implicit VR)."""
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return False  # private or unknown: decoding finds out what it is
    return vr in TEXT_VRS


def _read_all(ds: Dataset, stream_bytes: int | None, skip_text: bool, depth: int = 0) -> None:
    if depth > 16:
        raise InvalidDataset("sequences nested more than 16 deep")
    # items(): the elements as read, deferred ones included, none converted yet.
    for tag, raw in list(ds.items()):
        if isinstance(raw, RawDataElement):
            if raw.length != UNDEFINED_LENGTH:
                present = _present_bytes(raw, stream_bytes)
                if present < raw.length:
                    # A truncated stream, or a gigantic declared length: never trust it.
                    raise InvalidDataset(
                        f"element {tag} declares {raw.length} bytes, {present} sent"
                    )
            if skip_text and _text(raw):
                continue
        if tag == 0x7FE00010:  # Pixel Data: length is checked below, value stays raw
            continue
        try:
            element = ds[tag]
        except Exception as exc:
            # The exception text may quote the value (patient data): name the tag only.
            raise InvalidDataset(f"element {tag} does not decode ({type(exc).__name__})") from exc
        if element.VR == "SQ":
            for item in element.value:
                _read_all(item, stream_bytes, skip_text, depth + 1)


def expected_pixel_bytes(ds: Dataset) -> int | None:
    """Native pixel data length from the image pixel module; None if it is incomplete."""
    if any(ds.get(keyword) in (None, "") for keyword in _PIXEL_KEYWORDS):
        return None
    samples = int(ds.get("SamplesPerPixel") or 1)
    frames = int(ds.get("NumberOfFrames") or 1)
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * samples * frames
    return (pixels * bits + 7) // 8


def check_dataset(ds: Dataset, transfer_syntax: str, stream_bytes: int | None = None) -> None:
    """Raise InvalidDataset for an element that does not decode or pixel data of the wrong size.

    ``stream_bytes`` is the size of the file ``ds`` was read from with deferred values.
    """
    skip_text = pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
    try:
        _read_all(ds, stream_bytes, skip_text)
    except InvalidDataset:
        raise
    except Exception as exc:
        raise InvalidDataset(f"dataset does not decode ({type(exc).__name__})") from exc
    if "PixelData" not in ds or UID(transfer_syntax).is_compressed:
        return
    try:
        expected = expected_pixel_bytes(ds)
    except (TypeError, ValueError) as exc:
        raise InvalidDataset(f"image pixel module does not decode: {exc}") from exc
    if expected is None:
        raise InvalidDataset("Pixel Data without Rows, Columns or Bits Allocated")
    pixels = ds.get_item("PixelData", keep_deferred=True)
    length = (
        _present_bytes(pixels, stream_bytes)
        if isinstance(pixels, RawDataElement)
        else len(pixels.value or b"")
    )
    # Odd lengths are padded to even; more is tolerated (trailing padding), less is not.
    if length < expected:
        raise InvalidDataset(
            f"Pixel Data has {length} bytes, Rows x Columns x Samples x Frames needs {expected}"
        )
