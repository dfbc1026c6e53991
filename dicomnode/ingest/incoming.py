"""Receiving a C-STORE data set straight to disk, never whole in memory.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each arriving P-DATA fragment to a
temporary file in the DICOM file format and hands the handler its path. :func:`install`
makes that file an :class:`IncomingFile` in ``<storage>/.incoming/`` (the spool's own file
system, so the handler moves it into place by rename instead of copying it) that enforces
``[node] max_instance_bytes`` and the ``[storage] min_free_bytes`` watermark while the data
arrive: past either limit it stops writing, frees what it wrote, and the handler answers
0xA700 once the sender has finished.

Creating a file waits for the file system's journal (up to ~1 ms on ext4 while another
instance's fsync commits), so each process keeps one empty file per folder ready
(:data:`SPARES`), made in the background while the current data set is received. Every
:data:`WRITE_BACK_BYTES` received, the disk is asked to start writing them
(:func:`~dicomnode.ingest.spool.start_write_back`): the fsync before a large instance's
acknowledgement then has only the tail left to write. The File Meta Information that
pynetdicom writes ahead of the data set is encoded directly
(:func:`~dicomnode.ingest.encoding.encode_file_meta`), not built as a pydicom data set.

Nothing here raises into pynetdicom's decoding (the DUL thread): a file that cannot be
created (storage read-only, no free inode) or removed is a refused data set, answered 0xA700,
not an exception that ends the association without an answer. A listener under ``serve``
names its files after its index (``rx-<index>-*.part``), so that the one restarted in a dead
listener's place removes what that one was receiving (:func:`clear_listener_files`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom.dimse_messages
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.dsutils import create_file_meta

from dicomnode.folders import make_folders
from dicomnode.ingest.encoding import FileMeta, encode_file_meta
from dicomnode.ingest.spool import move_into_place, start_write_back

log = logging.getLogger("dicomnode.ingest")

INCOMING_FOLDER = ".incoming"
# The name of every file received into (a listener's index follows under serve).
PART_PREFIX = "rx-"
PART_SUFFIX = ".part"
# Free space is looked at when a data set starts and after every this many bytes.
_FREE_CHECK_BYTES = 16 * 1024**2
# How long removing the spares waits for one still being made (a disk that hangs).
REMOVE_WAIT_SECONDS = 5.0
# Write-back of what has arrived is started every this many bytes (a CT slice of 0.5 MB
# never reaches it; a 10 MB radiograph starts it four times).
WRITE_BACK_BYTES = 2 * 1024**2


@dataclass(frozen=True)
class Limits:
    """What a receive may use: the instance size cap and the free-space floor."""

    max_instance_bytes: int
    min_free_bytes: int


def _create(folder: Path, prefix: str) -> tuple[int, str]:
    make_folders(folder)
    return tempfile.mkstemp(prefix=prefix, suffix=PART_SUFFIX, dir=folder)


def listener_prefix(listener: int | None) -> str:
    """The name prefix of the files listener ``listener`` receives into (None: a listener
    that is not one of serve's); mkstemp's random part has no '-', so no prefix is the start
    of another's names."""
    return PART_PREFIX if listener is None else f"{PART_PREFIX}{listener}-"


def _still_named(spare: tuple[int, str]) -> bool:
    """Whether the spare's name still leads to it (an admin may have cleaned the folder)."""
    fd, name = spare
    try:
        alive = os.path.samestat(os.fstat(fd), os.stat(name))
    except OSError:
        alive = False
    if not alive:
        with contextlib.suppress(OSError):
            os.close(fd)
    return alive


class SpareFiles:
    """One empty incoming file per folder, created ahead of the data set that needs it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: dict[Path, tuple[int, str]] = {}
        self._pending: set[Path] = set()
        # Files whose removal failed (storage read-only): tried again before each spare.
        self._unremoved: set[str] = set()
        # Set once by install(): this process's file names (listener_prefix).
        self.prefix = PART_PREFIX
        self._maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="incoming-spare")

    def take(self, folder: Path) -> tuple[int, str]:
        """An open file descriptor and the name of an empty file in ``folder``; the spare if
        one is ready, else a new file. Either way the next spare is made in the background."""
        with self._lock:
            spare = self._ready.pop(folder, None)
            if folder not in self._pending:
                self._pending.add(folder)
                self._maker.submit(self._make, folder)
        if spare is not None and _still_named(spare):
            return spare
        return _create(folder, self.prefix)

    def remove_later(self, name: str) -> None:
        """Remove ``name`` before the next spare is made (its removal failed now)."""
        with self._lock:
            self._unremoved.add(name)

    def ready(self, folder: Path) -> str | None:
        """The name of the spare ready in ``folder``, if any."""
        with self._lock:
            spare = self._ready.get(folder)
        return spare[1] if spare is not None else None

    def wait(self) -> None:
        """Until the spares asked for so far are made (tests)."""
        self._maker.submit(lambda: None).result()

    def remove(self) -> None:
        """Close and remove the spares (a process that stops), the one being made included."""
        # A spare still being made would otherwise be left behind in the folder. (At exit
        # the maker is already shut down, its work done: RuntimeError.)
        with contextlib.suppress(TimeoutError, RuntimeError):
            self._maker.submit(lambda: None).result(timeout=REMOVE_WAIT_SECONDS)
        with self._lock:
            spares, self._ready = list(self._ready.values()), {}
        for fd, name in spares:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)

    def _make(self, folder: Path) -> None:
        with self._lock:
            unremoved, self._unremoved = self._unremoved, set()
        for name in unremoved:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
            except OSError:
                self.remove_later(name)
        try:
            spare: tuple[int, str] | None = _create(folder, self.prefix)
        except OSError:
            # Disk full, folder gone: the next data set creates its own file and says why.
            spare = None
        with self._lock:
            self._pending.discard(folder)
            if spare is not None and folder not in self._ready:
                self._ready[folder] = spare
                spare = None
        if spare is not None:
            os.close(spare[0])
            os.unlink(spare[1])


SPARES = SpareFiles()
atexit.register(SPARES.remove)


class IncomingFile:
    """A file-like object pynetdicom writes one received data set into (``write``,
    ``file.flush``, ``close``, ``name``); it stops writing past the limits.

    Made by pynetdicom's decoding in the association's DUL thread, where an exception ends
    the association unanswered and uncleaned: a file that cannot be created makes a refused
    one (the data set only counted, answered 0xA700), so the sender may try again later."""

    def __init__(self, folder: Path, limits: Limits):
        self.file = self  # pynetdicom flushes through ``.file``
        self.size = 0
        self.refusal: str | None = None
        self.moved = False
        # Where the data set starts, after the File Meta Information (write_file_meta).
        self.dataset_offset: int | None = None
        self._limits = limits
        self._handle: Any = None
        self._next_free_check = 0
        self._written_back = 0
        try:
            fd, name = SPARES.take(folder)
        except OSError as exc:
            # A name no file has (mkstemp's are longer): pynetdicom unlinks it after the
            # handler, and finds nothing.
            self.name = str(folder / f"{SPARES.prefix}none{PART_SUFFIX}")
            self.refusal = f"cannot create a file in {folder}: {exc.strerror or exc}"
            return
        self.name = name
        self._handle = os.fdopen(fd, "wb")

    @property
    def path(self) -> Path:
        return Path(self.name)

    def write(self, data: bytes | memoryview) -> int:
        """Append ``data`` (or only count it once a limit is passed); never raises."""
        count = len(data)
        self.size += count
        if self.refusal is not None:
            return count
        if self.size > self._limits.max_instance_bytes:
            self._refuse(f"more than [node] max_instance_bytes ({self._limits.max_instance_bytes})")
            return count
        try:
            if self.size >= self._next_free_check:
                self._next_free_check = self.size + _FREE_CHECK_BYTES
                if shutil.disk_usage(self.path.parent).free < self._limits.min_free_bytes:
                    self._refuse("storage is below the [storage] min_free_bytes watermark")
                    return count
            self._handle.write(data)
            if self.size - self._written_back >= WRITE_BACK_BYTES:
                self._handle.flush()
                start_write_back(
                    self._handle.fileno(), self._written_back, self.size - self._written_back
                )
                self._written_back = self.size
        except OSError as exc:
            self._refuse(f"cannot write: {exc.strerror or exc}")
        return count

    def flush(self) -> None:
        if self.refusal is None:
            with contextlib.suppress(OSError):
                self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()

    def move_to(self, path: Path, *, synced: bool = False) -> None:
        """Rename the received file to ``path`` after fsync (done already when ``synced``);
        durable once the caller has synced ``path.parent`` (spool.sync_folder)."""
        self.close()
        move_into_place(self.path, path, synced=synced)
        self.moved = True
        # pynetdicom unlinks ``name`` after the handler: point it where nothing will be.
        self.name = f"{self.name}.moved"

    def discard(self) -> None:
        """Close and remove the file unless it was moved (refused, duplicate, aborted);
        never raises: a file that cannot be removed now (storage read-only) is removed
        before the next spare is made, and the C-STORE keeps its own answer."""
        self.close()
        if self.moved or self._handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning(
                "could not remove the incoming file %s (%s); removed later",
                self.path.name,
                exc.strerror or exc,
            )
            SPARES.remove_later(self.name)

    def _refuse(self, reason: str) -> None:
        self.refusal = reason
        if self._handle is None:
            return
        # Give the space back now; the rest of the data set is only counted.
        with contextlib.suppress(OSError):
            self._handle.seek(0)
            self._handle.truncate()


def incoming_folder(storage: Path) -> Path:
    """Where data sets are received before they are moved into the spool."""
    return storage / INCOMING_FOLDER


def clear_incoming(storage: Path) -> int:
    """Remove partial receives a stopped process left behind; returns how many (empty
    files, spares that a killed process could not remove, are removed and not counted)."""
    folder = incoming_folder(storage)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        if path.is_file():
            partial = path.stat().st_size > 0
            path.unlink(missing_ok=True)
            removed += partial
    return removed


def clear_listener_files(storage: Path, listener: int) -> int:
    """Remove the incoming files of listener ``listener`` (a dead process's partial receive
    and spare), before another takes its place; the other listeners' files are left alone
    (they are receiving into them). Returns how many files were removed."""
    folder = incoming_folder(storage)
    removed = 0
    for path in folder.glob(f"{listener_prefix(listener)}*{PART_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


def install(
    folder: Callable[[], Path], limits: Callable[[], Limits], listener: int | None = None
) -> None:
    """Receive C-STORE data sets of this process into :class:`IncomingFile` objects.

    ``folder`` and ``limits`` are read when each data set starts, so a reloaded
    configuration applies to the next instance; ``listener``: this process's index under
    serve, which its files are named after (:func:`listener_prefix`).
    """
    SPARES.prefix = listener_prefix(listener)

    def factory(*_args, **_kwargs) -> IncomingFile:
        return IncomingFile(folder(), limits())

    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom opens the file and writes its File Meta Information through these
    # module-level names (dimse_messages.py, DIMSEMessage.decode_msg).
    pynetdicom.dimse_messages.NamedTemporaryFile = factory  # type: ignore[assignment]
    pynetdicom.dimse_messages.create_file_meta = FileMeta  # type: ignore[assignment]
    pynetdicom.dimse_messages.write_file_meta_info = write_file_meta  # type: ignore[assignment]


def write_file_meta(fp: Any, meta: FileMeta | FileMetaDataset) -> None:
    """Write the File Meta Information that pynetdicom puts ahead of a received data set:
    encoded directly (:mod:`~dicomnode.ingest.encoding`); by pydicom, which refuses a
    missing value, where one is missing."""
    if isinstance(meta, FileMeta):
        if meta.sop_class_uid and meta.sop_instance_uid and meta.transfer_syntax:
            fp.write(encode_file_meta(meta))
            _data_set_follows(fp)
            return
        meta = create_file_meta(**dataclasses.asdict(meta))
    write_file_meta_info(fp, meta)
    _data_set_follows(fp)


def _data_set_follows(fp: Any) -> None:
    if isinstance(fp, IncomingFile) and fp.refusal is None:
        fp.dataset_offset = fp.size


def read_received(received: IncomingFile, transfer_syntax: str, defer_size: int | None) -> Dataset:
    """The data set of a received file, values over ``defer_size`` bytes left on disk.

    The File Meta Information ahead of it is the one this process wrote (the negotiated
    transfer syntax, the request's UIDs), so it is not parsed again: reading starts where
    the data set does (a CT slice's header in two thirds of ``dcmread``'s time). A file whose
    data set start is not known (received into memory), a deflated data set and a
    transfer syntax pydicom does not know are read by ``dcmread``, as is a data set this
    read fails on (so a malformed one fails as ``dcmread`` fails).
    """
    syntax = UID(transfer_syntax)
    offset = received.dataset_offset
    if offset is None or not syntax.is_transfer_syntax or syntax.is_deflated:
        return pydicom.dcmread(received.path, defer_size=defer_size)
    try:
        with open(received.path, "rb") as fp:
            fp.seek(offset)
            dataset = read_dataset(
                fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=defer_size
            )
    except Exception:
        return pydicom.dcmread(received.path, defer_size=defer_size)
    # A FileDataset named by its path: deferred values are read from the file when asked.
    read = FileDataset(
        str(received.path), dataset, None, None, syntax.is_implicit_VR, syntax.is_little_endian
    )
    read.set_original_encoding(
        syntax.is_implicit_VR, syntax.is_little_endian, dataset._character_set
    )
    return read


def write_incoming(folder: Path, limits: Limits, encoded: bytes) -> IncomingFile:
    """An :class:`IncomingFile` holding ``encoded`` (a data set that arrived in memory)."""
    received = IncomingFile(folder, limits)
    received.write(encoded)
    received.close()
    return received
