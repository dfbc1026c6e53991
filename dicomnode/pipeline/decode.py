"""Pixel data to numbers: the first frame's stored values, or an error that names the file, the
instance and the transfer syntax (never a silently wrong image).

pydicom decodes with the installed plugins (pylibjpeg with libjpeg, openjpeg and rle; Pillow);
colour images come back as RGB (YBR converted by pydicom) and are reduced to grey here.

A frame is only used when its decoded values are ones its own header allows
(:func:`fit_bits_stored`): a corrupt JPEG-LS or JPEG 2000 codestream can decode without an
error into noise far outside Bits Stored, which must not be analysed as an image.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.pipeline.attributes import value_or_none

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
# Without these pydicom cannot know how to read Pixel Data (PS3.3 C.7.6.3, Type 1).
IMAGE_PIXEL = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelRepresentation",
)
# ITU-R BT.601 luma weights: what a greyscale display of an RGB secondary capture shows.
LUMA = np.array([0.299, 0.587, 0.114])
# At most this share of a frame's pixels may decode outside the values Bits Stored allows
# (they are then clamped into it); more, and the pixel data is corrupt or mis-labelled.
STRAY_SHARE = 0.001

log = logging.getLogger("dicomnode.pipeline")


class DecodeError(ValueError):
    """Pixel data that cannot be turned into an image here (missing codec, corrupt data,
    unknown transfer syntax); the message names the file, instance and transfer syntax."""


def describe(ds: pydicom.Dataset) -> str:
    """'file F, SOP Instance U' for messages (the file only when the dataset was read from one)."""
    parts = []
    filename = getattr(ds, "filename", None)
    if isinstance(filename, (str, os.PathLike)) and str(filename):
        parts.append(f"file {os.fspath(filename)}")
    parts.append(f"SOP Instance {value_or_none(ds, 'SOPInstanceUID') or '<no SOP Instance UID>'}")
    return ", ".join(parts)


def transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    """The dataset's transfer syntax: its File Meta one, else the native encoding pydicom read a
    meta-less file with (set into ``ds.file_meta`` so that pydicom can decode); None if unknown."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid))
    implicit, little = ds.original_encoding
    if little is None or "PixelData" not in ds or ds["PixelData"].is_undefined_length:
        return None  # compressed data without a transfer syntax: the codec cannot be known
    if implicit:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def _syntax_text(uid: UID) -> str:
    name = uid.name if uid.name != uid else "unknown transfer syntax"
    return f"transfer syntax {uid} ({name})"


def _why(uid: UID, error: Exception) -> str:
    """What went wrong with a transfer syntax, and what to do about it."""
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return (
            "pydicom has no decoder for this transfer syntax; have the sender use an "
            "uncompressed or JPEG / JPEG 2000 / RLE transfer syntax"
        )
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        return (
            f"no codec for it is installed ({missing}); install one or have the sender recompress"
        )
    plugins = ", ".join(decoder.available_plugins) or "pydicom"
    detail = " ".join(str(error).split())
    return (
        f"the installed codecs ({plugins}) could not decode it: {detail}. The pixel data is "
        "corrupt, or uses a variant these codecs do not support (dcmtk's dcmdjpeg tolerates "
        "some non-conformant JPEG: decompress the file with it and send it again)"
    )


def number_of_frames(ds: pydicom.Dataset) -> int:
    """Number of Frames (1 when absent or empty); DecodeError when it is not a positive number."""
    value = value_or_none(ds, "NumberOfFrames")
    try:
        frames = int(value or 1)
    except (TypeError, ValueError) as error:
        raise DecodeError(
            f"{describe(ds)} has an invalid Number of Frames {value!r}: {error}"
        ) from error
    if frames < 1:
        raise DecodeError(f"{describe(ds)} has Number of Frames {frames}")
    return frames


def first_frame(ds: pydicom.Dataset) -> np.ndarray:
    """The first frame's stored values: rows x columns, or rows x columns x 3 (RGB) for colour
    images. DecodeError naming the file, instance and transfer syntax when it cannot be had."""
    where = describe(ds)
    if "PixelData" not in ds:
        raise DecodeError(f"{where} has no Pixel Data to analyse")
    missing = [keyword for keyword in IMAGE_PIXEL if value_or_none(ds, keyword) is None]
    if missing:
        raise DecodeError(
            f"cannot decode the pixel data of {where}: it lacks {', '.join(missing)} "
            "(Image Pixel module), so nothing says how to read it"
        )
    uid = transfer_syntax(ds)
    if uid is None:
        raise DecodeError(
            f"cannot decode the pixel data of {where}: it has no File Meta Transfer Syntax UID "
            "and compressed pixel data, so the codec is unknown; resend it with a file meta header"
        )
    frames = number_of_frames(ds)
    try:
        # Only the first frame is analysed: decode just that one of a multi-frame image; a
        # single frame goes through ds.pixel_array, which result builders reuse.
        pixels = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except Exception as error:  # pydicom raises several types for missing or failing codecs
        raise DecodeError(
            f"cannot decode the pixel data of {where}, {_syntax_text(uid)}: {_why(uid, error)}"
        ) from error
    expected = (int(ds.Rows), int(ds.Columns))
    if pixels.shape[:2] != expected:
        raise DecodeError(
            f"the decoded pixel data of {where}, {_syntax_text(uid)}, is {pixels.shape}, "
            f"not the {expected[0]} x {expected[1]} of its Rows and Columns"
        )
    return fit_bits_stored(ds, pixels, f"{where}, {_syntax_text(uid)}")


def stored_value_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The stored values ``bits_stored`` bits hold: 0..2**n-1, or -2**(n-1)..2**(n-1)-1 when
    signed (Pixel Representation 1, two's complement)."""
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def fit_bits_stored(ds: pydicom.Dataset, pixels: np.ndarray, where: str) -> np.ndarray:
    """``pixels`` (a decoded frame of ``ds``) when its values are ones its Bits Stored and Pixel
    Representation allow; DecodeError when more than ``STRAY_SHARE`` of them are not.

    The rule, per decoded frame (integer samples; nothing to check when Bits Stored fills the
    decoded type, e.g. 16 of 16):

    - Uncompressed, RLE and JPEG (not -LS) data: pydicom keeps only the Bits Stored bits of
      each value (sign-extended when signed), as viewers do, so bits above High Bit (retired
      overlay planes, junk) are ignored and the image is used; the values then always fit.
    - JPEG-LS and JPEG 2000 data come back as the codec decoded them. A conformant codestream
      has the precision of Bits Stored and its decoder clamps to it, so a value outside it
      means a corrupt codestream (libjpeg decodes some into noise without an error) or a
      header that mis-labels the data (e.g. 16-bit data with Bits Stored 12). More than
      ``STRAY_SHARE`` (0.1 %) of the pixels outside: the image is not used (DecodeError).
    - A few stray values (at most that share, e.g. a lossy codestream more precise than Bits
      Stored overshooting at a saturated edge) are clamped into the range, in place (a single
      frame's array is the one pydicom keeps for the dataset), and the image is used.

    Cost: one max (unsigned) or min and max (signed) over the frame, ~3 ms for 3000 x 2500
    16-bit values; the count only when a value is outside. ``where`` names the image in the
    messages (files and UIDs, never patient data)."""
    if pixels.dtype.kind not in "iu":
        return pixels
    bits = int(value_or_none(ds, "BitsStored") or 0)
    signed = int(value_or_none(ds, "PixelRepresentation") or 0) == 1
    if not 1 <= bits < 8 * pixels.dtype.itemsize:
        return pixels  # every value of the decoded type is allowed (or the header is void)
    low, high = stored_value_range(bits, signed)
    if pixels.dtype.kind == "u" and low == 0:
        if int(pixels.max(initial=0)) <= high:
            return pixels
    elif low <= int(pixels.min(initial=0)) and int(pixels.max(initial=0)) <= high:
        return pixels
    outside = int(np.count_nonzero((pixels < low) | (pixels > high)))
    kind = "signed" if signed else "unsigned"
    fits = f"Bits Stored ({bits}, {kind}: {low}..{high})"
    share = outside / pixels.size
    found = f"{outside} of {pixels.size} values ({share:.1%}) are outside it"
    if share > STRAY_SHARE:
        raise DecodeError(
            f"the pixel data of {where} does not decode to values within {fits}: {found} "
            f"(from {int(pixels.min())} to {int(pixels.max())}), so it is corrupt or "
            "mis-labelled and the image cannot be read; check it on the sender and send it again"
        )
    log.warning(
        "%s: %d of %d values decoded outside %s: clamped", where, outside, pixels.size, fits
    )
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    np.clip(pixels, low, high, out=pixels)
    return pixels


def grey_from_colour(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """Float64 luma of a colour frame (RGB, YBR already made RGB by pydicom, or PALETTE COLOR
    indices), in the frame's own value range."""
    photometric = str(value_or_none(ds, "PhotometricInterpretation") or "")
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DecodeError(
            f"{describe(ds)} is {photometric} but decoded to shape {pixels.shape}, not RGB"
        )
    return pixels.astype(np.float64) @ LUMA
