"""Repeated scans of the same slice positions in one series told apart, so that each scan
becomes a volume of its own (pure).

A CT series may hold the same positions scanned more than once: contrast phases (arterial,
portal venous, delayed), a dynamic or perfusion series, a repeat after a failed breath-hold.
A radiologist reads each scan on its own, and a finding must refer to slices of one scan: kept
as one volume, one image per position would mix scans of different contrast and timing into
one stack and into each slice's 2.5D neighbours. Images of one plane geometry are therefore:

1. split by the labels the modality gives each scan: Temporal Position Identifier (or
   Temporal Position Index) and Acquisition Number;
2. split, within one label, where a position comes round again at a later Acquisition
   (Date)Time: phases that share an Acquisition Number;
3. joined again where the parts do not cover the same positions: a step-and-shoot scan numbers
   each rotation's slices as an acquisition of its own, and those tile one volume. A part
   covers another's positions when more than half of the smaller part's slices lie within the
   range of the other's.

Images at one position with the same labels and time stay in one scan (duplicates: the volume
keeps one). Not told apart: scans with neither a label nor a distinct time, and scans under
one label at shifted positions (no position comes round again).
"""

from __future__ import annotations

import bisect
import datetime
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM

# Slice positions (mm along the normal) that differ by no more than this are one position.
SAME_POSITION_MM = 0.01


@dataclass(frozen=True)
class Scan:
    """The images (with their positions along the normal, in mm) of one scan of a volume's
    positions. ``label``: which scan, e.g. 'scan 2 of 3 (acquisition 2)', for notes; "" when
    the images hold one scan."""

    images: list[Dataset]
    positions: list[float]
    label: str = ""


def _number(value: object) -> tuple[int, int | str] | None:
    """A label value as a sortable key (integers in numeric order, before any text)."""
    if value is None or value == "":
        return None
    try:
        return (0, int(str(value).strip()))
    except ValueError:
        return (1, str(value).strip())


def _labels(ds: Dataset) -> tuple[tuple[int, int | str] | None, tuple[int, int | str] | None]:
    """(temporal position, acquisition number) of an image, each None when absent."""
    temporal = _number(ds.get("TemporalPositionIdentifier"))
    if temporal is None:
        temporal = _number(ds.get("TemporalPositionIndex"))
    return temporal, _number(ds.get("AcquisitionNumber"))


# pydicom's DA, TM and DT read the values (None when empty); one they cannot read is no
# value here: an invalid time would order images wrongly.
_INVALID = (ValueError, OverflowError)


def _date(text: str) -> datetime.date | None:
    try:
        return DA(text)
    except _INVALID:
        return None


def _time(text: str) -> datetime.time | None:
    """TM, or its old HH:MM:SS form."""
    try:
        return TM(text.replace(":", ""))
    except _INVALID:
        return None


def _date_time(text: str) -> datetime.datetime | None:
    try:
        return DT(text)
    except _INVALID:
        return None


def _seconds(day: datetime.date | None, time: datetime.time) -> float:
    """Seconds since the start of day 1 (day 0 when the date is not known)."""
    days = day.toordinal() if day is not None else 0
    return (
        days * 86400.0 + time.hour * 3600 + time.minute * 60 + time.second + time.microsecond / 1e6
    )


def acquired(ds: Dataset) -> float | None:
    """When the image was acquired, in seconds on an arbitrary monotonic scale, from Acquisition
    DateTime or Acquisition Date and Time; None without an acquisition time. The modality's
    local time: a DT's UTC offset is left aside, as Acquisition Date and Time have none."""
    stamp = _text(ds, "AcquisitionDateTime")
    if len(stamp) > 8:  # more than a date
        moment = _date_time(stamp)
        return None if moment is None else _seconds(moment.date(), moment.time())
    time = _time(_text(ds, "AcquisitionTime"))
    if time is None:
        return None
    return _seconds(_date(_text(ds, "AcquisitionDate")), time)


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def instance_order(ds: Dataset) -> tuple[int, str]:
    """(Instance Number, SOP Instance UID): an order of images that arrival does not change."""
    try:
        number = int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return number, str(ds.get("SOPInstanceUID", ""))


def _label_order(label: tuple) -> tuple:
    return tuple((value is None, value or (0, 0)) for value in label)


def _by_time(
    indexes: list[int], positions: list[float], times: dict[int, float]
) -> list[list[int]]:
    """``indexes`` (images of one label, all with a time) in runs: in time order, a new run
    begins where a position of the current run comes round again at a later time."""
    runs: list[list[int]] = []
    seen: list[tuple[float, float]] = []  # (position, time) of the current run, sorted
    for index in indexes:
        position, time = positions[index], times[index]
        at = bisect.bisect_left(seen, (position - SAME_POSITION_MM, float("-inf")))
        repeated = False
        while at < len(seen) and seen[at][0] <= position + SAME_POSITION_MM:
            # The same position at the same time is a duplicate image, not another scan.
            repeated = repeated or seen[at][1] != time
            at += 1
        if not runs or repeated:
            runs.append([])
            seen = []
        runs[-1].append(index)
        bisect.insort(seen, (position, time))
    return runs


def _covers(first: list[float], second: list[float]) -> bool:
    """True when two parts cover the same positions: more than half of the smaller one's lie
    within the larger one's range."""
    small, large = sorted((first, second), key=len)
    low, high = min(large) - SAME_POSITION_MM, max(large) + SAME_POSITION_MM
    return 2 * sum(low <= position <= high for position in small) > len(small)


def _label_text(name: str, values: list[tuple[int, int | str]]) -> str:
    shown = [str(value) for _, value in values]
    if len(shown) == 1:
        return f"{name} {shown[0]}"
    return f"{name}s {shown[0]}-{shown[-1]}"


def _describe(scans: list[list[int]], labels: list[tuple]) -> list[str]:
    """'scan i of n (what tells it apart)' for each scan, or "" for all when there is one."""
    if len(scans) == 1:
        return [""]
    temporal = [sorted({labels[i][0] for i in scan if labels[i][0] is not None}) for scan in scans]
    acquisition = [
        sorted({labels[i][1] for i in scan if labels[i][1] is not None}) for scan in scans
    ]
    texts = []
    for number, (temporals, acquisitions) in enumerate(zip(temporal, acquisition, strict=True)):
        # Named by the label that is this scan's alone, else by when it was scanned.
        if temporals and temporal.count(temporals) == 1:
            basis = _label_text("temporal position", temporals)
        elif acquisitions and acquisition.count(acquisitions) == 1:
            basis = _label_text("acquisition", acquisitions)
        else:
            basis = "acquisition time"
        texts.append(f"scan {number + 1} of {len(scans)} ({basis})")
    return texts


def separate_scans(images: list[Dataset], positions: list[float]) -> list[Scan]:
    """The images of one plane geometry (``positions``: each one's position along the normal)
    in scans of the same positions, first scanned first (by label, then time); one scan when
    no position was scanned twice."""
    labels = [_labels(ds) for ds in images]
    times = [acquired(ds) for ds in images]
    by_label: dict[tuple, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    parts: list[list[int]] = []
    for label in sorted(by_label, key=_label_order):
        indexes = by_label[label]
        timed = [times[i] for i in indexes]
        if all(time is not None for time in timed):
            known = {i: t for i, t in zip(indexes, timed, strict=True) if t is not None}
            order = sorted(indexes, key=lambda i: (known[i], instance_order(images[i])))
            parts.extend(_by_time(order, positions, known))
        else:
            parts.append(indexes)
    scans: list[list[int]] = []
    for part in parts:
        part_positions = [positions[i] for i in part]
        for scan in scans:
            if not _covers([positions[i] for i in scan], part_positions):
                scan.extend(part)
                break
        else:
            scans.append(list(part))
    return [
        Scan([images[i] for i in scan], [positions[i] for i in scan], label)
        for scan, label in zip(scans, _describe(scans, labels), strict=True)
    ]
