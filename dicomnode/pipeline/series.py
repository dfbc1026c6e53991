"""Images of a study grouped into series, each series split into stacks of slices of one
geometry and one scan, ordered by slice position, and the 2.5D neighbours of a slice by
distance (pure).

A series can hold more than one volume: a CT series often carries its localiser (a coronal
projection, of another size), or axial slices beside reformats. Only images of one Frame of
Reference, orientation (:func:`same_orientation`), matrix and pixel spacing are stacked as one
volume. It can also hold the same positions scanned more than once (contrast phases, a dynamic
series: Temporal Position, Acquisition Number, Acquisition Time); each scan is a stack of its
own (``scans.separate_scans``), analysed like a series of its own, so that a slice's 2.5D
neighbours, a finding's slices and a SEG all belong to one scan.

Two tolerances, for two questions: whether two images are slices of one volume
(ORIENTATION_TOLERANCE, about 0.6 degrees: a reformat a few degrees off is another volume; the
SEG writer groups its frames by the same predicate), and which anatomical plane a volume lies
in (the model card's ``orientation_tolerance_deg``, 20 degrees by default: a gantry tilt still
gives axial slices), which the notes name as selection (``select.image_plane``) does.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from dicomnode.models.registry import SelectionRules
from dicomnode.pipeline.scans import SAME_POSITION_MM, Scan, instance_order, separate_scans
from dicomnode.pipeline.select import image_plane

# Direction cosines that differ by no more than this are one orientation (about 0.6 degrees).
ORIENTATION_TOLERANCE = 0.01
# Pixel spacings that differ by no more than this fraction are one matrix.
PIXEL_SPACING_TOLERANCE = 0.01
# Slices whose positions along the normal differ by no more than this (mm) are one position.
DUPLICATE_TOLERANCE_MM = SAME_POSITION_MM
# A neighbour is the slice nearest the nominal distance if it lies within this fraction of the
# nominal spacing of it; else there is a gap and the stack ends there for that slice.
NEIGHBOUR_TOLERANCE = 0.25
# A stack of fewer slices is left out when its series holds a stack of at least this many (a
# localiser or a stray reformat beside the volume).
MIN_STACK_SLICES = 3
# Projection radiographs may carry an Image Plane module; they are never slices of a volume.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RF", "RG", "XA"})
# The plane named in notes when no model card says otherwise: the cards' default tolerance.
PLANE_TOLERANCE_DEG = SelectionRules().orientation_tolerance_deg


def same_orientation(first: Sequence[float], second: Sequence[float]) -> bool:
    """True when two Image Orientation (Patient) values (six direction cosines) are one
    orientation: no cosine differs by more than ORIENTATION_TOLERANCE. Values written with
    other rounding (1e-6 apart) are one orientation; a reformat a degree off is not."""
    return len(first) == len(second) == 6 and all(
        abs(float(a) - float(b)) <= ORIENTATION_TOLERANCE
        for a, b in zip(first, second, strict=True)
    )


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
        if not same_orientation([*self.row, *self.column], [*other.row, *other.column]):
            return False
        if self.pixel_spacing is None or other.pixel_spacing is None:
            return self.pixel_spacing == other.pixel_spacing
        return all(
            abs(a - b) <= PIXEL_SPACING_TOLERANCE * max(a, b)
            for a, b in zip(self.pixel_spacing, other.pixel_spacing, strict=True)
        )

    def describe(self, tolerance_deg: float = PLANE_TOLERANCE_DEG) -> str:
        """E.g. 'axial 512x512': the plane as selection names it (the patient axis nearest the
        normal, oblique beyond ``tolerance_deg``)."""
        normal = self.normal / np.linalg.norm(self.normal)
        name = image_plane((float(normal[0]), float(normal[1]), float(normal[2])), tolerance_deg)
        return f"{name.lower()} {self.size[0]}x{self.size[1]}"


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


def _volume(scan: Scan) -> tuple[Stack, int]:
    """The images of one scan in slice order with one image per position (the lowest Instance
    Number, then SOP Instance UID: the same choice whatever the arrival order), and how many
    images were left out as duplicates of a position."""
    placed = sorted(
        zip(scan.positions, scan.images, strict=True),
        key=lambda item: (item[0], instance_order(item[1])),
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


def _scans(plane: _Plane, images: list[Dataset]) -> list[Scan]:
    """The images of one plane geometry in scans of its positions (one unless the positions
    were scanned more than once)."""
    normal = plane.normal
    positions = [
        float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64)))
        for ds in images
    ]
    return separate_scans(images, positions)


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def _series_stacks(series: list[Dataset], tolerance_deg: float) -> tuple[list[Stack], list[str]]:
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
    # (label, stack, scan order) of every volume.
    volumes: list[tuple[str, Stack, int]] = []
    rescanned = False
    for plane, members in planes:
        scans = _scans(plane, members)
        if len(scans) > 1:
            rescanned = True
            notes.append(
                f"{name}: {plane.describe(tolerance_deg)}: the same positions scanned "
                f"{len(scans)} times (temporal position, acquisition number or acquisition "
                "time): each scan is a stack of its own"
            )
        for order, scan in enumerate(scans):
            stack, duplicates = _volume(scan)
            label = " ".join(filter(None, (plane.describe(tolerance_deg), scan.label)))
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
            volumes.append((label, stack, order))
    volumes.sort(
        key=lambda item: (
            -len(item[1]),
            item[2],
            str(item[1].images[0].get("SOPInstanceUID", "")),
        )
    )
    if len(volumes) > 1:
        enough = len(volumes[0][1]) >= MIN_STACK_SLICES
        parts = []
        kept = []
        for label, stack, order in volumes:
            if enough and len(stack) < MIN_STACK_SLICES:
                parts.append(
                    f"{label} {_images(len(stack))} (left out: fewer than {MIN_STACK_SLICES})"
                )
            else:
                parts.append(f"{label} {_images(len(stack))}")
                kept.append((label, stack, order))
        basis = "geometry (frame of reference, orientation, matrix, pixel spacing)"
        if rescanned:
            basis += " and scan"
        notes.append(
            f"{name}: {_images(len(series))} split by {basis} into {len(volumes)} stacks: "
            + "; ".join(parts)
        )
        volumes = kept
    stacks = [stack for _, stack, _ in volumes]
    for group in flat.values():
        ordered = sorted(group, key=instance_order)
        stacks.append(Stack(ordered, [float(i) for i in range(len(ordered))], None, volume=False))
    return stacks, notes


def stacks_in_order(
    images: list[Dataset], plane_tolerance_deg: float = PLANE_TOLERANCE_DEG
) -> tuple[list[Stack], list[str]]:
    """The images grouped by Series Instance UID (first-seen order), each series split into
    stacks (largest first; scans of the same positions first scanned first) and each stack in
    slice order, with notes (no patient data) on series that split, stacks left out, duplicate
    positions and gaps. Within a series that holds a stack of at least MIN_STACK_SLICES,
    smaller stacks (a localiser) are left out; images without a plane geometry are never left
    out. ``plane_tolerance_deg``: how far from an axis a stack's normal may lie for the notes
    to name its plane (the model card's ``orientation_tolerance_deg``)."""
    groups: dict[str, list[Dataset]] = {}
    for ds in images:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    stacks: list[Stack] = []
    notes: list[str] = []
    for series in groups.values():
        series_stacks, series_notes = _series_stacks(series, plane_tolerance_deg)
        stacks.extend(series_stacks)
        notes.extend(series_notes)
    return stacks, notes
