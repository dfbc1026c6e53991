"""Images of a study grouped into series, each series split into stacks of slices of one
geometry, ordered by slice position, and the 2.5D neighbours of a slice by distance (pure).

A series can hold more than one volume: a CT series often carries its localiser (a coronal
projection, of another size), or axial slices beside reformats. Only images of one Frame of
Reference, orientation, matrix and pixel spacing are stacked as one volume."""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

# Direction cosines that differ by no more than this are one orientation (about 0.6 degrees).
ORIENTATION_TOLERANCE = 0.01
# Pixel spacings that differ by no more than this fraction are one matrix.
PIXEL_SPACING_TOLERANCE = 0.01
# Slices whose positions along the normal differ by no more than this (mm) are one position.
DUPLICATE_TOLERANCE_MM = 0.01
# A neighbour is the slice nearest the nominal distance if it lies within this fraction of the
# nominal spacing of it; else there is a gap and the stack ends there for that slice.
NEIGHBOUR_TOLERANCE = 0.25
# A stack of fewer slices is left out when its series holds a stack of at least this many (a
# localiser or a stray reformat beside the volume).
MIN_STACK_SLICES = 3
# Projection radiographs may carry an Image Plane module; they are never slices of a volume.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RF", "RG", "XA"})


@dataclass(frozen=True)
class _Plane:
    """The geometry that the slices of one volume share."""

    frame_of_reference: str
    row: np.ndarray
    column: np.ndarray
    size: tuple[int, int]
    pixel_spacing: tuple[float, float] | None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.column)

    def matches(self, other: _Plane) -> bool:
        if self.frame_of_reference != other.frame_of_reference or self.size != other.size:
            return False
        if (
            np.max(np.abs(self.row - other.row)) > ORIENTATION_TOLERANCE
            or np.max(np.abs(self.column - other.column)) > ORIENTATION_TOLERANCE
        ):
            return False
        if self.pixel_spacing is None or other.pixel_spacing is None:
            return self.pixel_spacing == other.pixel_spacing
        return all(
            abs(a - b) <= PIXEL_SPACING_TOLERANCE * max(a, b)
            for a, b in zip(self.pixel_spacing, other.pixel_spacing, strict=True)
        )

    def describe(self) -> str:
        """E.g. 'axial 512x512' (orientation from the normal's main axis)."""
        normal = np.abs(self.normal)
        axis = int(np.argmax(normal))
        name = ("sagittal", "coronal", "axial")[axis] if normal[axis] >= 0.9 else "oblique"
        return f"{name} {self.size[0]}x{self.size[1]}"


def _plane(ds: Dataset) -> _Plane | None:
    """The image's plane geometry, or None where it is not a slice of a volume."""
    if str(ds.get("Modality", "")).upper() in PROJECTION_MODALITIES:
        return None
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    if orientation is None or position is None or len(orientation) != 6 or len(position) != 3:
        return None
    try:
        row = np.asarray(orientation[:3], dtype=np.float64)
        column = np.asarray(orientation[3:], dtype=np.float64)
        spacing = ds.get("PixelSpacing")
        pixel_spacing = (
            (float(spacing[0]), float(spacing[1]))
            if spacing is not None and len(spacing) == 2
            else None
        )
        size = (int(ds.Rows), int(ds.Columns))
    except (TypeError, ValueError, AttributeError):
        return None
    if np.linalg.norm(np.cross(row, column)) < 0.5:  # degenerate direction cosines
        return None
    return _Plane(str(ds.get("FrameOfReferenceUID", "")), row, column, size, pixel_spacing)


@dataclass(frozen=True)
class Stack:
    """Images of one series analysed as one volume, in slice order. ``volume``: the images
    are slices of one plane geometry (positions in mm along its normal); else they are images
    without one (radiographs, secondary captures) ordered by Instance Number, positions their
    order. ``spacing``: the nominal (median) distance between adjacent slices (mm), None for
    a single slice or images that are not a volume."""

    images: list[Dataset]
    positions: list[float]
    spacing: float | None
    volume: bool

    def __len__(self) -> int:
        return len(self.images)

    def neighbours(self, index: int, count: int) -> list[Dataset]:
        """``count`` (odd) slices centred on slice ``index``, at multiples of the nominal
        spacing: each the slice nearest its distance, within NEIGHBOUR_TOLERANCE of the
        spacing. Where there is none (the end of the volume, or a gap of missing slices)
        the last slice found on that side repeats, as at the volume's ends in training."""
        half = count // 2
        if self.spacing is None:
            last = len(self.images) - 1
            return [
                self.images[min(max(index + offset, 0), last)] for offset in range(-half, half + 1)
            ]
        picks = {0: index}
        for direction in (-1, 1):
            previous, ended = index, False
            for step in range(1, half + 1):
                if not ended:
                    target = self.positions[index] + direction * step * self.spacing
                    nearest = self._nearest(target)
                    within = (
                        abs(self.positions[nearest] - target) <= NEIGHBOUR_TOLERANCE * self.spacing
                    )
                    if within and (nearest - previous) * direction > 0:
                        previous = nearest
                    else:
                        ended = True
                picks[direction * step] = previous
        return [self.images[picks[offset]] for offset in range(-half, half + 1)]

    def _nearest(self, target: float) -> int:
        after = bisect.bisect_left(self.positions, target)
        candidates = [i for i in (after - 1, after) if 0 <= i < len(self.positions)]
        return min(candidates, key=lambda i: abs(self.positions[i] - target))

    def slots(self) -> list[int]:
        """Each slice's place in nominal spacings from the first: adjacent slices differ by 1,
        slices across a gap by more."""
        if self.spacing is None:
            return list(range(len(self.images)))
        return [round((p - self.positions[0]) / self.spacing) for p in self.positions]


def _instance_key(ds: Dataset) -> tuple[int, str]:
    try:
        number = int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return number, str(ds.get("SOPInstanceUID", ""))


def _volume(plane: _Plane, images: list[Dataset]) -> tuple[Stack, int]:
    """The images in slice order with one image per position (the lowest Instance Number,
    then SOP Instance UID: the same choice whatever the arrival order), and how many images
    were left out as duplicates of a position."""
    normal = plane.normal
    placed = sorted(
        (
            (float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64))), ds)
            for ds in images
        ),
        key=lambda item: (item[0], _instance_key(item[1])),
    )
    kept: list[tuple[float, Dataset]] = []
    for position, ds in placed:
        if kept and position - kept[-1][0] <= DUPLICATE_TOLERANCE_MM:
            continue
        kept.append((position, ds))
    positions = [position for position, _ in kept]
    spacing = float(statistics.median(np.diff(positions))) if len(positions) > 1 else None
    stack = Stack([ds for _, ds in kept], positions, spacing, volume=True)
    return stack, len(placed) - len(kept)


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def _series_stacks(series: list[Dataset]) -> tuple[list[Stack], list[str]]:
    """One series split into stacks, and notes on how (no patient data)."""
    name = (
        f"series {series[0].get('SeriesNumber')}" if series[0].get("SeriesNumber") else "a series"
    )
    planes: list[tuple[_Plane, list[Dataset]]] = []
    flat: dict[tuple[int, int], list[Dataset]] = {}
    for ds in series:
        plane = _plane(ds)
        if plane is None:
            flat.setdefault((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))), []).append(ds)
            continue
        for reference, members in planes:
            if reference.matches(plane):
                members.append(ds)
                break
        else:
            planes.append((plane, [ds]))
    notes = []
    volumes = []
    for plane, members in planes:
        stack, duplicates = _volume(plane, members)
        label = plane.describe()
        if duplicates:
            notes.append(
                f"{name}: {label}: {_images(duplicates)} at a position already in the stack "
                "left out (one image per slice position)"
            )
        if stack.spacing is not None:
            missing = sum(
                max(round(gap / stack.spacing) - 1, 0)
                for gap in np.diff(stack.positions)
                if gap > 1.5 * stack.spacing
            )
            if missing:
                notes.append(
                    f"{name}: {label}: about {missing} missing slice(s) at a nominal spacing "
                    f"of {stack.spacing:.2f} mm; 2.5D neighbours across a gap repeat the slice"
                )
        volumes.append((label, stack))
    volumes.sort(key=lambda item: (-len(item[1]), str(item[1].images[0].get("SOPInstanceUID", ""))))
    if len(volumes) > 1:
        enough = len(volumes[0][1]) >= MIN_STACK_SLICES
        parts = []
        kept = []
        for label, stack in volumes:
            if enough and len(stack) < MIN_STACK_SLICES:
                parts.append(
                    f"{label} {_images(len(stack))} (left out: fewer than {MIN_STACK_SLICES})"
                )
            else:
                parts.append(f"{label} {_images(len(stack))}")
                kept.append((label, stack))
        notes.append(
            f"{name}: {_images(len(series))} split by geometry (frame of reference, "
            f"orientation, matrix, pixel spacing) into {len(volumes)} stacks: " + "; ".join(parts)
        )
        volumes = kept
    stacks = [stack for _, stack in volumes]
    for group in flat.values():
        ordered = sorted(group, key=_instance_key)
        stacks.append(Stack(ordered, [float(i) for i in range(len(ordered))], None, volume=False))
    return stacks, notes


def stacks_in_order(images: list[Dataset]) -> tuple[list[Stack], list[str]]:
    """The images grouped by Series Instance UID (first-seen order), each series split into
    stacks (largest first) and each stack in slice order, with notes (no patient data) on
    series that split, stacks left out, duplicate positions and gaps. Within a series that
    holds a stack of at least MIN_STACK_SLICES, smaller stacks (a localiser) are left out;
    images without a plane geometry are never left out."""
    groups: dict[str, list[Dataset]] = {}
    for ds in images:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    stacks: list[Stack] = []
    notes: list[str] = []
    for series in groups.values():
        series_stacks, series_notes = _series_stacks(series)
        stacks.extend(series_stacks)
        notes.extend(series_notes)
    return stacks, notes
