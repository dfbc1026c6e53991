"""Bad input over a real socket: each malformed C-STORE gets the right refusal, is logged with
the calling AE and a reason, and the listener keeps serving.

Malformed bytes are sent as they are: with ``STORE_SEND_CHUNKED_DATASET`` pynetdicom sends a
file's dataset bytes without decoding them. Unknown SOP classes and transfer syntaxes never
reach the handler: pynetdicom rejects their presentation contexts at association time (the
DICOM way; a C-STORE needs an accepted context), so the sender gets no context to send on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from sqlalchemy.orm import Session, sessionmaker
from test_scp import Node, secondary_capture, start_node

SC = SecondaryCaptureImageStorage


def _raw_file(folder: Path, body: bytes, sop_uid: str, sop_class: str = SC) -> Path:
    """A Part 10 file whose dataset is ``body`` byte for byte."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path = folder / f"{sop_uid}.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + body)
    return path


def _body(ds: Dataset) -> bytes:
    return encode(ds, False, True)


def _send_raw(node: Node, path: Path, calling_ae: str = "BADMOD") -> int | None:
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = node.associate(calling_ae)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return getattr(status, "Status", None)


def _still_serving(node: Node) -> None:
    ds = secondary_capture()
    assert node.store(ds) == 0x0000
    assert node.instances(str(ds.SOPInstanceUID)) == 1


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(tmp_path, sessions, {"max_instance_bytes": 64 * 1024})


def _truncated(ds: Dataset) -> bytes:
    return _body(ds)[: len(_body(ds)) // 2]


def _huge_length(ds: Dataset) -> bytes:
    # A private OB element that claims almost 4 GiB, followed by a few bytes.
    return _body(ds) + b"\x09\x00\x10\x10OB\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little") + b"xx"


def _bad_vr(ds: Dataset) -> bytes:
    body = _body(ds)
    at = body.index(b"\x10\x00\x10\x00PN")  # Patient's Name
    return body[: at + 4] + b"Q!" + body[at + 6 :]


def _bad_length(ds: Dataset) -> bytes:
    body = _body(ds)
    at = body.index(b"\x28\x00\x10\x00US\x02\x00")  # Rows, 2 bytes
    return body[: at + 6] + b"\x03\x00" + body[at + 8 :]


def _no_sop_instance(ds: Dataset) -> bytes:
    del ds.SOPInstanceUID
    return _body(ds)


def _pixels_short(ds: Dataset) -> bytes:
    ds.Rows = ds.Columns = 64  # 4,096 pixels declared, 64 bytes sent
    return _body(ds)


def _sop_class_differs(ds: Dataset) -> bytes:
    ds.SOPClassUID = CTImageStorage
    return _body(ds)


def _sop_instance_differs(ds: Dataset) -> bytes:
    # The request (from the file meta) names the original instance, the data set another:
    # stored, the file's meta and data set would disagree (PS3.10 7.1).
    ds.SOPInstanceUID = generate_uid()
    return _body(ds)


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [
        (_truncated, 0xC000),
        (_huge_length, 0xC000),
        (_bad_vr, 0xC000),
        (_bad_length, 0xC000),
        (_no_sop_instance, 0xC000),
        (_pixels_short, 0xC000),
        (_sop_class_differs, 0xA900),
        (_sop_instance_differs, 0xC000),
    ],
)
def test_malformed_instance_refused_and_listener_keeps_serving(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture, mangle, expected: int
) -> None:
    ds = secondary_capture()
    uid = str(ds.SOPInstanceUID)
    path = _raw_file(tmp_path, mangle(ds), uid)
    with caplog.at_level(logging.WARNING, logger="dicomnode.ingest"):
        assert _send_raw(node, path) == expected
    assert node.instances(uid) == 0
    assert not list(node.storage.rglob(f"*{uid}*"))
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals and "BADMOD" in refusals[0], refusals
    assert "Test^Patient" not in caplog.text and "PAT-SCP" not in caplog.text
    _still_serving(node)


def test_instance_over_max_instance_bytes_is_refused_out_of_resources(node: Node) -> None:
    ds = secondary_capture()
    ds.Rows = ds.Columns = 512
    ds.PixelData = np.zeros(512 * 512, dtype=np.uint8).tobytes()  # 256 KiB > 64 KiB
    assert node.store(ds) == 0xA700
    assert node.instances(str(ds.SOPInstanceUID)) == 0
    _still_serving(node)


def test_unknown_sop_class_and_transfer_syntax_are_not_accepted(node: Node) -> None:
    ae = AE(ae_title="BADMOD")
    ae.add_requested_context("1.2.826.0.1.3680043.8.498.999.1", ExplicitVRLittleEndian)
    ae.add_requested_context(SC, "1.2.826.0.1.3680043.8.498.999.2")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    try:
        # Both contexts rejected (abstract / transfer syntax not supported): nothing to send on.
        assert assoc.accepted_contexts == []
        assert {c.result for c in assoc.rejected_contexts} == {0x03, 0x04}
    finally:
        if assoc.is_established:
            assoc.release()
    _still_serving(node)


def test_abort_mid_transfer_leaves_no_partial_instance(node: Node) -> None:
    ds = secondary_capture()
    ds.Rows = ds.Columns = 240  # 57.6 KB in 4 KB PDUs: many P-DATA to abort between
    ds.PixelData = np.zeros(240 * 240, dtype=np.uint8).tobytes()
    ae = AE(ae_title="BADMOD")
    ae.maximum_pdu_size = 4096
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 2
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    node.scp.ae.maximum_pdu_size = 4096
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", max_pdu=4096)
    assert assoc.is_established
    sender = threading.Thread(target=assoc.send_c_store, args=(ds,), daemon=True)
    sender.start()
    # Abort once the sender has paused its reactor to send (mid transfer, most of the time).
    wait_for(
        lambda: (
            (assoc._is_paused and not assoc._reactor_checkpoint.is_set()) or not sender.is_alive()
        ),
        timeout=5,
        interval=0.001,
        what="the C-STORE to start",
    )
    assoc.abort()
    sender.join(timeout=5)  # the aborted sender waits out its DIMSE timeout (2 s)
    if sender.is_alive():
        # Aborted just before it saw its reactor pause, pynetdicom's send_c_store would
        # wait for that pause forever, in 0.1 ms sleeps: let it go.
        assoc._is_paused = True
        sender.join(timeout=5)
    assert not sender.is_alive(), "the aborted sender did not return"
    _still_serving(node)
    # Either the dataset was complete before the abort (stored whole, answer lost: the
    # sender retries and gets a duplicate success) or nothing of it is kept.
    uid = str(ds.SOPInstanceUID)
    files = list(node.storage.rglob(f"*{uid}*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    assert len(files) == node.instances(uid)
    for path in files:
        assert len(pydicom.dcmread(path).PixelData) == 240 * 240


def test_a_request_is_refused_where_data_set_request_and_context_disagree() -> None:
    """The three ways a C-STORE can name another thing than it carries, each refused."""
    from types import SimpleNamespace

    from dicomnode.ingest.scp import _request_mismatch

    ds = secondary_capture()
    facts = SimpleNamespace(sop_class_uid=SC, sop_instance_uid=str(ds.SOPInstanceUID))

    def event(request_class: str, context_class: str, instance: str) -> SimpleNamespace:
        return SimpleNamespace(
            request=SimpleNamespace(
                AffectedSOPClassUID=request_class, AffectedSOPInstanceUID=instance
            ),
            context=SimpleNamespace(abstract_syntax=context_class),
        )

    uid = str(ds.SOPInstanceUID)
    assert _request_mismatch(event(SC, SC, uid), facts) is None
    assert _request_mismatch(event(CTImageStorage, CTImageStorage, uid), facts)[0] == 0xA900
    assert _request_mismatch(event(SC, CTImageStorage, uid), facts) == (
        0xA900,
        "SOP Class differs from the presentation context's",
    )
    assert _request_mismatch(event(SC, SC, generate_uid()), facts)[0] == 0xC000
