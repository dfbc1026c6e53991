"""Raster helpers for the chest phantoms: soft steps, blurs, splats, lines and the image frame.

All helpers are vectorised numpy; none loops over pixels in Python.
"""

from __future__ import annotations

import math

import numpy as np


def ramp(value: np.ndarray, width: float) -> np.ndarray:
    """Soft 0..1 step of a signed margin (positive inside) over ``width``."""
    step = np.true_divide(value, width)
    if not isinstance(step, np.ndarray) or step.ndim == 0:
        return np.clip(step + 0.5, 0.0, 1.0)
    # In place: the same values as np.clip(value / width + 0.5, 0, 1) without two temporaries
    # (a 3000-pixel image's margins are 36 MB each).
    step += 0.5
    return np.clip(step, 0.0, 1.0, out=step)


# Pixels of the rows gaussian_blur sums at a time (their float32 sum and product: 1 MB).
BLOCK_PIXELS = 1 << 17


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur by shifted sums (small sigmas only; edges replicated)."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = image
    # A block of rows at a time, each tap added in the same order: the same sums, with the
    # block's sum and product in cache (a 3000-pixel image's taps each streamed 36 MB arrays
    # through memory; this is twice as fast there and the same at 512 pixels).
    block_rows = max(1, BLOCK_PIXELS // image.shape[1])
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        length = out.shape[axis]
        acc = np.zeros_like(out)
        term = np.empty_like(out[:block_rows])  # one buffer for every tap's product
        for top in range(0, out.shape[0], block_rows):
            bottom = min(top + block_rows, out.shape[0])
            block, product = acc[top:bottom], term[: bottom - top]
            for k, weight in enumerate(taps):
                if axis == 0:
                    shifted = padded[top + k : bottom + k]
                else:
                    shifted = padded[top:bottom, k : k + length]
                block += np.multiply(weight, shifted, out=product)
        out = acc
    return out


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency random field in -1..1: a coarse grid upsampled bilinearly."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)

    def axis(length: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.linspace(0.0, cells, length, dtype=np.float32)
        i0 = np.minimum(pos.astype(int), cells - 1)
        return i0, pos - i0

    ri, rf = axis(shape[0])
    ci, cf = axis(shape[1])
    rows = grid[ri] * (1 - rf)[:, None] + grid[ri + 1] * rf[:, None]
    return rows[:, ci] * (1 - cf)[None, :] + rows[:, ci + 1] * cf[None, :]


def sample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear sample of ``image`` at float pixel coordinates (clamped at the border)."""
    h, w = image.shape
    rows = np.clip(rows, 0, h - 1.001)
    cols = np.clip(cols, 0, w - 1.001)
    r0 = rows.astype(np.int32)
    c0 = cols.astype(np.int32)
    fr = rows - r0
    fc = cols - c0
    top = image[r0, c0] * (1 - fc) + image[r0, c0 + 1] * fc
    bottom = image[r0 + 1, c0] * (1 - fc) + image[r0 + 1, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def splat(
    shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Accumulate weighted points into an image with bilinear weights."""
    height, width = shape
    keep = (rows >= 0) & (rows < height - 1) & (cols >= 0) & (cols < width - 1)
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    r0 = rows.astype(np.int64)
    c0 = cols.astype(np.int64)
    fr = rows - r0
    fc = cols - c0
    flat = np.zeros(height * width, dtype=np.float64)
    for dr, dc, wgt in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        flat += np.bincount((r0 + dr) * width + c0 + dc, weights * wgt, minlength=height * width)
    return flat.reshape(height, width).astype(np.float32)


def resample_polyline(rows: np.ndarray, cols: np.ndarray, step: float) -> np.ndarray:
    """Points every ``step`` pixels along a polyline, as an (n, 2) array of (row, col)."""
    points = np.stack([rows, cols], axis=1).astype(np.float64)
    lengths = np.hypot(*np.diff(points, axis=0).T)
    along = np.concatenate([[0.0], np.cumsum(lengths)])
    targets = np.arange(0.0, along[-1] + 1e-9, step)
    return np.stack(
        [np.interp(targets, along, points[:, 0]), np.interp(targets, along, points[:, 1])], axis=1
    )


def chaikin(points: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Smooth an open polyline ((n, 2) array) by corner cutting, keeping its end points."""
    for _ in range(rounds):
        q = 0.75 * points[:-1] + 0.25 * points[1:]
        r = 0.25 * points[:-1] + 0.75 * points[1:]
        middle = np.empty((2 * len(q), 2))
        middle[0::2], middle[1::2] = q, r
        points = np.concatenate([points[:1], middle, points[-1:]])
    return points


def line_image(
    shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, width: float
) -> np.ndarray:
    """A polyline drawn with a Gaussian profile of about ``width`` pixels, peak about 1."""
    points = resample_polyline(rows, cols, 0.5)
    sigma = max(0.5, width / 2.355)
    weights = np.full(len(points), 0.5 * math.sqrt(2 * math.pi) * sigma)
    return gaussian_blur(splat(shape, points[:, 0], points[:, 1], weights), sigma)


def box_of(mask: np.ndarray | None) -> tuple[int, int, int, int] | None:
    """Half-open (row0, col0, row1, col1) around the true pixels of ``mask``, or None."""
    if mask is None:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


class Frame:
    """Affine map between pixel coordinates and the normalised patient frame.

    One normalised unit is half the shorter image side (before the patient ``scale``), so the
    chest fits the shorter side of a non-square image and the longer side shows more of it.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        scale: float,
        angle: float,
        shift: tuple[float, float],
    ):
        self.shape = shape
        self.half = min(shape) / 2.0
        self.centre_row = (shape[0] - 1) / 2.0
        self.centre_col = (shape[1] - 1) / 2.0
        self.scale = scale
        self.cos = math.cos(angle)
        self.sin = math.sin(angle)
        self.shift = shift

    @property
    def pixels_per_unit(self) -> float:
        """Pixels per normalised patient unit."""
        return self.half * self.scale

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (x, y) of every pixel centre."""
        axis_x = (np.arange(self.shape[1], dtype=np.float32) - self.centre_col) / self.half
        axis_y = (np.arange(self.shape[0], dtype=np.float32) - self.centre_row) / self.half
        px = axis_x[None, :] - self.shift[0]
        py = axis_y[:, None] - self.shift[1]
        x = (self.cos * px + self.sin * py) / self.scale
        y = (-self.sin * px + self.cos * py) / self.scale
        return x.astype(np.float32), y.astype(np.float32)

    def to_pixel(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (row, col) of normalised points."""
        sx, sy = x * self.scale, y * self.scale
        px = self.cos * sx - self.sin * sy + self.shift[0]
        py = self.sin * sx + self.cos * sy + self.shift[1]
        return py * self.half + self.centre_row, px * self.half + self.centre_col


def segments_image(
    shape: tuple[int, int], starts: np.ndarray, ends: np.ndarray, width: float
) -> np.ndarray:
    """Straight segments ((n, 2) pixel (row, col) starts and ends), Gaussian profile, peak ~1."""
    if len(starts) == 0:
        return np.zeros(shape, dtype=np.float32)
    lengths = np.hypot(*(ends - starts).T)
    steps = max(2, int(np.ceil(lengths.max() / 0.5)) + 1)
    t = np.linspace(0.0, 1.0, steps)[None, :, None]
    points = (starts[:, None, :] + (ends - starts)[:, None, :] * t).reshape(-1, 2)
    spacing = np.repeat(lengths / (steps - 1), steps)
    sigma = max(0.5, width / 2.355)
    weights = spacing * math.sqrt(2 * math.pi) * sigma
    return gaussian_blur(splat(shape, points[:, 0], points[:, 1], weights), sigma)
