"""An image-to-image model's correction back in the source's stored values: the change it made
to the presentation values, through the inverse of the transform the model saw.

Pure functions: the only I/O is pydicom decoding the pixel data already in the dataset.
"""

from __future__ import annotations

import numpy as np
import pydicom

from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.attributes import value_or_none
from dicomnode.pipeline.presentation_values import (
    DEFAULT_WINDOW_PERCENTILES,
    first_window,
    has_voi,
    is_inverted,
    lut_item,
    modality_values,
    padding_mask,
    percentiles,
    stored_pixels,
    voi_unit,
)


def apply_correction(ds: pydicom.Dataset, correction: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The source's stored values plus an image-to-image model's ``correction`` (presentation
    units over the source grid, see ``postprocess.image_correction``), converted to stored
    units through the transform the model saw (Modality LUT, then the card's window, else the
    image's VOI LUT or window, else its percentile window; the inversion): new stored =
    transform^-1(transform(stored) + correction). Values outside the window keep their full
    range (nothing is clipped to the window), Pixel Padding is left as it is, and the result is
    rounded and clipped to Bits Stored."""
    stored = stored_pixels(ds)
    padding = padding_mask(ds, stored)
    window = spec.window
    if window is None and not has_voi(ds):
        # The percentile window presentation_pixels took, as a fixed window.
        values = modality_values(ds, stored)
        low, high = percentiles(values, padding, spec.window_percentiles)
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
        table = voi_unit(ds, domain, window, DEFAULT_WINDOW_PERCENTILES, None)
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
