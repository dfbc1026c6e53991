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

The instances counted are exactly those the job's models read (the analysis's images, ids up
to the job's ``instances_up_to``): an instance indexed while the job ran is not in an object
built without it, and naming it would make the object built again with it look unchanged.
The result objects an object references (a KOS selecting overlays) count by the UIDs they have
now: a referenced object that became a new version makes the referencing one's inputs change.

The digest errs on the side of "changed": every instance read of a referenced instance's
series counts for a model that reads across slices, and any change of the settings or of any
model card or ONNX file counts for every object. "Changed" only means the contents are
compared. Pure apart from one ``stat`` of each model file (where no identity is given).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
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


def node_context(
    settings: Settings,
    cards: Iterable[ModelCard],
    identity: Callable[[ModelCard], str] = ModelCard.onnx_identity,
) -> str:
    """SHA-256 (hex) of what every result object of a results job depends on besides its
    images: the node's release, its settings but for where its storage lies (a folder moved
    to another disk changes no object), and every model card with its ONNX file's
    ``identity`` (a model replaced under the same card): that of the file the running session
    loaded (:meth:`Runtime.onnx_identity`), else the file's now."""
    configured = settings.model_dump(mode="json")
    configured.get("storage", {}).pop("path", None)
    parts: list[object] = [dicomnode.__version__, configured]
    for card in sorted(cards, key=lambda card: (card.model.name, card.model.version)):
        parts.append(card.model_dump_json())
        parts.append(identity(card))
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


def referenced_results(ds: Dataset, instances: Mapping[str, StudyInstance]) -> set[str]:
    """SOP Instance UIDs that ``ds`` references other than the study's instances read: the
    result objects it selects (a KOS), by the UIDs they have once the job's references are
    renamed to their current versions (:func:`dicomnode.results.versions.rename_references`)."""
    return {
        str(element.value)
        for element in ds.iterall()
        if element.keyword == "ReferencedSOPInstanceUID" and str(element.value) not in instances
    }


def inputs_digest(
    context: str,
    card: ModelCard,
    kind: str,
    uids: set[str],
    instances: Mapping[str, StudyInstance],
    results: Iterable[str] = (),
) -> str:
    """SHA-256 (hex) of what an object of ``kind`` by ``card`` was made from: the job's
    :func:`node_context`, the instances ``uids`` as stored and the result objects it references
    (``results``: :func:`referenced_results`). '' when it references none of the study's
    instances (nothing to decide by: its content is compared)."""
    if not uids:
        return ""
    parts: list[object] = [
        context,
        card.model.name,
        card.model.version,
        kind,
        *((uid, instances[uid].identity) for uid in sorted(uids)),
    ]
    # Only when there are any: the digests of objects that reference none stay as they were.
    referenced = sorted(set(results))
    if referenced:
        parts.append(["results", *referenced])
    return _sha256(parts)


def reads_across_slices(card: ModelCard) -> bool:
    """Whether an object of ``card`` depends on more than the images it references: 2.5D
    input, a segmentation of a stack, an ensemble (whose members may do either)."""
    return card.input.slices > 1 or card.model.task in ("segmentation", "ensemble")


def _sha256(parts: list[object]) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
