"""Preview PNGs for the study page: a stored image as a radiologist sees it, or an overlay the
node wrote, downscaled so that the long side is at most ``max_side`` pixels (aspect kept).

The source image goes through the node's own presentation (:func:`presentation_pixels`:
Modality LUT, the image's VOI LUT or window, MONOCHROME1 / INVERSE inverted, Pixel Padding
black), corrected for non-square pixels. A JPEG 2000 image much larger than the preview is
decoded at a reduced resolution (its wavelet levels give it without decoding the rest): a
2-3k px radiograph then decodes in ~0.1 s instead of ~1 s. Pure apart from reading the file.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless

from dicomnode.pipeline.attributes import value_or_none
from dicomnode.pipeline.decode import GREY, describe, first_frame, number_of_frames
from dicomnode.pipeline.letterbox import pixel_aspect
from dicomnode.pipeline.presentation_values import presentation_pixels

MAX_SIDE = 512
_JPEG2000 = (JPEG2000Lossless, JPEG2000)
# Wavelet levels a JPEG 2000 image is decoded down by, at most (5 is the encoders' default).
_MAX_REDUCE = 5


def preview_size(rows: int, columns: int, aspect: float, max_side: int) -> tuple[int, int]:
    """(width, height) of the preview of a rows x columns image whose pixels are ``aspect``
    times as high as wide: the displayed shape, its long side at most ``max_side``."""
    height, width = rows * aspect, float(columns)
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: a 512 px grey image compresses ~3x faster than at the default level, ~5 % larger.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _reduced_jpeg2000(ds: pydicom.Dataset, max_side: int) -> pydicom.Dataset | None:
    """A copy of a single-frame greyscale JPEG 2000 image decoded at the lowest resolution
    level still at least ``max_side`` on its long side, as uncompressed stored values (the
    same header otherwise); None when the image is not such or is small already, or its
    codestream is one this cannot read (the caller then decodes it whole)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    photometric = str(value_or_none(ds, "PhotometricInterpretation") or "")
    if syntax not in _JPEG2000 or photometric not in GREY or number_of_frames(ds) != 1:
        return None
    if int(value_or_none(ds, "SamplesPerPixel") or 1) != 1:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    levels = min(_MAX_REDUCE, int(math.log2(max(rows, columns) / max_side)))
    if levels < 1:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        codestream = get_j2k_parameters(frame)
        precision = int(codestream.get("precision", 0))
        # Pillow returns unsigned samples only, shifted up to 16 bits. A precision other than
        # Bits Stored: decoded whole, so that values outside Bits Stored are found as in the
        # analysis (decode.fit_bits_stored) instead of masked away by the reduced copy.
        if codestream.get("is_signed") or not 1 <= precision <= 16:
            return None
        if precision != int(value_or_none(ds, "BitsStored") or 0):
            return None
        with Image.open(io.BytesIO(frame)) as image:
            if image.mode not in ("L", "I;16"):
                return None
            image.reduce = levels
            image.load()
            stored = np.asarray(image)
    except Exception:  # a codestream Pillow cannot read, or fewer levels than asked for
        return None
    if image.mode == "I;16" and precision < 16:
        stored = stored >> (16 - precision)
    expected = (math.ceil(rows / 2**levels), math.ceil(columns / 2**levels))
    if stored.shape != expected:
        return None
    bits = int(ds.BitsAllocated)
    # New elements throughout: setting a value on an element shared with ``ds`` would change it.
    reduced = pydicom.Dataset()
    for element in ds:
        if element.keyword not in ("Rows", "Columns", "PixelData"):
            reduced.add(copy.deepcopy(element))
    reduced.file_meta = pydicom.dataset.FileMetaDataset()
    reduced.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    reduced.Rows, reduced.Columns = expected
    reduced.PixelData = stored.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    reduced["PixelData"].VR = "OB" if bits <= 8 else "OW"
    return reduced


def source_png(path: Path | str, max_side: int = MAX_SIDE) -> bytes:
    """PNG (8-bit grey) of a stored image's first frame as presented, long side at most
    ``max_side``. DecodeError or ValueError when it cannot be presented."""
    ds = pydicom.dcmread(path)
    rows, columns = int(ds.Rows), int(ds.Columns)
    size = preview_size(rows, columns, pixel_aspect(ds), max_side)
    grey = presentation_pixels(_reduced_jpeg2000(ds, max_side) or ds)
    image = Image.fromarray(np.asarray(grey, dtype=np.float32), mode="F")
    if image.size != size:
        # BOX: each preview pixel the mean of the pixels it covers (no ringing on edges).
        resample = Image.Resampling.BOX if size[0] < image.size[0] else Image.Resampling.BILINEAR
        image = image.resize(size, resample)
    levels = np.rint(np.clip(np.asarray(image) * 255.0, 0.0, 255.0)).astype(np.uint8)
    return _png(Image.fromarray(levels, mode="L"))


def overlay_png(path: Path | str, max_side: int = MAX_SIDE) -> bytes:
    """PNG (RGB) of an overlay secondary capture the node wrote (RGB, rendered already: shown
    as stored), long side at most ``max_side``. ValueError when it is not an RGB image."""
    ds = pydicom.dcmread(path)
    photometric = str(value_or_none(ds, "PhotometricInterpretation") or "")
    if photometric != "RGB" or int(value_or_none(ds, "SamplesPerPixel") or 1) != 3:
        raise ValueError(f"{describe(ds)} is {photometric or 'not an image'}, not an RGB overlay")
    pixels = first_frame(ds)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="RGB")
    size = preview_size(image.height, image.width, pixel_aspect(ds), max_side)
    if image.size != size:
        # The overlay's text and outlines are thin: Lanczos keeps them legible when shrunk.
        image = image.resize(size, Image.Resampling.LANCZOS)
    return _png(image)
