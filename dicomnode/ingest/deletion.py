"""A study's files being deleted by retention, and instances of it that arrive meanwhile.

Retention deletes a study's rows and the files they name; a sender may send the same
instances again at that moment (a prior prefetched again, a re-sent study). The listener
takes a file already at an instance's path as a duplicate and answers success without
writing: if that file is the one retention then removes, the acknowledged instance is lost
and the rows the index writer then writes name a file that is gone.

So the two take turns on a lock on the storage folder itself (``flock`` of the folder:
across the listener processes and the supervisor, no file of its own): retention holds it
exclusively while it deletes a
study (:func:`deleting`: from before its rows are locked until its files are gone), a
listener shares it from its duplicate check until the arrival's rows are written
(:func:`receiving`). A listener that comes during a deletion waits for it, then finds the
instance's file gone and stores what it received; one that came before has its rows written
before retention decides, with them.

Retention renames a study's files to tombstones (:func:`tombstone`: hidden names in the
same folder, which the listener's duplicate check and recovery's indexing do not take for
instances) before it commits the deletion, renames them back if it rolls back
(:func:`revive`), and unlinks them after. Recovery removes tombstones that a crash left
(:func:`clear_tombstones`), or renames one back whose row is still there.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("dicomnode.ingest")

_PREFIX = "."
_SUFFIX = ".deleting"
_unlockable: set[str] = set()


# How long retention waits for the listeners' shared holds to end before it leaves a study
# for its next run (busy listeners may hold the folder without a gap for longer: flock does
# not queue new shared holds behind a waiting exclusive one).
DELETE_WAIT_SECONDS = 30.0
_DELETE_RETRY_SECONDS = 0.01


class StorageBusy(Exception):
    """Retention could not have the storage to itself within :data:`DELETE_WAIT_SECONDS`."""


def _flock_exclusive(fd: int, deadline: float) -> None:
    """Exclusive flock of ``fd``, retried until ``deadline`` (time.monotonic()); raises
    :class:`StorageBusy` when it stays held, OSError when the file system cannot lock."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StorageBusy("the storage folder stayed in use by the listeners") from None
            time.sleep(_DELETE_RETRY_SECONDS)


@contextlib.contextmanager
def _locked(storage: Path, mode: int) -> Iterator[None]:
    # Opened for each holder: flock locks belong to an open file, not to a thread.
    try:
        fd = os.open(storage, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:  # nothing stored yet: nothing to delete
        yield
        return
    try:
        try:
            if mode == fcntl.LOCK_EX:
                _flock_exclusive(fd, time.monotonic() + DELETE_WAIT_SECONDS)
            else:
                fcntl.flock(fd, mode)
        except StorageBusy:
            raise
        except OSError as exc:
            # A file system without flock on folders (some network ones): as before.
            if str(storage) not in _unlockable:
                _unlockable.add(str(storage))
                log.warning(
                    "storage %s cannot be locked (%s): an instance sent again while "
                    "retention deletes its study may be lost",
                    storage,
                    exc.strerror or exc,
                )
        yield
    finally:
        os.close(fd)  # releases the lock


def deleting(storage: Path) -> contextlib.AbstractContextManager[None]:
    """Held by retention while it deletes one study (exclusive: waits for listeners)."""
    return _locked(storage, fcntl.LOCK_EX)


def receiving(storage: Path) -> contextlib.AbstractContextManager[None]:
    """Held by a listener from its duplicate check until the arrival's rows are written
    (shared: listeners do not wait for each other, only for a deletion)."""
    return _locked(storage, fcntl.LOCK_SH)


def tombstone_of(path: Path) -> Path:
    """The tombstone name of ``path``: hidden, in the same folder, not a ``.dcm``."""
    return path.with_name(f"{_PREFIX}{path.name}{_SUFFIX}")


def is_tombstone(path: Path) -> bool:
    return path.name.startswith(_PREFIX) and path.name.endswith(_SUFFIX)


def original_of(tomb: Path) -> Path:
    """The path whose tombstone ``tomb`` is."""
    return tomb.with_name(tomb.name[len(_PREFIX) : -len(_SUFFIX)])


def tombstone(path: Path) -> Path | None:
    """Rename ``path`` to its tombstone; None when there is no file there. Raises OSError
    when it cannot be renamed."""
    tomb = tombstone_of(path)
    try:
        os.rename(path, tomb)
    except FileNotFoundError:
        return None
    return tomb


def revive(tomb: Path) -> None:
    """Put a tombstone back under its own name (a deletion rolled back), unless a file is
    there already (an instance stored again meanwhile: the same instance): then it goes."""
    path = original_of(tomb)
    try:
        os.link(tomb, path)
    except FileExistsError:
        pass
    except FileNotFoundError:
        return
    except OSError:
        # No hard links on this file system (SMB/CIFS, some NAS): a rename, which the
        # callers (retention under the exclusive lock, recovery before listening) may do
        # without a race when nothing is there.
        if not path.exists():
            os.rename(tomb, path)
            return
    tomb.unlink(missing_ok=True)


def clear_tombstones(folder: Path, indexed: set[str]) -> tuple[int, int]:
    """Tombstones under ``folder``/<study>/<series>/ that a crash left: renamed back where a
    row (a path in ``indexed``) still names the file (the deletion was not committed),
    removed otherwise. Returns (revived, removed)."""
    revived = removed = 0
    if not folder.is_dir():
        return 0, 0
    for tomb in sorted(folder.glob(f"*/*/{_PREFIX}*{_SUFFIX}")):
        if str(original_of(tomb)) in indexed:
            revive(tomb)
            revived += 1
        else:
            tomb.unlink(missing_ok=True)
            removed += 1
    return revived, removed
