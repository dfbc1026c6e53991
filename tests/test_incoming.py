"""Receiving into incoming files: spares made ahead, limits, clean-up at start."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
