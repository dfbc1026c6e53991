"""Receiving into incoming files: spares made ahead, limits, clean-up at start."""

from __future__ import annotations

import ctypes
import errno
import os
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.ingest import incoming, spool
from dicomnode.ingest.encoding import FileMeta
from dicomnode.ingest.incoming import (
    SPARES,
    IncomingFile,
    Limits,
    clear_incoming,
    incoming_folder,
    read_received,
    write_file_meta,
    write_incoming,
)

LIMITS = Limits(max_instance_bytes=1 << 20, min_free_bytes=0)
DEFER = 64 * 1024


@contextmanager
def receives(folder: Path) -> Iterator[list[IncomingFile]]:
    """Incoming files made in the block (appended to the list) are discarded after it with
    the spares: nothing may be left in ``folder``."""
    made: list[IncomingFile] = []
    try:
        yield made
    finally:
        SPARES.remove()
        for received in made:
            received.discard()
    assert not list(folder.iterdir())


def receive(folder: Path, made: list[IncomingFile]) -> IncomingFile:
    made.append(IncomingFile(folder, LIMITS))
    return made[-1]


def spare_after_a_receive(folder: Path, made: list[IncomingFile]) -> str:
    first = receive(folder, made)
    SPARES.wait()
    spare = SPARES.ready(folder)
    assert spare is not None and spare != first.name
    assert Path(spare).stat().st_size == 0
    return spare


def test_a_receive_takes_the_spare_made_while_the_previous_one_arrived(tmp_path: Path) -> None:
    folder = tmp_path / ".incoming"
    with receives(folder) as made:
        spare = spare_after_a_receive(folder, made)
        second = receive(folder, made)
        assert second.name == spare
        second.write(b"data")
        second.close()
        assert Path(spare).read_bytes() == b"data"
        SPARES.wait()
        assert SPARES.ready(folder) not in (None, *(r.name for r in made))


def test_a_spare_removed_from_the_folder_is_not_used(tmp_path: Path) -> None:
    """An admin cleaned the incoming folder: the next receive makes its own file."""
    folder = tmp_path / ".incoming"
    with receives(folder) as made:
        spare = spare_after_a_receive(folder, made)
        Path(spare).unlink()
        second = receive(folder, made)
        assert second.name != spare
        second.write(b"x")
        second.close()
        assert second.path.read_bytes() == b"x"


def test_clear_incoming_counts_partial_receives_not_spares(tmp_path: Path) -> None:
    folder = incoming_folder(tmp_path)
    folder.mkdir()
    (folder / "rx-partial.part").write_bytes(b"half a data set")
    (folder / "rx-spare.part").write_bytes(b"")
    assert clear_incoming(tmp_path) == 1
    assert not list(folder.iterdir())


def test_write_back_is_started_every_2_mib_received_and_not_for_a_ct_slice(
    tmp_path: Path, monkeypatch
) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        incoming, "start_write_back", lambda fd, offset, length: started.append((offset, length))
    )
    folder = tmp_path / ".incoming"
    limits = Limits(max_instance_bytes=64 << 20, min_free_bytes=0)
    chunk = bytes(range(256)) * 512  # 128 KiB, as a PDU of dcmtk's brings
    with receives(folder) as made:
        made.append(IncomingFile(folder, limits))
        for _ in range(4):  # 0.5 MB
            made[-1].write(chunk)
        assert started == []
        made.append(IncomingFile(folder, limits))
        radiograph = made[-1]
        for _ in range(80):  # 10 MiB
            radiograph.write(chunk)
        radiograph.close()
        # Contiguous ranges from the start, each at least WRITE_BACK_BYTES, none past the end.
        assert len(started) == 5
        assert [offset for offset, _ in started] == [
            sum(length for _, length in started[:i]) for i in range(5)
        ]
        assert all(length >= incoming.WRITE_BACK_BYTES for _, length in started)
        assert sum(length for _, length in started) == 80 * len(chunk)
        assert radiograph.path.read_bytes() == chunk * 80


def test_start_write_back_is_the_kernel_call_on_linux(tmp_path: Path) -> None:
    assert spool._SYNC_FILE_RANGE is not None, "sync_file_range not found in libc"
    path = tmp_path / "data"
    path.write_bytes(b"x" * (4 << 20))
    fd = os.open(path, os.O_WRONLY)
    try:
        assert spool._SYNC_FILE_RANGE(fd, 0, 4 << 20, 2) == 0
        spool.start_write_back(fd, 0, 4 << 20)
    finally:
        os.close(fd)
    # No such descriptor: the kernel answers EBADF (a stand-in that returns 0 would not).
    assert spool._SYNC_FILE_RANGE(-1, 0, 1, 2) == -1
    assert ctypes.get_errno() == errno.EBADF


def test_removing_the_spares_waits_for_the_one_being_made(tmp_path: Path, monkeypatch) -> None:
    """A process that stops while its next spare is still being created leaves no file."""
    folder = tmp_path / ".incoming"
    first = IncomingFile(folder, LIMITS)
    SPARES.wait()  # a spare is ready
    create = incoming._create

    def slow_create(where: Path) -> tuple[int, str]:
        time.sleep(0.3)
        return create(where)

    monkeypatch.setattr(incoming, "_create", slow_create)
    second = IncomingFile(folder, LIMITS)  # takes the spare; the next one is being made
    for received in (first, second):
        received.discard()
    SPARES.remove()
    SPARES.wait()  # had remove not waited, the spare would be made by now, and left
    left = list(folder.iterdir())
    SPARES.remove()
    assert not left


def _received_as_pynetdicom_writes_it(
    folder: Path, made: list[IncomingFile], ds: Dataset, syntax: str
) -> IncomingFile:
    """Preamble, the File Meta Information (write_file_meta), then the data set as sent."""
    received = receive(folder, made)
    received.write(b"\0" * 128 + b"DICM")
    write_file_meta(received, FileMeta(ds.SOPClassUID, ds.SOPInstanceUID, syntax))
    uid = UID(syntax)
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = uid.is_little_endian, uid.is_implicit_VR
    write_dataset(encoded, ds)
    body = encoded.getvalue()
    if uid.is_deflated:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = deflater.compress(body) + deflater.flush()
    received.write(body)
    received.close()
    return received


def _header() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jörg"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation = 4, 4, 16, 0
    ds.ReferencedSOPSequence = [Dataset()]
    ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    # Over the defer size: left on disk, read from the file when asked.
    ds.add_new(0x00091010, "OB", bytes(range(256)) * 512)
    ds.PixelData = bytes(32)
    return ds


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_a_received_data_set_is_read_from_where_it_starts_as_dcmread_reads_it(
    tmp_path: Path, syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with receives(tmp_path) as made:
        received = _received_as_pynetdicom_writes_it(tmp_path, made, _header(), syntax)
        assert received.dataset_offset is not None and received.dataset_offset > 132
        expected = pydicom.dcmread(received.path, defer_size=DEFER)
        # The file meta is not parsed again: dcmread is not called.
        monkeypatch.setattr(pydicom, "dcmread", _not_called)
        read = read_received(received, syntax, DEFER)
        assert read.get_item(0x00091010, keep_deferred=True).value is None  # deferred
        assert read[0x00091010].value == bytes(range(256)) * 512
        assert read == expected
        assert read.PatientName == "Müller^Jörg"
        assert read.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.4"


def test_a_data_set_read_otherwise_goes_to_dcmread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    read_dataset = incoming.read_dataset

    def counted(*args, **kwargs):
        reads.append(1)
        return read_dataset(*args, **kwargs)

    monkeypatch.setattr(incoming, "read_dataset", counted)
    with receives(tmp_path) as made:
        deflated = _received_as_pynetdicom_writes_it(
            tmp_path, made, _header(), DeflatedExplicitVRLittleEndian
        )
        plain = _received_as_pynetdicom_writes_it(tmp_path, made, _header(), ExplicitVRLittleEndian)
        # Deflated: inflated in memory by dcmread, not read from the file's offsets.
        read = read_received(deflated, DeflatedExplicitVRLittleEndian, None)
        assert read.PatientName == "Müller^Jörg" and not reads
        # Received into memory and spilled: where its data set starts is not known.
        spilled = write_incoming(tmp_path, LIMITS, b"\0" * 128 + plain.path.read_bytes()[128:])
        made.append(spilled)
        assert spilled.dataset_offset is None
        assert read_received(spilled, ExplicitVRLittleEndian, DEFER).Rows == 4 and not reads
        # A data set that the read from its start fails on is read by dcmread (and fails
        # as dcmread fails, if it does).
        monkeypatch.setattr(incoming, "read_dataset", _not_called)
        read = read_received(plain, ExplicitVRLittleEndian, DEFER)
        assert read == pydicom.dcmread(plain.path, defer_size=DEFER)
        assert read.PatientName == "Müller^Jörg"


def _not_called(*_args, **_kwargs):
    raise AssertionError("must not be called here")
