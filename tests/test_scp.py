"""The Storage SCP in-process on a real socket, with pynetdicom as the sending modality."""

from __future__ import annotations

import contextlib
import copy
import logging
import subprocess
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dcmtk, free_port, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_dimse_recv_handler, standard_pdu_recv_handler
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db.models import Instance, Series, Study
from dicomnode.db.session import as_utc
from dicomnode.export.scu import keep_responses
from dicomnode.ingest.incoming import SPARES, incoming_folder
from dicomnode.ingest.scp import StorageSCP

PREFIX = "1.2.826.0.1.3680043.8.498."


def secondary_capture(
    study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None
) -> Dataset:
    """A small valid Secondary Capture image (8x8, 8 bit) with file meta."""
    sop_uid = sop_uid or generate_uid(PREFIX)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid(PREFIX)
    ds.SeriesInstanceUID = series_uid or generate_uid(PREFIX)
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PAT-SCP"
    ds.AccessionNumber = "ACC-SCP"
    ds.StudyDate = "20240501"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    return ds


class Node:
    def __init__(self, scp: StorageSCP, sessions: sessionmaker[Session], storage: Path):
        self.scp = scp
        self.sessions = sessions
        self.storage = storage
        self.port = scp.settings.node.port

    def associate(self, calling_ae: str = "MODALITY", called_ae: str = "DICOMNODE"):
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=called_ae)
        if assoc.is_established:
            keep_responses(assoc)  # as a modality that pynetdicom's reactor race does not hit
        return assoc

    def store(self, ds: Dataset, calling_ae: str = "MODALITY") -> int:
        assoc = self.associate(calling_ae)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        return status.Status

    def files(self) -> list[Path]:
        """Files under the storage folder, except the spare made ahead for the next receive."""
        SPARES.wait()
        spare = SPARES.ready(incoming_folder(self.storage))
        return [p for p in self.storage.rglob("*") if p.is_file() and str(p) != spare]

    def instances(self, sop_uid: str) -> int:
        self.scp.index.flush(10)
        with self.sessions() as session:
            return session.scalar(select(func.count()).where(Instance.sop_instance_uid == sop_uid))

    def ready_at(self, study_uid: str) -> datetime:
        self.scp.index.flush(10)
        with self.sessions() as session:
            return as_utc(
                session.scalars(
                    select(Study.ready_at).where(Study.study_instance_uid == study_uid)
                ).one()
            )


def start_node(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    node_settings: dict | None = None,
    **extra,
) -> Iterator[Node]:
    if "node" in extra:
        # It would replace the [node] table, the free port with it (11112: another node's).
        raise TypeError("start_node takes [node] settings as node_settings")
    storage = tmp_path / "node" / "storage"
    settings = Settings.model_validate(
        {
            "node": {
                "ae_title": "DICOMNODE",
                "host": "127.0.0.1",
                "port": free_port(),
                **(node_settings or {}),
            },
            "storage": {"path": str(storage)},
            "assembly": {"quiet_seconds": 60.0},
            **extra,
        }
    )
    scp = StorageSCP(settings, sessions)
    scp.start()
    try:
        yield Node(scp, sessions, storage)
    finally:
        scp.stop()


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(tmp_path, sessions)


def test_echo(node: Node) -> None:
    assoc = node.associate()
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_store_writes_file_and_row_once(node: Node) -> None:
    ds = secondary_capture()
    assert node.store(ds) == 0x0000

    path = node.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert path.is_file()
    received = pydicom.dcmread(path)
    assert received == ds
    assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert received.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert node.instances(ds.SOPInstanceUID) == 1
    with node.sessions() as session:
        row = session.scalars(select(Instance)).one()
        assert row.path == str(path)
        assert row.size_bytes == path.stat().st_size
        assert row.calling_ae == "MODALITY"
    first = path.read_bytes()

    # The same instance again: success, one row, the first copy kept.
    assert node.store(ds) == 0x0000
    assert node.instances(ds.SOPInstanceUID) == 1
    assert path.read_bytes() == first
    assert node.files() == [path]


def test_an_instance_sent_again_under_another_study_keeps_its_first_copy(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A study merged or corrected at the PACS comes again with the same SOP Instance UIDs
    under new Study and Series UIDs: answered success as any duplicate, the first copy kept,
    and the second removed with a warning (it lay in the spool unindexed, never analysed)."""
    ds = secondary_capture()
    assert node.store(ds) == 0x0000
    moved = copy.deepcopy(ds)
    moved.StudyInstanceUID, moved.SeriesInstanceUID = generate_uid(), generate_uid()
    with caplog.at_level(logging.WARNING, logger="dicomnode.ingest"):
        assert node.store(moved) == 0x0000
        assert node.instances(ds.SOPInstanceUID) == 1
    first = node.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert node.files() == [first]
    assert "received again under another study or series; the first copy is kept" in caplog.text
    with node.sessions() as session:
        assert session.scalars(select(Study.study_instance_uid)).all() == [ds.StudyInstanceUID]


def test_an_instance_whose_indexed_file_is_gone_is_indexed_as_it_comes_again(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, but the first copy's file is gone (lost): the copy sent again is indexed
    under the study and series it names, its old row gone, with a warning, instead of being
    removed too (the sender was told both were stored)."""
    ds = secondary_capture()
    assert node.store(ds) == 0x0000
    first = node.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    first.unlink()
    moved = copy.deepcopy(ds)
    moved.StudyInstanceUID, moved.SeriesInstanceUID = generate_uid(), generate_uid()
    with caplog.at_level(logging.WARNING, logger="dicomnode.ingest"):
        assert node.store(moved) == 0x0000
        assert node.instances(ds.SOPInstanceUID) == 1
    second = node.storage / moved.StudyInstanceUID / moved.SeriesInstanceUID / first.name
    assert node.files() == [second]
    with node.sessions() as session:
        row = session.scalars(select(Instance)).one()
        assert (row.path, row.size_bytes) == (str(second), second.stat().st_size)
        assert session.get(Series, row.series_id).series_instance_uid == moved.SeriesInstanceUID
    assert "its indexed file is gone, so it is indexed anew as it came" in caplog.text


def test_an_instance_indexed_under_another_storage_folder_is_indexed_here_when_sent_again(
    node: Node, tmp_path: Path
) -> None:
    """Its row still names a file under the folder the storage was copied from (a partial
    copy): sent again, it is indexed at its file here, and neither file is removed. Before,
    the copy here was taken for a second copy of the one indexed there and removed, and the
    row kept naming a folder the admin was about to remove."""
    ds = secondary_capture()
    assert node.store(ds) == 0x0000
    here = node.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    there = tmp_path / "old-disk" / here.relative_to(node.storage)
    there.parent.mkdir(parents=True)
    there.write_bytes(here.read_bytes())
    with node.sessions() as session:
        session.scalars(select(Instance)).one().path = str(there)
        session.commit()
    assert node.store(ds) == 0x0000
    wait_for(lambda: node.instances(ds.SOPInstanceUID) == 1, timeout=10)
    with node.sessions() as session:
        assert session.scalars(select(Instance.path)).all() == [str(here)]
    assert here.is_file() and there.is_file()


@pytest.mark.parametrize("field", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_path_traversal_uid_is_refused(
    node: Node, tmp_path: Path, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pynetdicom would refuse to send a non-conformant UID; a hostile sender would not.
    from pynetdicom import _config

    monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", False)
    ds = secondary_capture()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        setattr(ds, field, "../evil")
        if field == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = "../evil"
        status = node.store(ds)
    assert 0xC000 <= status <= 0xCFFF, hex(status)
    assert not [p for p in tmp_path.rglob("*") if "evil" in p.name]
    assert not node.files()
    with node.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_unknown_calling_ae_is_rejected(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    peers = {"peers": [{"ae_title": "CT01"}, {"ae_title": "DX01", "host": "192.0.2.21"}]}
    for node in start_node(tmp_path, sessions, **peers):
        stranger = node.associate("INTRUDER")
        assert stranger.is_rejected
        # A known title from an address other than its configured host is a stranger too.
        wrong_host = node.associate("DX01")
        assert wrong_host.is_rejected
        known = node.associate("CT01")
        assert known.is_established
        known.release()
        ds = secondary_capture()
        assert node.store(ds, calling_ae="CT01") == 0x0000
        assert node.instances(ds.SOPInstanceUID) == 1


def echoscu(port: int, called_ae: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", called_ae, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_wrong_called_ae_is_rejected_only_when_required(
    tmp_path: Path, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    for node in start_node(tmp_path, sessions, {"require_called_ae": True}):
        with caplog.at_level(logging.WARNING, logger="dicomnode"):
            wrong = echoscu(node.port, "OTHERNODE")
        assert wrong.returncode != 0
        assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
        assert "called 'OTHERNODE', not this node's 'DICOMNODE'" in caplog.text
        assert echoscu(node.port, "DICOMNODE").returncode == 0
        ds = secondary_capture()
        assert node.store(ds) == 0x0000
        # A reload that renames the node takes effect at the restart: until then the listener
        # still answers as, and admits calls to, the title it started with.
        renamed = node.scp.settings.model_copy(deep=True)
        renamed.node.ae_title = "RENAMED"
        node.scp.settings = renamed
        assert echoscu(node.port, "DICOMNODE").returncode == 0
        # A reload that lifts the requirement applies to the next association.
        relaxed = node.scp.settings.model_copy(deep=True)
        relaxed.node.require_called_ae = False
        node.scp.settings = relaxed
        assert echoscu(node.port, "OTHERNODE").returncode == 0


def test_any_called_ae_is_served_by_default(node: Node) -> None:
    assert echoscu(node.port, "ANYTHING").returncode == 0
    assoc = node.associate(called_ae="ANYTHING")
    assert assoc.is_established
    assoc.release()


def test_release_pushes_ready_at(node: Node) -> None:
    ds = secondary_capture()
    assoc = node.associate()
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    stored_deadline = node.ready_at(ds.StudyInstanceUID)
    assoc.release()
    pushed = wait_for(
        lambda: node.ready_at(ds.StudyInstanceUID) > stored_deadline,
        timeout=10,
        interval=0.05,
        what="ready_at to move after the association released",
    )
    assert pushed


def test_a_listener_without_sessions_needs_an_index_to_hand_rows_to() -> None:
    """Under serve a listener opens no database (its rows go to the supervisor); without an
    index it would have nowhere to write them, and says so at once."""
    with pytest.raises(ValueError, match="database sessions or an index"):
        StorageSCP(Settings(), None)


@pytest.mark.parametrize("debug", [False, True], ids=["info", "debug"])
def test_pynetdicom_describes_pdus_only_when_its_debug_lines_are_wanted(
    tmp_path: Path, sessions: sessionmaker[Session], debug: bool
) -> None:
    """pynetdicom's standard handlers build a description of every PDU and DIMSE message for
    its logger, which keeps them only at DEBUG: a listener binds them only then."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        with contextlib.contextmanager(start_node)(tmp_path, sessions) as node:
            assoc = node.associate()
            assert assoc.is_established
            try:
                (served,) = node.scp.ae.active_associations
                bound = {
                    handler
                    for event in (evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)
                    for handler, _args in served.get_handlers(event)
                }
                standard = {standard_pdu_recv_handler, standard_dimse_recv_handler}
                assert (standard <= bound) is debug, bound
                assert assoc.send_c_store(secondary_capture()).Status == 0x0000
            finally:
                assoc.release()
    finally:
        logger.setLevel(level)


def test_pynetdicom_uid_checks_are_remembered_with_the_same_answers() -> None:
    """The node remembers pynetdicom's UID checks (each association proposes the same few
    hundred UIDs); the answers stay pynetdicom's, a wrong UID is still refused."""
    from pydicom.uid import UID
    from pynetdicom import _config
    from pynetdicom._validators import validate_ui

    remembered = _config.VALIDATORS["UI"]
    for value in [SecondaryCaptureImageStorage, UID("1." + "2" * 70), UID("")]:
        assert remembered(value) == validate_ui(value)
    hits = remembered.cache_info().hits
    assert remembered(UID(str(SecondaryCaptureImageStorage))) == (True, "")
    assert remembered.cache_info().hits == hits + 1
