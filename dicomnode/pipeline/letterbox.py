"""Geometry between a model input and its source image: the letterbox (or stretch) that puts
the image into the input, mapped back to the source, and the pixels' aspect that letterbox
resamples to square pixels (and that result objects state or resample to square too).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pydicom
from PIL import Image
from pydicom.multival import MultiValue

from dicomnode.pipeline.attributes import value_or_none


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


def pixel_aspect_ratio(ds: pydicom.Dataset) -> tuple[int, int] | None:
    """``pixel_aspect`` as a Pixel Aspect Ratio (0028,0034) or Presentation Pixel Aspect Ratio
    (0070,0102) value: (vertical, horizontal) integers in lowest terms (0.2 \\ 0.1 mm spacing:
    (2, 1); 0.139 \\ 0.143: (139, 143)); None for square pixels."""
    aspect = pixel_aspect(ds)
    if aspect == 1.0:
        return None
    ratio = Fraction(aspect).limit_denominator(1000)
    return ratio.numerator, ratio.denominator
