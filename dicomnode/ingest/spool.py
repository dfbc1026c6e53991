"""Durable file storage: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.

An instance is acknowledged only after its bytes, its file name and its folder entry are
on stable storage: write to a temporary file, fsync, rename, fsync the folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import threading
from pathlib import Path

from dicomnode.folders import make_folders

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolError(Exception):
    """The instance could not be made durable (disk full, permissions, bad UID)."""


def valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (also keeps file names inside the spool)."""
    return 0 < len(uid) <= 64 and bool(_UID.match(uid))


def instance_path(root: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Where an instance lives; raises SpoolError for UIDs that are not valid DICOM UIDs."""
    for name, uid in (
        ("Study", study_uid),
        ("Series", series_uid),
        ("SOP Instance", sop_instance_uid),
    ):
        if not valid_uid(uid):
            raise SpoolError(f"{name} UID {uid!r} is not a valid DICOM UID")
    return root / study_uid / series_uid / f"{sop_instance_uid}.dcm"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durable(folder: Path) -> None:
    # New folder entries must survive a crash too: sync each new folder's parent (also one
    # another thread made meanwhile: it may not have synced it yet).
    for created in make_folders(folder):
        _fsync_dir(created.parent)


def write_durable(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp + fsync + rename + fsync dir)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        _make_dirs_durable(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise SpoolError(f"cannot store {path.name}: {exc.strerror or exc}") from exc


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_write_back(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk without waiting for it (Linux), so that the
    fsync before the acknowledgement has only the last part left to write. A hint only:
    errors are the fsync's to report; where the call does not exist, nothing happens."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def sync_file(path: Path) -> None:
    """fsync a written file's data and size (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename into it survives a crash; SpoolError if it fails."""
    try:
        _fsync_dir(folder)
    except OSError as exc:
        raise SpoolError(f"cannot sync {folder}: {exc.strerror or exc}") from exc


def move_into_place(source: Path, path: Path, *, synced: bool = False) -> None:
    """Rename an already written file to ``path`` after fsync (skipped when ``synced``).

    Durable only once :func:`sync_folder` of ``path.parent`` has returned as well; the
    caller may overlap that with other work but not acknowledge before.
    """
    try:
        _make_dirs_durable(path.parent)
        if not synced:
            sync_file(source)
        try:
            os.replace(source, path)
        except OSError:
            # Different file system: copy, then the same fsync + rename dance.
            write_durable(path, source.read_bytes())
            source.unlink(missing_ok=True)
    except OSError as exc:
        raise SpoolError(f"cannot store {path.name}: {exc.strerror or exc}") from exc


def move_durable(source: Path, path: Path) -> None:
    """Move an already written file (e.g. a streamed receive) into place durably."""
    move_into_place(source, path)
    sync_folder(path.parent)


def existing_parent(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (on the file system it will be on)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def free_bytes(root: Path) -> int:
    """Free space on the file system that holds ``root``."""
    return shutil.disk_usage(existing_parent(root)).free
