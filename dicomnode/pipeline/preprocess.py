"""From a DICOM image to a model input: its presentation pixels (``presentation_values``)
resized per the model card (letterbox or stretch, ``letterbox``), normalised and repeated over
the card's channels, or adjacent slices stacked as the channels of a 2.5D input.

Pure functions: the only I/O is pydicom decoding the pixel data already in the dataset.
"""

from __future__ import annotations

import numpy as np
import pydicom
from PIL import Image

from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.letterbox import Letterbox, pixel_aspect
from dicomnode.pipeline.presentation_values import presentation_pixels


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
