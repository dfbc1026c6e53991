"""Deterministic UIDs for result objects: the same model on the same input gives the same UIDs.

An instance's UID comes from the source instances it was made from, so re-running a model on
the same images gives the same instances (never duplicates), and a study's report or key
object selection made again with late images is a new instance (a UID names one content: a
PACS that already holds a UID may keep what it has), whose SR names the earlier report its
predecessor. A new model version changes the UIDs and so opens a new series.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pydicom.uid import generate_uid

from dicomnode.findings import Algorithm

# Namespace mixed into every UID so that other software hashing the same inputs with pydicom's
# prefix cannot produce our UIDs.
_NAMESPACE = "dicomnode/results/v1"
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
# Result kinds, one series each per study and model version: TID 1500 SR, Secondary Capture
# overlay, Segmentation, Grayscale Softcopy Presentation State, derived images, Key Object
# Selection, and the IOCM rejection notes of superseded ones (results/rejection.py). A typo in
# a kind would silently open a new series, so only these are accepted.
KINDS = frozenset({"sr", "sc", "seg", "gsps", "derived", "kos", "rejection"})


def result_uid(*parts: str) -> str:
    """Return a DICOM UID derived only from ``parts`` (same parts, same UID)."""
    if not parts:
        raise ValueError("result_uid needs at least one part to derive a UID from")
    for index, part in enumerate(parts):
        if not isinstance(part, str) or not part:
            raise ValueError(f"result_uid part {index} must be a non-empty str, got {part!r}")
    # JSON keeps part boundaries: ("ab", "c") and ("a", "bc") must not collide, which they would
    # if the parts were simply concatenated as generate_uid does with its entropy sources.
    return str(generate_uid(entropy_srcs=[json.dumps([_NAMESPACE, *parts])]))


def result_series_uid(study_uid: str, algorithm: Algorithm, kind: str) -> str:
    """Return the Series Instance UID of the ``kind`` results (e.g. "sr") of a model on a study."""
    _check_uid(study_uid, "study_uid")
    _check_kind(kind)
    return result_uid("series", study_uid, *_algorithm_parts(algorithm), kind)


def result_instance_uid(source_sop_uids: Sequence[str], algorithm: Algorithm, kind: str) -> str:
    """Return the SOP Instance UID of the ``kind`` result a model derives from source instances."""
    if isinstance(source_sop_uids, str) or not source_sop_uids:
        raise ValueError(
            "source_sop_uids must be a non-empty sequence of SOP Instance UIDs, "
            f"got {source_sop_uids!r}"
        )
    for uid in source_sop_uids:
        _check_uid(uid, "source SOP Instance UID")
    _check_kind(kind)
    # Sorted and de-duplicated: the result depends on which images were read, not in what order.
    sources = sorted(set(source_sop_uids))
    return result_uid("instance", *sources, *_algorithm_parts(algorithm), kind)


def _algorithm_parts(algorithm: Algorithm) -> tuple[str, str, str]:
    if not algorithm.name or not algorithm.version:
        raise ValueError(f"algorithm needs a name and a version, got {algorithm!r}")
    return (algorithm.manufacturer, algorithm.name, algorithm.version)


def _check_uid(uid: str, what: str) -> None:
    if not isinstance(uid, str) or len(uid) > 64 or not _UID_PATTERN.fullmatch(uid):
        raise ValueError(f"{what} {uid!r} is not a valid DICOM UID")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
