"""Finding geometry in DICOM image coordinates (SCOORD and presentation-state PIXEL units).

Both put the top-left corner of the top-left pixel at (0, 0), so a pixel's centre is at
(index + 0.5). Findings hold array indexes: points move by half a pixel, half-open boxes
(col1/row1 exclusive) are already pixel edges.
"""

from __future__ import annotations

import numpy as np


def pixel_centre(point: tuple[float, float]) -> np.ndarray:
    """Return the (1, 2) coordinates of the centre of the pixel at (column, row) indexes."""
    column, row = point
    return np.array([[column + 0.5, row + 0.5]], dtype=float)


def box_outline(box: tuple[float, float, float, float]) -> np.ndarray:
    """Return the closed (5, 2) polyline around a half-open (col0, row0, col1, row1) box."""
    column0, row0, column1, row1 = box
    return np.array(
        [
            [column0, row0],
            [column1, row0],
            [column1, row1],
            [column0, row1],
            [column0, row0],
        ],
        dtype=float,
    )


def circle_outline(point: tuple[float, float], radius: float, vertices: int = 24) -> np.ndarray:
    """Return a closed polyline approximating a circle round the centre of a pixel."""
    centre = pixel_centre(point)[0]
    angles = np.linspace(0.0, 2.0 * np.pi, vertices, endpoint=False)
    ring = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.vstack([ring, ring[:1]])
