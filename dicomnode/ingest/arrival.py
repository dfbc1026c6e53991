"""What the database keeps of a received instance, read from its header: pure data, no I/O.

A listener builds an :class:`Arrival` for each stored instance and hands it to the index
writer (:mod:`dicomnode.ingest.indexer`), in another process under ``dicomnode serve``;
so this module imports nothing of the database layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset

from dicomnode import made_by_this_node
from dicomnode.imageclasses import is_image


@dataclass(frozen=True)
class InstanceFacts:
    """What the database keeps of a received instance's header."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    modality: str = ""
    study_description: str = ""
    body_part: str = ""
    view_position: str = ""
    series_description: str = ""
    instance_number: int | None = None
    # Made by this node (Manufacturer "dicomnode"): a result object a PACS routed back. It is
    # stored and indexed like any instance but starts no new analysis of its study.
    own_result: bool = False
    # An image (:mod:`dicomnode.imageclasses`: Pixel Data in a SOP Class that is a picture):
    # only images are new images after a report. A report SR, dose SR, KOS, presentation state,
    # SEG, RT object or PDF is stored and indexed like any instance, but reopens no study.
    image: bool = True


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    value = ds.get(keyword, "")
    return str(value if value is not None else "")[:limit]


def instance_facts(ds: Dataset) -> InstanceFacts:
    """Read the identifying attributes; ValueError names the first one that is missing.

    ``ds`` must have been read with its Pixel Data (deferred is fine, not
    ``stop_before_pixels``): whether it is there says whether the instance is an image."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(keyword):
            raise ValueError(f"{keyword} is missing")
    number = ds.get("InstanceNumber")
    try:
        instance_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        instance_number = None
    return InstanceFacts(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName", 324),
        accession_number=_text(ds, "AccessionNumber", 16),
        modality=_text(ds, "Modality", 16),
        study_description=_text(ds, "StudyDescription"),
        body_part=_text(ds, "BodyPartExamined", 16).upper(),
        view_position=_text(ds, "ViewPosition", 16).upper(),
        series_description=_text(ds, "SeriesDescription"),
        instance_number=instance_number,
        own_result=made_by_this_node(ds.get("Manufacturer")),
        image=is_image(str(ds.SOPClassUID), "PixelData" in ds),
    )


@dataclass(frozen=True)
class Arrival:
    """A stored instance: its header facts and its file, as its rows record them."""

    facts: InstanceFacts
    path: str
    size_bytes: int
    transfer_syntax_uid: str
    calling_ae: str
    received_at: datetime

    def to_json(self) -> dict:
        # Not dataclasses.asdict, which deep-copies every value (30 us an instance).
        return {
            "facts": dict(vars(self.facts)),
            "path": self.path,
            "size_bytes": self.size_bytes,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "calling_ae": self.calling_ae,
            "received_at": self.received_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict) -> Arrival:
        return cls(
            facts=InstanceFacts(**data["facts"]),
            path=data["path"],
            size_bytes=data["size_bytes"],
            transfer_syntax_uid=data["transfer_syntax_uid"],
            calling_ae=data["calling_ae"],
            received_at=datetime.fromisoformat(data["received_at"]),
        )

    def row(self, series_id: int) -> dict:
        """The instance row's values."""
        return {
            "series_id": series_id,
            "sop_instance_uid": self.facts.sop_instance_uid,
            "sop_class_uid": self.facts.sop_class_uid,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "instance_number": self.facts.instance_number,
            "path": self.path,
            "size_bytes": self.size_bytes,
            "calling_ae": self.calling_ae,
            "received_at": self.received_at,
        }
