"""Ingest at scale through ``dicomnode serve``: parallel listener processes, streaming of
large instances, and storage that never waits on inference (issue #8, items 2 and 3)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import RunningNode, dcmtk, start_node, stop_node, wait_for, write_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine, text

from dicomnode.synth.multiframe import write_multiframe_word_sc

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def ct_slice(study_uid: str, series_uid: str, number: int) -> Dataset:
    """A small CT slice (64 x 64, 16 bit) with file meta."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "SCALE"
    ds.PatientName = "Scale^Test"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.full((64, 64), number, dtype=np.int16).tobytes()
    return ds


def write_studies(folder: Path, studies: int, per_study: int) -> list[list[Path]]:
    """``studies`` folders of ``per_study`` CT slice files each."""
    made = []
    for index in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        files = []
        for number in range(1, per_study + 1):
            path = folder / f"s{index:02d}" / f"{number:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ct_slice(study_uid, series_uid, number).save_as(path, enforce_file_format=True)
            files.append(path)
        made.append(files)
    return made


def write_big(path: Path, megabytes: int) -> Path:
    """A Multi-frame Grayscale Word SC file of about ``megabytes`` MB, written in chunks."""
    side = 1024
    frames = megabytes * 1024 * 1024 // (side * side * 2)
    return write_multiframe_word_sc(path, side, frames, os.urandom(side * side * 2), "BIG")


def storescu(port: int, files: list[Path], calling_ae: str = "MODALITY") -> subprocess.Popen:
    return subprocess.Popen(
        [dcmtk("storescu"), "-aet", calling_ae, "-aec", "DICOMNODE", "127.0.0.1", str(port)]
        + [str(path) for path in files],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=DCMTK_ENV,
    )


def children(pid: int) -> dict[int, str]:
    """Direct child processes of ``pid`` and their command lines."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            command = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = command.replace(b"\0", b" ").decode()
    return found


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def instance_rows(db_url: str) -> list[tuple[str, str, int]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            query = text("SELECT sop_instance_uid, path, size_bytes FROM instances")
            return [tuple(row) for row in connection.execute(query)]
    finally:
        engine.dispose()


def _node(tmp_path: Path, db_url: str, *, listeners: int, workers: int, extra: str = ""):
    config, port, web_port = write_config(tmp_path, db_url, listeners=listeners)
    body = config.read_text()
    body = body.replace(
        f"port = {port}\n",
        # 32 senders at once from this one address: none may be refused.
        f"port = {port}\nmax_associations = 40\nmax_associations_per_address = 40\n",
        1,
    )
    body = body.replace("[worker]\ncount = 1\n", f"[worker]\ncount = {workers}\n")
    config.write_text(body + extra)
    return start_node(tmp_path, config, port, web_port)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'dicomnode.db'}"


def test_32_concurrent_associations_over_two_listeners(tmp_path: Path, db_url: str) -> None:
    """32 storescu at once: all succeed, both listener processes serve, every instance is
    stored exactly once with its row."""
    studies = write_studies(tmp_path / "send", 32, 3)
    node = _node(tmp_path, db_url, listeners=2, workers=0)
    try:
        listeners = [pid for pid, cmd in children(node.process.pid).items() if " listener " in cmd]
        assert len(listeners) == 2
        senders = [storescu(node.port, files, f"SENDER{i:02d}") for i, files in enumerate(studies)]
        for sender in senders:
            _, errors = sender.communicate(timeout=120)
            assert sender.returncode == 0, errors[-2000:]
        # Rows are committed before each release is answered: nothing to wait for.
        rows = instance_rows(db_url)
        sent = {str(sop_instance_uid(path)) for files in studies for path in files}
        assert len(rows) == len(sent) == 96
        assert {uid for uid, _, _ in rows} == sent
        for _, path, size in rows:
            assert Path(path).stat().st_size == size
        assert sum(1 for _ in node.storage.rglob("*.dcm")) == 96

        # Each association's log line names the listener process that served it.
        def released() -> list[str]:
            found = re.findall(r"association released: listener=(\d+)", node.log.read_text())
            return found if len(found) == 32 else []

        served_by = wait_for(released, timeout=20, what="32 association log lines")
        assert set(served_by) == {"0", "1"}, "one listener served every association"
    finally:
        stop_node(node)


def test_held_associations_are_spread_over_the_listeners(tmp_path: Path, sqlite_url: str) -> None:
    """Four associations opened one after another and held open: each new one is taken by
    the listener serving fewer, 2 + 2 (with a socket per listener, SO_REUSEPORT, the
    kernel's hash of the peer's port made that 2 + 2 in only 3 cases out of 8)."""
    node = _node(tmp_path, sqlite_url, listeners=2, workers=0)
    try:
        served_by = _release_all(node, [_hold(node.port) for _ in range(4)])
        assert sorted(Counter(served_by).values()) == [2, 2], served_by
    finally:
        stop_node(node)


def _hold(port: int):
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def _listener_pid(node, index: int) -> int | None:
    for pid, cmd in children(node.process.pid).items():
        if " listener " in cmd and f"--index {index} " in cmd + " ":
            return pid
    return None


def _released_by(node) -> list[str]:
    return re.findall(r"association released: listener=(\d+)", node.log.read_text())


def _release_all(node, held: list) -> list[str]:
    """Release the held associations (the node's first); which listener served each."""
    for assoc in held:
        assoc.release()
    return wait_for(
        lambda: found if len(found := _released_by(node)) == len(held) else [],
        timeout=20,
        what=f"{len(held)} association log lines",
    )


def test_a_killed_listener_is_replaced_and_its_connections_forgotten(
    tmp_path: Path, sqlite_url: str
) -> None:
    """SIGKILL a listener while it serves an association: the other one serves meanwhile,
    the supervisor starts a new one on the same socket, and the dead one's connection count
    is reset (kept, it would make the next four associations split 1 + 3)."""
    (study,) = write_studies(tmp_path / "send", 1, 2)
    node = _node(tmp_path, sqlite_url, listeners=2, workers=0)
    try:
        held = [_hold(node.port), _hold(node.port)]  # one on each listener
        killed = _listener_pid(node, 0)
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        sender = storescu(node.port, study)
        _, errors = sender.communicate(timeout=60)
        assert sender.returncode == 0, errors[-2000:]
        # /readyz says so until the replacement listens (a restart waits 2 s at least).
        wait_for(lambda: _readyz_dicom(node) != "ok", timeout=10, what="/readyz not ready")
        wait_for(
            lambda: (
                _listener_pid(node, 0) not in (None, killed)
                and node.log.read_text().count("listening for DICOM") == 3
            ),
            timeout=60,
            what="listener 0 started again",
        )
        wait_for(lambda: _readyz_dicom(node) == "ok", timeout=10, what="/readyz ready again")
        released = 0
        for assoc in held:
            if assoc.is_established:
                assoc.release()
                released += 1
        # The sender's association and the held ones released (each logged by its listener
        # after the release: counting any line at all raced the last of them).
        before = 1 + released
        wait_for(
            lambda: len(_released_by(node)) == before, timeout=20, what=f"{before} released lines"
        )
        again = [_hold(node.port) for _ in range(4)]
        for assoc in again:
            assoc.release()
        served_by = wait_for(
            lambda: _released_by(node)[before:] if len(_released_by(node)) == before + 4 else [],
            timeout=20,
            what="4 more association log lines",
        )
        assert sorted(Counter(served_by).values()) == [2, 2], served_by
    finally:
        stop_node(node)


def _readyz_dicom(node: RunningNode) -> str:
    """/readyz's check of the DICOM listeners."""
    answer = httpx.get(f"http://127.0.0.1:{node.web_port}/readyz", timeout=10)
    return answer.json()["checks"]["dicom"]


def test_a_taken_port_is_a_clear_error(tmp_path: Path, sqlite_url: str) -> None:
    config, port, _ = write_config(tmp_path, sqlite_url)
    with socket.create_server(("127.0.0.1", port)):
        done = subprocess.run(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert done.returncode == 1
    assert f"cannot listen for DICOM on 127.0.0.1:{port}" in done.stdout + done.stderr


def sop_instance_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_large_instance_is_streamed_to_disk(tmp_path: Path, sqlite_url: str) -> None:
    """A 192 MiB instance: the listener's peak RSS grows far less than the instance."""
    big = write_big(tmp_path / "big.dcm", 192)
    node = _node(tmp_path, sqlite_url, listeners=1, workers=0)
    try:
        (listener,) = [p for p, cmd in children(node.process.pid).items() if " listener " in cmd]
        before = status_kib(listener, "VmHWM")
        sender = storescu(node.port, [big])
        _, errors = sender.communicate(timeout=120)
        assert sender.returncode == 0, errors[-2000:]
        grown_mib = (status_kib(listener, "VmHWM") - before) / 1024
        ((uid, path, size),) = instance_rows(sqlite_url)
        # Stored as received: pixel data intact; the file meta is the receiver's own.
        assert size == Path(path).stat().st_size
        assert abs(size - big.stat().st_size) < 1024
        assert uid == sop_instance_uid(big)
        with open(path, "rb") as stored, open(big, "rb") as sent:
            stored.seek(-4096, os.SEEK_END)
            sent.seek(-4096, os.SEEK_END)
            assert stored.read() == sent.read()
        # Held in memory, the data set alone would add 192 MiB (pynetdicom's default).
        assert grown_mib < 48, f"listener peak RSS grew by {grown_mib:.0f} MiB"
    finally:
        stop_node(node)


def test_stores_do_not_wait_for_stopped_workers(tmp_path: Path, sqlite_url: str) -> None:
    """Workers frozen with SIGSTOP (a model that never returns): C-STOREs are still
    acknowledged at once and the studies are queued for analysis."""
    studies = write_studies(tmp_path / "send", 4, 5)
    node = _node(tmp_path, sqlite_url, listeners=2, workers=2)
    workers = [p for p, cmd in children(node.process.pid).items() if " worker " in cmd]
    listeners = [p for p, cmd in children(node.process.pid).items() if " listener " in cmd]
    assert len(workers) == 2 and len(listeners) == 2
    assert not set(workers) & set(listeners)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        senders = [storescu(node.port, files) for files in studies]
        for sender in senders:
            _, errors = sender.communicate(timeout=60)
            assert sender.returncode == 0, errors[-2000:]
        assert time.monotonic() - started < 15
        assert len(instance_rows(sqlite_url)) == 20
        engine = create_engine(sqlite_url)
        try:
            # Assembly runs in serve, not in a worker: the analyses are queued meanwhile.
            def queued() -> bool:
                with engine.connect() as connection:
                    return connection.execute(text("SELECT count(*) FROM jobs")).scalar_one() >= 4

            wait_for(queued, timeout=20, what="4 queued analyses")
            for pid in workers:
                assert status_state(pid) == "T", "worker was not stopped throughout"
        finally:
            engine.dispose()
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        stop_node(node)


def status_state(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return ""


def test_a_burst_of_associations_is_spread_over_the_listeners(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Four senders connecting at the same moment, four listeners: each listener serves one.
    A listener counts a connection when it accepts it; counted only once its association
    had started, two of the four often went to the listener that woke first."""
    node = _node(tmp_path, sqlite_url, listeners=4, workers=0)
    try:
        start = threading.Barrier(4)

        def hold():
            start.wait()
            return _hold(node.port)

        with ThreadPoolExecutor(max_workers=4) as pool:
            held = list(pool.map(lambda _: hold(), range(4)))
        served_by = _release_all(node, held)
        assert sorted(Counter(served_by).values()) == [1, 1, 1, 1], served_by
    finally:
        stop_node(node)
