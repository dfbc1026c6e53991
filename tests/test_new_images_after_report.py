"""Images that arrive after a study was reported or while it is claimed (SQLite and PostgreSQL,
real ingest, the real analyse job over the pneumothorax model, the REST API on a real uvicorn
server, retention).

Acceptance (high): a late image with a pneumothorax in a reported study was analysed (tier
critical) but the study stayed 'reported': off the worklist, its new image never read, and
retention deleted it as reported and exported. Now the study goes back on the worklist unread,
flagged 'new images after report (n)', its priority follows the new analysis and is due from
the new image's arrival, the node's audit entry says how many came from whom, and retention
keeps it until it is reported again. A claimed study keeps its reader and is flagged.

Review (high): any instance reopened a reported study, not only images: the radiologist's
report SR sent back by the PACS, a dose SR, another vendor's KOS or SEG put it back on the
worklist flagged 'new images after report (1)', to be read and reported again, and retention
never deleted it. Only images (pixel data of a picture's SOP Class) count now; the others are
stored and indexed, and leave the reading status and the flag as they are, also when a batch
holds both and when the start-up recovery indexes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import spool_and_index
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from web_server import add_users, serve

from dicomnode.config import Settings, WorklistSettings
from dicomnode.db.models import AuditEntry, Instance, Series, Study
from dicomnode.db.session import as_utc, utcnow
from dicomnode.ingest.arrival import Arrival, instance_facts
from dicomnode.ingest.assembly import queue_ready_studies
from dicomnode.ingest.index import add_rows
from dicomnode.ingest.recover import recover_spool
from dicomnode.ingest.spool import instance_path
from dicomnode.models.registry import load_card
from dicomnode.retention import expired_studies
from dicomnode.synth.cxr import make_cxr
from dicomnode.web.app import create_app
from dicomnode.worker import Worker
from dicomnode.worklist import audit
from dicomnode.worklist.policy import max_waits
from dicomnode.worklist.service import claim, complete, reading_order, release

REPO = Path(__file__).resolve().parent.parent
PNEUMOTHORAX = REPO / "models" / "cxr_pneumothorax_demo.toml"


@dataclass
class Node:
    worker: Worker
    sessions: sessionmaker[Session]
    url: str
    tokens: dict[str, str]

    @property
    def storage(self) -> Path:
        return self.worker.settings.storage_path

    def api(self, user: str = "dr_house") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def analyse(self, study_id: int) -> None:
        with self.sessions() as session:
            assert queue_ready_studies(session, utcnow()) == [study_id]
        while self.worker.run_once():
            pass

    def study(self, study_id: int) -> Study:
        with self.sessions() as session:
            return session.get(Study, study_id)


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"threads": 1})
    worker = Worker(settings, sessions, [load_card(PNEUMOTHORAX)])
    tokens = add_users(sessions)
    with serve(create_app(sessions)) as url:
        yield Node(worker, sessions, url, tokens)


def _normal_study(node: Node) -> tuple[int, str]:
    """A normal radiograph, indexed and analysed: routine, ready."""
    with node.sessions() as session:
        ds, _ = make_cxr(951_001, pneumothorax=False)
        study_id, _ = spool_and_index(session, node.storage, ds)
    node.analyse(study_id)
    study = node.study(study_id)
    assert (study.analysis_status, study.tier, study.reading_status) == (
        "analysed",
        "routine",
        "ready",
    )
    return study_id, study.study_instance_uid


def _late_image(node: Node, study_id: int, seed: int, *, pneumothorax: bool) -> str:
    """Another radiograph of the study (a new series) as the SCP indexes it; its UID."""
    with node.sessions() as session:
        first = session.scalars(select(Instance).join(Series).where(Series.study_id == study_id))
        source = pydicom.dcmread(first.first().path, stop_before_pixels=True)
        ds, _ = make_cxr(seed, pneumothorax=pneumothorax)
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
            setattr(ds, keyword, source.get(keyword, ""))
        spool_and_index(session, node.storage, ds)
    return str(ds.SOPInstanceUID)


def _api_row(node: Node, uid: str) -> dict | None:
    """The study's row on the open worklist of the API, or None when it is not there."""
    with node.api() as client:
        response = client.get("/api/worklist")
        response.raise_for_status()
        rows = [row for row in response.json()["rows"] if row["study_instance_uid"] == uid]
    return rows[0] if rows else None


def _node_entries(node: Node, uid: str) -> list[AuditEntry]:
    with node.sessions() as session:
        return audit.entries(session, actor=audit.NODE, study_instance_uid=uid)


def test_a_late_critical_image_puts_a_reported_study_back_on_the_worklist(node: Node) -> None:
    study_id, uid = _normal_study(node)
    with node.api() as client:
        client.post(f"/api/studies/{uid}/claim").raise_for_status()
        client.post(f"/api/studies/{uid}/complete").raise_for_status()
    assert _api_row(node, uid) is None
    later = utcnow() + timedelta(days=30)
    with node.sessions() as session:
        # Reported, no job open: retention would delete it once old enough.
        assert [s.id for s in expired_studies(session, later, days=1)] == [study_id]

    before_late = utcnow()
    _late_image(node, study_id, 951_002, pneumothorax=True)

    # At once, before its analysis: unread again, flagged, the node's audit entry.
    study = node.study(study_id)
    assert (study.reading_status, study.analysis_status) == ("waiting", "receiving")
    assert study.new_images == 1
    assert study.reported_by == "dr_house"  # the latest report, kept for the addendum
    [entry] = _node_entries(node, uid)
    assert entry.action == "new_images"
    assert as_utc(entry.at) >= before_late
    assert entry.detail == (
        "1 instance(s) received from MODALITY; new images after report (1); on the worklist"
    )
    with node.sessions() as session:
        assert expired_studies(session, later, days=1) == []

    node.analyse(study_id)

    study = node.study(study_id)
    assert (study.analysis_status, study.reading_status, study.tier) == (
        "analysed",
        "ready",
        "critical",
    )
    assert study.reason.startswith("AI critical: Pneumothorax")
    # Due from the new image's arrival, as a critical study that arrived then.
    assert as_utc(study.new_images_at) >= before_late
    assert as_utc(study.due_at) >= before_late + max_waits()["critical"] - timedelta(seconds=1)

    row = _api_row(node, uid)
    assert row is not None
    assert (row["status"], row["priority"], row["new_images"]) == ("ready", "critical", 1)
    assert row["new_images_text"] == "new images after report (1)"
    assert row["reason"].startswith("new images after report (1); AI critical: Pneumothorax")
    assert row["reported_by"] == "dr_house"
    with node.sessions() as session:
        # What `dicomnode worklist` prints: the flag leads the reason.
        [listed] = reading_order(session, site=WorklistSettings())
        assert listed.study_instance_uid == uid
        assert listed.reason.startswith("new images after report (1); AI critical: Pneumothorax")
        assert expired_studies(session, later, days=1) == []

    # Read again (the addendum) by another radiologist: reported, flag cleared.
    with node.api("dr_grey") as client:
        client.post(f"/api/studies/{uid}/claim").raise_for_status()
        answer = client.post(f"/api/studies/{uid}/complete")
        answer.raise_for_status()
    assert (answer.json()["status"], answer.json()["new_images"]) == ("reported", 0)
    assert answer.json()["reported_by"] == "dr_grey"
    assert _api_row(node, uid) is None
    with node.sessions() as session:
        [done] = audit.entries(session, action="complete", actor="dr_grey")
        assert done.detail == "new images after report (1)"
        assert [s.id for s in expired_studies(session, later, days=1)] == [study_id]


def test_a_claimed_study_keeps_its_reader_and_is_flagged(node: Node) -> None:
    study_id, uid = _normal_study(node)
    with node.sessions() as session:
        claim(session, uid, "dr_house", utcnow())
    _late_image(node, study_id, 951_003, pneumothorax=False)
    _late_image(node, study_id, 951_004, pneumothorax=False)

    study = node.study(study_id)
    assert (study.reading_status, study.claimed_by, study.new_images) == (
        "in_progress",
        "dr_house",
        2,
    )
    row = _api_row(node, uid)
    assert row is not None
    assert row["new_images_text"] == "new images while claimed (2)"
    assert [e.detail for e in _node_entries(node, uid)] == [
        "1 instance(s) received from MODALITY; new images while claimed (2); "
        "in progress with dr_house",
        "1 instance(s) received from MODALITY; new images while claimed (1); "
        "in progress with dr_house",
    ]

    node.analyse(study_id)
    study = node.study(study_id)
    assert (study.reading_status, study.claimed_by, study.new_images) == (
        "in_progress",
        "dr_house",
        2,
    )
    # Released before any report: the whole study is unread, no flag to keep.
    with node.sessions() as session:
        release(session, uid, "dr_house", utcnow())
    row = _api_row(node, uid)
    assert (row["status"], row["new_images"], row["new_images_text"]) == ("ready", 0, "")


def test_a_released_claim_after_a_report_keeps_the_flag(node: Node) -> None:
    study_id, uid = _normal_study(node)
    with node.sessions() as session:
        claim(session, uid, "dr_house", utcnow())
        complete(session, uid, "dr_house", utcnow())
    _late_image(node, study_id, 951_005, pneumothorax=False)
    with node.sessions() as session:
        claim(session, uid, "dr_grey", utcnow())
    _late_image(node, study_id, 951_006, pneumothorax=False)
    with node.sessions() as session:
        release(session, uid, "dr_grey", utcnow())
        assert expired_studies(session, utcnow() + timedelta(days=30), days=1) == []
    row = _api_row(node, uid)
    assert (row["status"], row["new_images_text"]) == ("waiting", "new images after report (2)")


REPORT_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: the radiologist's report
KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document
SEG = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage (it has Pixel Data)


def _not_an_image(node: Node, study_id: int, sop_class_uid: str) -> Dataset:
    """Another vendor's object of the study (not the node's own result), in a series of its
    own; a SEG has pixel data."""
    with node.sessions() as session:
        first = session.scalars(select(Instance).join(Series).where(Series.study_id == study_id))
        source = pydicom.dcmread(first.first().path, stop_before_pixels=True)
    ds = Dataset()
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SEG" if sop_class_uid == SEG else ("KO" if sop_class_uid == KOS else "SR")
    ds.Manufacturer = "Other Vendor"
    ds.InstanceNumber = 1
    if sop_class_uid == SEG:
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 8, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(8)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _spool(node: Node, ds: Dataset) -> Arrival:
    """``ds`` written into the spool as the SCP writes it; its arrival (not indexed)."""
    facts = instance_facts(pydicom.dcmread(_write(node, ds), defer_size=1024))
    path = instance_path(
        node.storage, facts.study_instance_uid, facts.series_instance_uid, facts.sop_instance_uid
    )
    return Arrival(facts, str(path), path.stat().st_size, ExplicitVRLittleEndian, "PACS", utcnow())


def _write(node: Node, ds: Dataset) -> Path:
    path = instance_path(node.storage, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _reported(node: Node) -> tuple[int, str]:
    study_id, uid = _normal_study(node)
    with node.sessions() as session:
        claim(session, uid, "dr_house", utcnow())
        complete(session, uid, "dr_house", utcnow())
    return study_id, uid


def _still_reported(node: Node, study_id: int, uid: str) -> None:
    study = node.study(study_id)
    assert (study.reading_status, study.new_images, study.new_images_at) == ("reported", 0, None)
    assert _node_entries(node, uid) == []
    assert _api_row(node, uid) is None
    with node.sessions() as session:
        # Retention deletes it once old enough, as any reported study.
        later = utcnow() + timedelta(days=30)
        assert [s.id for s in expired_studies(session, later, days=1)] == [study_id]


def test_a_report_sr_kos_or_seg_leaves_a_reported_study_reported(node: Node) -> None:
    study_id, uid = _reported(node)
    others = [_not_an_image(node, study_id, sop_class) for sop_class in (REPORT_SR, KOS, SEG)]
    with node.sessions() as session:
        for ds in others:
            spool_and_index(session, node.storage, ds)
    _still_reported(node, study_id, uid)
    with node.sessions() as session:
        classes = session.scalars(
            select(Instance.sop_class_uid).join(Series).where(Series.study_id == study_id)
        ).all()
    assert {REPORT_SR, KOS, SEG} <= set(classes)  # stored and indexed as before

    # The analysis they re-run changes nothing of it either.
    node.analyse(study_id)
    _still_reported(node, study_id, uid)

    # An image still reopens it, counted alone in a batch with a report SR.
    image, _ = make_cxr(951_011, pneumothorax=False)
    image.StudyInstanceUID = uid
    batch = [_spool(node, _not_an_image(node, study_id, REPORT_SR)), _spool(node, image)]
    with node.sessions() as session:
        add_rows(session, batch, 0, WorklistSettings())
        session.commit()
    study = node.study(study_id)
    assert (study.reading_status, study.new_images) == ("waiting", 1)
    [entry] = _node_entries(node, uid)
    assert entry.detail == (
        "1 instance(s) received from PACS; new images after report (1); on the worklist"
    )
    # A later SR adds nothing to the flag nor to the audit.
    kos = _not_an_image(node, study_id, KOS)
    with node.sessions() as session:
        spool_and_index(session, node.storage, kos)
    study = node.study(study_id)
    assert (study.reading_status, study.new_images) == ("waiting", 1)
    assert len(_node_entries(node, uid)) == 1


def test_a_report_sr_does_not_flag_a_claimed_study(node: Node) -> None:
    study_id, uid = _normal_study(node)
    sr = _not_an_image(node, study_id, REPORT_SR)
    with node.sessions() as session:
        claim(session, uid, "dr_house", utcnow())
        spool_and_index(session, node.storage, sr)
    study = node.study(study_id)
    assert (study.reading_status, study.claimed_by, study.new_images) == (
        "in_progress",
        "dr_house",
        0,
    )
    assert study.new_images_at is None
    assert _node_entries(node, uid) == []


def test_recovery_reopens_a_reported_study_for_an_image_only(node: Node) -> None:
    """Files acknowledged but not indexed before a crash, indexed at start-up."""
    study_id, uid = _reported(node)
    _write(node, _not_an_image(node, study_id, REPORT_SR))
    with node.sessions() as session:
        assert recover_spool(session, node.storage, 0, WorklistSettings()).indexed == 1
    _still_reported(node, study_id, uid)

    image, _ = make_cxr(951_012, pneumothorax=False)
    image.StudyInstanceUID = uid
    _write(node, image)
    with node.sessions() as session:
        assert recover_spool(session, node.storage, 0, WorklistSettings()).indexed == 1
    study = node.study(study_id)
    assert (study.reading_status, study.new_images) == ("waiting", 1)
