"""What a result object was made from, as one digest: the node, its settings and models, and
the study's instances the object was computed from.

A study analysed again after late images builds its earlier objects again. Whether such an
object is "the same" is decided first by what it was made from: when nothing it was made
from changed, the earlier object stands, whatever the new build's bytes. Comparing bytes
alone (:func:`dicomnode.results.versions.content_digest`) takes a re-run whose inference is not
bitwise repeatable (a GPU's convolution algorithm picked per batch size, TF32) for a change
and sends a new version of an overlay nobody could tell apart from the first. Only where the
inputs differ (a 2.5D slice whose neighbours arrived, a setting, a model file or the node's
release changed) are the contents compared.

The digest errs on the side of "changed": every instance of a referenced instance's series
counts for a model that reads across slices, and any change of the settings or of any model
card or ONNX file counts for every object. "Changed" only means the contents are compared.
Pure apart from one ``stat`` of each model file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom import Dataset

import dicomnode
from dicomnode.config import Settings
from dicomnode.models.registry import ModelCard


@dataclass(frozen=True)
class StudyInstance:
    """One stored instance of the study as an object's input: its series and what identifies
    its stored copy (a second copy of a known UID is dropped at ingest, so the first stays)."""

    series_instance_uid: str
    identity: str


def node_context(settings: Settings, cards: Iterable[ModelCard]) -> str:
    """SHA-256 (hex) of what every result object of a results job depends on besides its
    images: the node's release, its settings, and every model card with its ONNX file's size
    and modification time (a model replaced under the same card)."""
    parts: list[object] = [dicomnode.__version__, settings.model_dump_json()]
    for card in sorted(cards, key=lambda card: (card.model.name, card.model.version)):
        parts.append(card.model_dump_json())
        parts.append(_file_identity(card))
    return _sha256(parts)


def object_inputs(
    ds: Dataset, instances: Mapping[str, StudyInstance], whole_series: bool
) -> set[str]:
    """SOP Instance UIDs of the study's instances that ``ds`` was made from: those it
    references, and with ``whole_series`` (a model that reads neighbouring slices or merges
    findings across them) every instance of their series."""
    referenced = {
        str(element.value)
        for element in ds.iterall()
        if element.keyword == "ReferencedSOPInstanceUID" and str(element.value) in instances
    }
    if not whole_series:
        return referenced
    series = {instances[uid].series_instance_uid for uid in referenced}
    return {uid for uid, instance in instances.items() if instance.series_instance_uid in series}


def inputs_digest(
    context: str, card: ModelCard, kind: str, uids: set[str], instances: Mapping[str, StudyInstance]
) -> str:
    """SHA-256 (hex) of what an object of ``kind`` by ``card`` was made from: the job's
    :func:`node_context` and the instances ``uids`` as stored. '' when it references none of
    the study's instances (nothing to decide by: its content is compared)."""
    if not uids:
        return ""
    return _sha256(
        [
            context,
            card.model.name,
            card.model.version,
            kind,
            *((uid, instances[uid].identity) for uid in sorted(uids)),
        ]
    )


def reads_across_slices(card: ModelCard) -> bool:
    """Whether an object of ``card`` depends on more than the images it references: 2.5D
    input, a segmentation of a stack, an ensemble (whose members may do either)."""
    return card.input.slices > 1 or card.model.task in ("segmentation", "ensemble")


def _file_identity(card: ModelCard) -> str:
    if not card.model.onnx:
        return ""
    try:
        stat = card.onnx_path.stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _sha256(parts: list[object]) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
