"""Start-up recovery of the spool after a crash.

An instance is answered with success once its file is durable (fsync, rename, folder
fsync); its rows are written a few milliseconds later by the index writer
(:mod:`dicomnode.ingest.indexer`), in the supervisor. A crash between the two leaves an
acknowledged file without rows; it is indexed here, before the node listens again, so
nothing acknowledged is missing from the worklist or the analyses. (A crash between the
file and the answer leaves a file the sender was not told about; it is indexed too, and
the sender's retry is then a duplicate.) Temporary files of interrupted writes are
removed, and so are the tombstones of a deletion by retention that a crash interrupted
(:mod:`dicomnode.ingest.deletion`): renamed back where a row still names the file (the
deletion was not committed), removed where none does.

The configured storage folder is the node's: a file of a known instance (or result object)
whose row names the same place under another folder (the storage moved or copied to another
disk, or a backup restored under another ``[storage] path``) takes the row, and the other
folder is left as it is. Only a second copy of an instance under another study or series is
removed, when the indexed file is there; when that file is lost, the copy is indexed as
what it says it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pydicom
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicomnode.config import WorklistSettings
from dicomnode.db.models import Instance, ResultObject
from dicomnode.db.session import utcnow
from dicomnode.ingest.arrival import InstanceFacts, instance_facts
from dicomnode.ingest.deletion import clear_tombstones
from dicomnode.ingest.index import (
    drop_second_copy,
    forget_instance,
    index_instance,
    indexed_copy_gone,
    repoint_instances,
)

# Values over this size are left on disk when a spool file's header is read.
DEFER_BYTES = 64 * 1024
log = logging.getLogger("dicomnode.ingest")

# Results the node writes itself live under <storage>/results/ and are not received instances.
RESULTS_FOLDER = "results"

# Rows that files found at their place (a moved storage folder) take are committed this many
# together: a commit a file was a third of a moved file's start-up time (~0.5 of 1.4 ms).
RELOCATE_BATCH = 1000

# A file's place in the storage's layout: study folder, series folder, file name.
Place = tuple[str, ...]


@dataclass
class Recovery:
    """What a start-up scan found and did."""

    indexed: int = 0
    temporary_removed: int = 0
    unreadable: int = 0
    # Files of known instances and result objects found where their rows did not say, their
    # indexed files gone: the rows now name them.
    relocated: int = 0
    results_relocated: int = 0
    # Rows still naming a file under another folder after the scan.
    elsewhere: int = 0
    # Tombstones of an interrupted deletion: renamed back (a row names the file), removed.
    tombstones_revived: int = 0
    tombstones_removed: int = 0


def _received_files(storage: Path):
    for study_folder in sorted(storage.iterdir()):
        if not study_folder.is_dir() or study_folder.name == RESULTS_FOLDER:
            continue
        yield from sorted(study_folder.glob("*/*"))


def recover_spool(
    session: Session, storage: Path, quiet_seconds: float, worklist: WorklistSettings
) -> Recovery:
    """Index orphan spool files (on disk, no instance row) and remove stale temporary files;
    a study they add or reopen is placed on the worklist by the configured ``worklist``."""
    recovery = Recovery()
    if not storage.is_dir():
        return recovery
    known = set(session.scalars(select(Instance.path)).all())
    _clear_tombstones(session, storage, known, recovery)
    elsewhere = _instances_elsewhere(session, storage)
    moves: list[tuple[str, str, int]] = []
    for path in _received_files(storage):
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            # An interrupted write: never acknowledged, so the sender still has it.
            path.unlink(missing_ok=True)
            recovery.temporary_removed += 1
            continue
        if path.suffix != ".dcm" or str(path) in known:
            continue
        found = elsewhere.pop(path.relative_to(storage).parts, None)
        if found is not None and found == (path.stem, path.stat().st_size):
            # The file at a row's place under another root (moved or copied here): its row
            # takes it, unread; the rows are pointed at their files in batches.
            moves.append((found[0], str(path), found[1]))
            if len(moves) >= RELOCATE_BATCH:
                _repoint(session, moves, recovery)
            continue
        _repoint(session, moves, recovery)  # before the rows are looked at one by one
        try:
            # With its Pixel Data element (left on disk): whether it is an image.
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
            facts = instance_facts(ds)
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        except Exception as exc:
            recovery.unreadable += 1
            log.warning("recovery: cannot read spool file %s: %s", path.name, exc)
            continue
        indexed = session.execute(
            select(Instance.path, Instance.size_bytes).where(
                Instance.sop_instance_uid == facts.sop_instance_uid
            )
        ).first()
        session.rollback()
        index = partial(
            index_instance,
            session,
            facts,
            path=str(path),
            size_bytes=path.stat().st_size,
            transfer_syntax_uid=transfer_syntax,
            calling_ae="",
            now=utcnow(),
            quiet_seconds=quiet_seconds,
            worklist=worklist,
        )
        if indexed is not None:
            _known_elsewhere(session, recovery, storage, facts, tuple(indexed), path, index)
        elif index():
            recovery.indexed += 1
        else:  # indexed meanwhile at another path (not at start-up): a second copy
            drop_second_copy(facts.sop_instance_uid, str(path))
    _repoint(session, moves, recovery)
    _relocate_results(session, storage / RESULTS_FOLDER, recovery)
    recovery.elsewhere = _named_elsewhere(session, storage)
    return recovery


def _instances_elsewhere(session: Session, storage: Path) -> dict[Place, tuple[str, int]]:
    """The instance rows that name a file outside ``storage``, by that file's place in the
    layout: their SOP Instance UID (the file's name) and size. None where the storage did
    not move."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.path, Instance.size_bytes).where(
            ~Instance.path.startswith(f"{storage}/", autoescape=True)
        )
    ).all()
    session.rollback()
    return {Path(path).parts[-3:]: (uid, size) for uid, path, size in rows}


def _repoint(session: Session, moves: list[tuple[str, str, int]], recovery: Recovery) -> None:
    """Point the rows of ``moves`` (SOP Instance UID, file found, size) at their files,
    commit, and empty ``moves``."""
    if moves:
        repoint_instances(session.connection(), moves)
        session.commit()
        recovery.relocated += len(moves)
        moves.clear()


def _named_elsewhere(session: Session, storage: Path) -> int:
    """How many instance and result rows still name a file outside ``storage`` (a copy that
    left them out: the folder they name must stay until they are sent again or found)."""
    prefix = f"{storage}/"
    count = sum(
        session.scalar(select(func.count()).where(~table.path.startswith(prefix, autoescape=True)))
        or 0
        for table in (Instance, ResultObject)
    )
    session.rollback()
    return count


def _clear_tombstones(session: Session, storage: Path, known: set[str], recovery: Recovery) -> None:
    """Before the scan: a tombstone is never an instance, and a file renamed back is known."""
    results = set(session.scalars(select(ResultObject.path)).all())
    session.rollback()
    for folder, indexed in ((storage, known), (storage / RESULTS_FOLDER, results)):
        revived, removed = clear_tombstones(folder, indexed)
        recovery.tombstones_revived += revived
        recovery.tombstones_removed += removed
    if recovery.tombstones_revived or recovery.tombstones_removed:
        log.warning(
            "recovery: a deletion by retention was interrupted: %d file(s) put back (their "
            "rows are there), %d removed",
            recovery.tombstones_revived,
            recovery.tombstones_removed,
        )


def _known_elsewhere(
    session: Session,
    recovery: Recovery,
    storage: Path,
    facts: InstanceFacts,
    indexed_file: tuple[str, int],
    path: Path,
    index: Callable[[], bool],
) -> None:
    """A file under ``storage`` of an instance indexed at ``indexed_file`` (path, size).

    The row names a file under another root (the storage folder moved, copied or restored
    here): the row is pointed at this file when it lies at the same place in the layout (the
    other root is left as it is) unless its size differs while the indexed file is still
    there (a copy not finished: the row keeps the whole file), this file is a second copy
    when the one at that place is here, else it is left alone. The row names a file under
    this storage: this file is a second copy while that one is there; when that one is lost,
    the row goes and this file is indexed as what it says it is (``index``)."""
    indexed_path, indexed_size = indexed_file
    indexed = Path(indexed_path)
    if not indexed.is_relative_to(storage):
        if indexed.parts[-3:] == path.relative_to(storage).parts:
            size = path.stat().st_size
            if size != indexed_size and not indexed_copy_gone(indexed_path):
                log.warning(
                    "recovery: instance %s here is %d bytes, the indexed file %s is %d (a "
                    "copy not finished?): the row keeps naming the indexed file; copy it again",
                    facts.sop_instance_uid,
                    size,
                    indexed_path,
                    indexed_size,
                )
                return
            if size != indexed_size:
                log.warning(
                    "recovery: instance %s here is %d bytes where %d were indexed, and the "
                    "indexed file %s is gone: the row now names this one",
                    facts.sop_instance_uid,
                    size,
                    indexed_size,
                    indexed_path,
                )
            repoint_instances(session.connection(), [(facts.sop_instance_uid, str(path), size)])
            session.commit()
            recovery.relocated += 1
        elif storage.joinpath(*indexed.parts[-3:]).is_file():
            drop_second_copy(facts.sop_instance_uid, str(path))
        else:
            log.warning(
                "recovery: instance %s is indexed under another storage folder (%s) and lies "
                "here under another study or series (%s): left as it is",
                facts.sop_instance_uid,
                indexed_path,
                path,
            )
        return
    if not indexed_copy_gone(indexed_path):
        drop_second_copy(facts.sop_instance_uid, str(path))
        return
    forget_instance(session.connection(), facts.sop_instance_uid)
    session.commit()
    if index():
        recovery.indexed += 1


def _relocate_results(session: Session, results: Path, recovery: Recovery) -> None:
    """Point each result object's row whose file is gone, or lies under another storage
    folder, at its file found under ``results``: the file at the row's place in the layout,
    else one read for its SOP Instance UID; other files there are left as they are."""
    if not results.is_dir():
        return
    known = set(session.scalars(select(ResultObject.path)).all())
    elsewhere = {
        Path(path).parts[-3:]: row_id
        for row_id, path in session.execute(
            select(ResultObject.id, ResultObject.path).where(
                ~ResultObject.path.startswith(f"{results}/", autoescape=True)
            )
        )
    }
    session.rollback()
    moves: list[dict[str, object]] = []
    for path in sorted(results.glob("*/*/*.dcm")):
        if str(path) in known or not path.is_file():
            continue
        row_id = elsewhere.pop(path.relative_to(results).parts, None)
        if row_id is not None:
            # The file at its row's place under another root (moved or copied here), unread.
            moves.append({"id": row_id, "path": str(path)})
            if len(moves) >= RELOCATE_BATCH:
                _repoint_results(session, moves, recovery)
            continue
        _repoint_results(session, moves, recovery)
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        except Exception as exc:
            log.warning("recovery: cannot read result file %s: %s", path.name, exc)
            continue
        row = session.scalars(
            select(ResultObject).where(ResultObject.sop_instance_uid == uid)
        ).first()
        # Its row names a file that is gone, or one under another storage folder (moved or
        # copied here: the other is left as it is).
        if row is not None and (
            indexed_copy_gone(row.path) or not Path(row.path).is_relative_to(results)
        ):
            row.path = str(path)
            session.commit()
            recovery.results_relocated += 1
        else:
            session.rollback()
    _repoint_results(session, moves, recovery)


def _repoint_results(session: Session, moves: list[dict[str, object]], recovery: Recovery) -> None:
    """Point the result rows of ``moves`` (id, path) at their files, commit, empty ``moves``."""
    if moves:
        session.execute(update(ResultObject), moves)
        session.commit()
        recovery.results_relocated += len(moves)
        moves.clear()
