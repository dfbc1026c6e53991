"""Durable spool: atomic writes, UID-checked paths, errors as SpoolError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomnode.ingest.spool import (
    SpoolError,
    free_bytes,
    instance_path,
    move_durable,
    valid_uid,
    write_durable,
)

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.3.4.5"


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_write_durable_creates_folders_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = instance_path(tmp_path / "storage", STUDY, SERIES, SOP)
    payload = os.urandom(70_000)
    write_durable(path, payload)
    assert path == tmp_path / "storage" / STUDY / SERIES / f"{SOP}.dcm"
    assert path.read_bytes() == payload
    assert everything_under(tmp_path / "storage") == [
        STUDY,
        f"{STUDY}/{SERIES}",
        f"{STUDY}/{SERIES}/{SOP}.dcm",
    ]


def test_write_durable_replaces_existing_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.dcm"
    write_durable(path, b"first version, longer than the second")
    write_durable(path, memoryview(b"second"))
    assert path.read_bytes() == b"second"
    assert everything_under(tmp_path / "a") == ["x.dcm"]


@pytest.mark.parametrize(
    ("study", "series", "sop"),
    [
        (STUDY, SERIES, "../../etc"),
        (STUDY, SERIES, "1.2.x"),
        ("../..", SERIES, SOP),
        (STUDY, "1.2/3", SOP),
        (STUDY, SERIES, ""),
        (STUDY, SERIES, "1." + "2" * 63),
        (STUDY, SERIES, ".1.2"),
        (STUDY, SERIES, "1.2."),
        (STUDY, SERIES, "/etc/passwd"),
    ],
)
def test_instance_path_rejects_non_uids(tmp_path: Path, study: str, series: str, sop: str) -> None:
    with pytest.raises(SpoolError, match="not a valid DICOM UID"):
        instance_path(tmp_path, study, series, sop)


def test_valid_uid_accepts_64_characters() -> None:
    assert valid_uid("1." + "2" * 62)
    assert not valid_uid("1." + "2" * 63)


def test_write_into_unwritable_parent_raises_spool_error(tmp_path: Path) -> None:
    # A regular file where a folder should be fails even for root, unlike chmod.
    blocker = tmp_path / "storage"
    blocker.write_bytes(b"not a folder")
    for target in (blocker / "x.dcm", blocker / STUDY / SERIES / "x.dcm"):
        with pytest.raises(SpoolError, match=r"cannot store x\.dcm"):
            write_durable(target, b"data")
    assert everything_under(tmp_path) == ["storage"]
    assert blocker.read_bytes() == b"not a folder"


def test_move_durable_moves_into_new_folders(tmp_path: Path) -> None:
    source = tmp_path / "incoming.part"
    source.write_bytes(b"streamed")
    target = tmp_path / "storage" / STUDY / "x.dcm"
    move_durable(source, target)
    assert target.read_bytes() == b"streamed"
    assert not source.exists()


def test_move_durable_of_missing_source_raises_spool_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        move_durable(tmp_path / "gone.part", tmp_path / "storage" / "x.dcm")


def test_free_bytes_of_a_folder_not_yet_created(tmp_path: Path) -> None:
    free = free_bytes(tmp_path / "not" / "yet")
    assert free > 0
    # Same file system as tmp_path (other processes may write in between).
    assert abs(free - free_bytes(tmp_path)) < 256 * 1024 * 1024
