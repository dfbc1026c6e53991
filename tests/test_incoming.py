"""Receiving into incoming files: spares made ahead, limits, clean-up at start."""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomnode.ingest import incoming, spool
from dicomnode.ingest.incoming import (
    SPARES,
    IncomingFile,
    Limits,
    clear_incoming,
    incoming_folder,
)

LIMITS = Limits(max_instance_bytes=1 << 20, min_free_bytes=0)


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
