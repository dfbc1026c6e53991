"""The listener when its storage fails under it, and what its association counts say.

Storage that cannot take a file (a read-only mount, a file system out of inodes) is answered
0xA700 for every C-STORE while it lasts, over real associations into the node's real
listener, and the listener serves again by itself once the storage is writable; a listener
killed while it receives leaves no partial file once it is restarted; the association
counters (slots, metrics) keep their counts when threads and rejections come together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from conftest import dcmtk, stop_node, wait_for
from prometheus_client import REGISTRY
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy.orm import Session, sessionmaker
from test_ingest_scale import _listener_pid, _node
from test_scp import Node, secondary_capture, start_node

from dicomnode.ingest.incoming import SPARES, incoming_folder
from dicomnode.ingest.reactor import WakingDUL
from dicomnode.ingest.slots import AssociationSlots, create_slots

STATUS_OUT_OF_RESOURCES = 0xA700
# More associations than [node] max_associations (16): a leaked slot each refused them all.
ASSOCIATIONS = 20


def _mount(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *arguments], capture_output=True, text=True)


def _unmount_all(path: Path) -> None:
    while subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0:
        subprocess.run(["umount", str(path)], check=True)


def _tmpfs_node(tmp_path: Path, sessions: sessionmaker[Session], options: str) -> Iterator[Node]:
    """The node's real listener in-process, its storage a tmpfs of its own."""
    storage = tmp_path / "node" / "storage"
    storage.mkdir(parents=True)
    mounted = _mount("-t", "tmpfs", "-o", options, "tmpfs", str(storage))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        for node in start_node(tmp_path, sessions):
            node.scp.settings.storage.min_free_bytes = 0  # a small tmpfs has room enough
            yield node
    finally:
        _unmount_all(storage)


@pytest.fixture
def tmpfs_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from _tmpfs_node(tmp_path, sessions, "size=16m")


@pytest.fixture
def few_inodes_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from _tmpfs_node(tmp_path, sessions, "size=16m,nr_inodes=64")


def _left_behind(node: Node) -> list[Path]:
    """Files under storage except the stored instances and the spare made ahead."""
    return [path for path in node.files() if path.suffix != ".dcm"]


def _served_after_recovery(node: Node) -> None:
    """One C-STORE succeeds, nothing but it is left, no association is still counted."""
    ds = secondary_capture()
    assert node.store(ds) == 0x0000
    assert node.instances(str(ds.SOPInstanceUID)) == 1
    assert f"{ds.SOPInstanceUID}.dcm" in [path.name for path in node.files()]
    assert not _left_behind(node)
    wait_for(
        lambda: not any(a.is_acceptor for a in node.scp.ae.active_associations),
        timeout=10,
        interval=0.01,
        what="the associations to end",
    )
    assert not node.scp._associations


def test_read_only_storage_is_answered_out_of_resources_and_the_listener_recovers(
    tmpfs_node: Node,
) -> None:
    """Creating the incoming file raised EROFS inside pynetdicom's decoding: the association
    ended unanswered, its thread gone, and after 16 of them every new one was refused until
    the restart; removing a refused file raised too, and turned 0xA700 into 0xC000."""
    node = tmpfs_node
    assert node.store(secondary_capture()) == 0x0000  # the incoming folder and a spare exist
    storage = str(node.storage)
    assert _mount("--bind", storage, storage).returncode == 0
    remounted = _mount("-o", "remount,bind,ro", storage)
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount read-only: {remounted.stderr.strip()}")
    try:
        for _ in range(ASSOCIATIONS):
            assert node.store(secondary_capture()) == STATUS_OUT_OF_RESOURCES
        # And an association goes on after its refused C-STOREs.
        assoc = node.associate()
        try:
            statuses = [assoc.send_c_store(secondary_capture()).Status for _ in range(3)]
            assert statuses == [STATUS_OUT_OF_RESOURCES] * 3
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        subprocess.run(["umount", storage], check=True)
    _served_after_recovery(node)


def test_dcmtk_sees_out_of_resources_while_storage_is_read_only(
    tmpfs_node: Node, tmp_path: Path
) -> None:
    files = []
    for index in range(3):
        path = tmp_path / f"{index}.dcm"
        secondary_capture().save_as(path, enforce_file_format=True)
        files.append(str(path))
    storage = str(tmpfs_node.storage)
    assert _mount("--bind", storage, storage).returncode == 0
    if _mount("-o", "remount,bind,ro", storage).returncode != 0:
        pytest.skip("cannot remount read-only")
    try:
        sent = subprocess.run(
            [
                dcmtk("storescu"),
                "-v",
                "--no-halt",
                "-aec",
                "DICOMNODE",
                "127.0.0.1",
                str(tmpfs_node.port),
                *files,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    finally:
        subprocess.run(["umount", storage], check=True)
    said = (sent.stdout + sent.stderr).lower()
    # Each file answered Refused: Out of Resources, in one association released normally.
    assert said.count("received store response (refused: outofresources)") == 3, said
    assert "abort" not in said, said
    _served_after_recovery(tmpfs_node)


def test_storage_out_of_inodes_is_answered_out_of_resources_and_the_listener_recovers(
    few_inodes_node: Node,
) -> None:
    node = few_inodes_node
    assert node.store(secondary_capture()) == 0x0000
    SPARES.wait()
    fillers = node.storage / "fillers"
    fillers.mkdir()
    with contextlib.suppress(OSError):
        for index in range(1000):
            (fillers / str(index)).touch()
    # The spare made ahead is used by the first C-STORE; no file can be made after it.
    for _ in range(ASSOCIATIONS):
        assert node.store(secondary_capture()) == STATUS_OUT_OF_RESOURCES
    for path in fillers.iterdir():
        path.unlink()
    fillers.rmdir()
    _served_after_recovery(node)


# A listener killed while it receives ---------------------------------------------------


def _partial_store(port: int) -> object:
    """An association that sent a third of a 1 MiB C-STORE's data set, then waits."""
    ds = secondary_capture()
    ds.Rows = ds.Columns = 1024
    ds.PixelData = os.urandom(1024 * 1024)
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 0
    request.DataSet = BytesIO(encoded.getvalue())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16384))
    for fragment in fragments[: len(fragments) // 3]:
        assoc.dul.send_pdu(fragment)
    return assoc


_PART = re.compile(r"rx-(\d+)-\w+\.part")


def _receiving(incoming: Path) -> dict[int, Path]:
    """The non-empty incoming files by the index of the listener receiving into them."""
    found = {}
    for path in incoming.glob("rx-*.part"):
        match = _PART.fullmatch(path.name)
        with contextlib.suppress(OSError):
            if match and path.stat().st_size > 0:
                found[int(match.group(1))] = path
    return found


def test_a_killed_listeners_partial_file_is_removed_when_it_is_restarted(
    tmp_path: Path,
) -> None:
    """SIGKILL a listener in the middle of a data set: the supervisor restarts it, and its
    partial file (up to max_instance_bytes) is gone; the other listener's, which it still
    receives into, is not touched."""
    node = _node(tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}", listeners=2, workers=0)
    incoming = incoming_folder(node.storage)
    try:
        senders = [_partial_store(node.port), _partial_store(node.port)]
        # One on each listener (the least busy one accepts).
        receiving = wait_for(
            lambda: found if len(found := _receiving(incoming)) == 2 else None,
            timeout=20,
            interval=0.05,
            what="a partial file in each listener",
        )
        killed = _listener_pid(node, 0)
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_for(
            lambda: (
                _listener_pid(node, 0) not in (None, killed)
                and node.log.read_text().count("listening for DICOM") == 3
            ),
            timeout=60,
            what="listener 0 started again",
        )
        assert not receiving[0].exists()
        assert receiving[1].exists() and receiving[1].stat().st_size > 0
        # Its partial file (and the spare it had made ahead).
        assert re.search(r"listener 0 removed [12] incoming file", node.log.read_text())
        for assoc in senders:
            assoc.abort()
        # The living listener removes its partial file at the abort.
        wait_for(lambda: not _receiving(incoming), timeout=20, what="the aborted file removed")
    finally:
        stop_node(node)


# Counters ------------------------------------------------------------------------------


def test_threads_of_one_listener_keep_the_association_count(tmp_path: Path) -> None:
    """flock does not keep apart the threads of the process holding the descriptor: 8
    threads x 300 add() kept 1251 of 2400, and concurrent acquires passed the limit."""
    path = tmp_path / "associations.slots"
    create_slots(path, 2)
    slots = AssociationSlots(path, 1)

    def run(action, times: int) -> None:
        for _ in range(times):
            action()

    def together(action, times: int) -> None:
        threads = [threading.Thread(target=run, args=(action, times)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    together(slots.add, 300)
    assert slots.counters() == [0, 2400]
    together(slots.release, 300)
    assert slots.counters() == [0, 0]
    taken: list[bool] = []
    together(lambda: taken.append(slots.acquire(100)), 50)
    assert taken.count(True) == 100 and slots.total() == 100
    slots.close()


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


REASONS = ("unknown_peer", "called_ae", "association_limit", "address_limit")


def _counts() -> dict[str, float]:
    counts = {r: _metric("dicomnode_refusals_total", reason=r) for r in REASONS}
    counts["rejected"] = _metric("dicomnode_associations_total", outcome="rejected")
    return counts


def _added(before: dict[str, float]) -> dict[str, float]:
    return {key: value - before[key] for key, value in _counts().items() if value != before[key]}


def _echo(port: int, calling_ae: str = "MODALITY", called_ae: str = "DICOMNODE") -> int:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    ).returncode


@pytest.fixture
def strict_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(
        tmp_path,
        sessions,
        {"require_called_ae": True, "max_associations": 1, "max_associations_per_address": 0},
        peers=[{"ae_title": "MODALITY"}, {"ae_title": "HOLDER"}],
    )


def test_each_rejection_is_counted_once_under_its_own_reason(strict_node: Node) -> None:
    """A wrong called AE title was counted as an unknown peer, and rejections for a limit
    were missing from the rejected associations."""
    port = strict_node.port
    before = _counts()
    assert _echo(port, called_ae="WRONG") != 0
    assert _added(before) == {"called_ae": 1, "rejected": 1}

    before = _counts()
    assert _echo(port, calling_ae="STRANGER") != 0
    assert _added(before) == {"unknown_peer": 1, "rejected": 1}

    # A rejected association's thread may still be ending (its count given back as it ends):
    # with max_associations 1 the holder waits for that, as a sender retrying would.
    wait_for(
        lambda: not strict_node.scp._associations and not strict_node.scp.ae.active_associations,
        timeout=10,
        what="the rejected associations ended",
    )
    held = strict_node.associate("HOLDER")
    try:
        assert held.is_established
        before = _counts()
        assert _echo(port) != 0  # over [node] max_associations (1)
        # pynetdicom's own limit: counted by EVT_REJECTED, which comes after the A-ASSOCIATE-RJ
        # has gone out (the sender may be told before both counts are in).
        expected = {"association_limit": 1, "rejected": 1}
        wait_for(lambda: _added(before) == expected, 5, 0.01, "the rejection counted")
        assert _added(before) == expected
        strict_node.scp.settings.node.max_associations_per_address = 1
        before = _counts()
        assert _echo(port) != 0  # the address holds its one already
        assert _added(before) == {"address_limit": 1, "rejected": 1}
    finally:
        held.release()
    wait_for(lambda: not strict_node.scp._associations, timeout=10, what="no association record")


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(tmp_path, sessions)


def test_an_association_ended_by_a_fault_in_pynetdicom_is_logged_and_forgotten(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in the DUL thread ends the association without EVT_RELEASED or
    EVT_ABORTED: its record was kept for the process's life, with no log line or metric."""
    original = WakingDUL._is_transport_event
    failing = {"now": False}

    def breaks(self: WakingDUL) -> bool:
        if failing["now"] and self.assoc.is_established:
            raise RuntimeError("a fault in the DUL thread")
        return original(self)

    monkeypatch.setattr(WakingDUL, "_is_transport_event", breaks)
    monkeypatch.setattr(logging.getLogger("pynetdicom.dul"), "disabled", True)
    aborted = _metric("dicomnode_associations_total", outcome="aborted")
    assoc = node.associate()
    assert assoc.is_established
    failing["now"] = True
    wait_for(lambda: assoc.is_aborted, timeout=10, interval=0.05, what="the abort")
    failing["now"] = False
    wait_for(lambda: not node.scp._associations, timeout=10, what="the record dropped")
    assert "association ended without release or abort" in caplog.text
    assert _metric("dicomnode_associations_total", outcome="aborted") == aborted + 1
    _served_after_recovery(node)
