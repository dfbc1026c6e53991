"""Images of a study grouped into series and ordered by slice position (pure)."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset


def slice_position(ds: Dataset) -> float:
    """Position along the slice normal (mm) from the Image Plane module, else Instance Number."""
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    if orientation is not None and position is not None and len(orientation) == 6:
        row = np.asarray(orientation[:3], dtype=np.float64)
        col = np.asarray(orientation[3:], dtype=np.float64)
        return float(np.dot(np.cross(row, col), np.asarray(position, dtype=np.float64)))
    return float(ds.get("InstanceNumber", 0) or 0)


def series_in_order(images: list[Dataset]) -> list[list[Dataset]]:
    """The images grouped by Series Instance UID (first-seen order), each series sorted by
    slice position."""
    groups: dict[str, list[Dataset]] = {}
    for ds in images:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    return [sorted(group, key=slice_position) for group in groups.values()]


def neighbours(series: list[Dataset], index: int, count: int) -> list[Dataset]:
    """``count`` (odd) slices centred on ``index``; the edge slices repeat past either end."""
    half = count // 2
    last = len(series) - 1
    return [series[min(max(index + offset, 0), last)] for offset in range(-half, half + 1)]
