"""What the node's processes on every host share besides the jobs, kept in the database's
``node_facts`` table: the id and the path of the node's storage folder and the model cards
serve runs.

A worker on another host reads the received images and writes the result objects under its
own ``[storage] path``, and runs its own model cards: a folder that is not the node's (not
mounted, another path than serve's, the old copy of a moved folder) failed every analysis or
filed result files outside the node's storage, and a worker without one of serve's cards
triaged studies without that model, quietly. So:

- ``dicomnode serve`` writes a random id once into :data:`STORAGE_MARKER` at the root of its
  storage folder and publishes it, with the folder's resolved path and its model cards
  (name, version and a digest of each card), at its start and the cards at each reload;
- a stand-alone worker (``dicomnode worker`` run by itself) refuses to start where its
  resolved ``[storage] path`` is not the published one (every host mounts the storage at
  the same path: a copy of a moved folder holds the same id) or its folder does not hold
  the marker with the published id (:class:`StorageMismatch`); with no id published yet (no
  serve ever ran on the database) the first worker publishes its folder's, making the marker
  where there is none, and its path; with no path published (a serve of an older version),
  paths are not compared;
- a running stand-alone worker looks again at most every :data:`CHECK_SECONDS`
  (:class:`NodeCheck`): with cards other than the published ones it takes no analyse or
  results jobs (their exports and notifications it still runs), with another storage folder
  or path only notifications (:data:`STORAGE_FREE_KINDS`: they read no file), one log line
  when that starts and one when it ends. The marker is read without holding the check's
  lock: a storage folder on a hung mount blocks only the job thread that looks.

Serve's own workers (started by serve, with serve's configuration) compare nothing: they run
serve's folder by construction, and serve's cards as of their last reload. During a reload
(serve publishes its new cards, then its workers load theirs, for seconds) and in a worker
serve restarts after a crash (it reads the card files, perhaps edited for a reload not yet
made) a comparison said they differ, and the node took no analyses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomnode.db.models import NodeFact
from dicomnode.db.session import READ_ONLY, utcnow
from dicomnode.folders import make_folders
from dicomnode.models.registry import ModelCard

log = logging.getLogger("dicomnode.nodestate")

# The marker file at the root of the storage folder: the folder's id on its first line.
# Recovery and retention look only at the study folders and results/ under the root.
STORAGE_MARKER = ".dicomnode-storage"
MARKER_NOTE = (
    "# dicomnode: the id of this node's storage folder. Every host's [storage] path must show\n"
    "# this file; keep it with the folder (backups, moves) and do not edit it.\n"
)
# The facts' names in node_facts.
STORAGE_ID = "storage_id"
STORAGE_PATH = "storage_path"  # serve's [storage] path, resolved (absent: an older serve)
MODEL_CARDS = "model_cards"
# How often a running worker reads the facts again (one small query).
CHECK_SECONDS = 15.0
# Job kinds that run the models.
MODEL_KINDS = frozenset({"analyse", "results"})
# Job kinds that read and write no file in the storage folder (a webhook or HL7 message from
# the database's rows): a worker whose folder is not the node's still runs them.
STORAGE_FREE_KINDS = frozenset({"notify"})


class StorageMismatch(Exception):
    """A worker's storage folder is not the node's: one line that names the folder."""


def read_facts(session: Session) -> dict[str, str]:
    """Every fact the node's processes have published, by name."""
    return {name: value for name, value in session.execute(select(NodeFact.name, NodeFact.value))}


def _publish(session: Session, name: str, value: str, replace: bool = True) -> str:
    """Set fact ``name`` to ``value`` (only where it has none unless ``replace``) and commit;
    returns the value the database holds afterwards (another process's, where it was
    first)."""
    for _ in range(3):
        row = session.scalars(select(NodeFact).where(NodeFact.name == name)).one_or_none()
        if row is not None:
            if replace and row.value != value:
                row.value = value
                row.updated_at = utcnow()
            stored = row.value
            session.commit()
            return stored
        session.add(NodeFact(name=name, value=value, updated_at=utcnow()))
        try:
            session.commit()
            return value
        except IntegrityError:
            session.rollback()  # another process published it meanwhile: read theirs
    raise RuntimeError(f"could not publish the node fact {name!r}")


# Model cards -----------------------------------------------------------------------------


def card_identities(cards: Iterable[ModelCard]) -> dict[str, str]:
    """Each card's model name and what tells its content: its version and a digest of the
    card's settings (the same card file on every host gives the same digest)."""
    return {
        card.model.name: f"{card.model.version} "
        + hashlib.sha256(card.model_dump_json().encode()).hexdigest()[:12]
        for card in cards
    }


def card_differences(published: dict[str, str], own: dict[str, str]) -> list[str]:
    """How ``own`` cards differ from the ``published`` ones, for a log line ([] when they
    match)."""

    def version(identity: str) -> str:
        return identity.split(" ", 1)[0]

    missing = [f"{n} {version(published[n])}" for n in sorted(published) if n not in own]
    extra = [f"{n} {version(own[n])}" for n in sorted(own) if n not in published]
    changed = [
        f"{n} {version(own[n])} (serve's: {version(published[n])}"
        + (", another card file" if version(own[n]) == version(published[n]) else "")
        + ")"
        for n in sorted(own)
        if n in published and own[n] != published[n]
    ]
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing))
    if extra:
        parts.append("extra " + ", ".join(extra))
    if changed:
        parts.append("different " + ", ".join(changed))
    return parts


def publish_cards(session: Session, cards: Iterable[ModelCard]) -> None:
    """Serve's cards, the ones every worker must run."""
    _publish(session, MODEL_CARDS, json.dumps(card_identities(cards), sort_keys=True))


def published_cards(facts: dict[str, str]) -> dict[str, str] | None:
    """The cards serve published (None: no serve has)."""
    value = facts.get(MODEL_CARDS)
    return None if value is None else json.loads(value)


# Storage ---------------------------------------------------------------------------------


def storage_marker(storage: Path) -> str | None:
    """The id in the storage folder's marker file (None: there is none)."""
    try:
        text = (storage / STORAGE_MARKER).read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    first = text.split("\n", 1)[0].strip()
    return first or None


def make_storage_marker(storage: Path) -> str:
    """The storage folder's id: the marker's, or a new one written into a new marker (the
    folder made where missing). Written whole under another name and linked into place, so
    that a concurrent reader or maker never sees it half written."""
    found = storage_marker(storage)
    if found is not None:
        return found
    make_folders(storage)
    new_id = uuid.uuid4().hex
    temporary = storage / f"{STORAGE_MARKER}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    # Owner and group only, as the node's other files, whatever the umask.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with open(descriptor, "w", encoding="ascii") as file:
        file.write(f"{new_id}\n{MARKER_NOTE}")
        file.flush()
        os.fsync(file.fileno())
    try:
        os.link(temporary, storage / STORAGE_MARKER)
    except FileExistsError:
        pass  # another process made it first: its id is the folder's
    finally:
        temporary.unlink(missing_ok=True)
    found = storage_marker(storage)
    if found is None:
        raise StorageMismatch(f"storage folder {storage}: its {STORAGE_MARKER} file is empty")
    return found


def resolved_path(storage: Path) -> str:
    """The storage folder's path as the hosts compare it: absolute, symbolic links followed."""
    return str(storage.resolve())


def publish_storage(session: Session, storage: Path) -> str:
    """Serve's storage folder is the node's: its id (a marker made where there is none)
    published, replacing another (with a WARNING: workers on that folder then stop), and
    its resolved path."""
    storage_id = make_storage_marker(storage)
    before = read_facts(session).get(STORAGE_ID)
    _publish(session, STORAGE_ID, storage_id)
    _publish(session, STORAGE_PATH, resolved_path(storage))
    if before is not None and before != storage_id:
        log.warning(
            "storage: the database named another storage folder (id %s) than %s (id %s): "
            "the node's storage is now this folder (was its %s file lost, or the database "
            "used with another node's storage?); workers whose [storage] path shows the "
            "other folder take no jobs and do not start",
            before,
            storage,
            storage_id,
            STORAGE_MARKER,
        )
    return storage_id


def _not_the_nodes(storage: Path, why: str, node_id: str) -> StorageMismatch:
    return StorageMismatch(
        f"storage folder {storage} is not the node's storage (id {node_id}, in the "
        f"{STORAGE_MARKER} file at its root): {why} (is the node's storage not mounted "
        f"here, or is [storage] path not the path serve uses?); mount the node's storage "
        f"folder at this path or set [storage] path to it"
    )


def _not_the_nodes_path(storage: Path, own: str, node_path: str) -> StorageMismatch:
    shown = str(storage) if own == str(storage) else f"{storage} ({own})"
    return StorageMismatch(
        f"storage folder {shown} is not at the node's storage path {node_path} (serve's "
        f"[storage] path): every host must mount the node's storage at the same path, and a "
        f"folder elsewhere (the old copy of a moved folder, which holds the same "
        f"{STORAGE_MARKER} id) is not where the node reads its results; mount the node's "
        f"storage at {node_path} and set [storage] path to it"
    )


def storage_problem(
    storage: Path, node_id: str, node_path: str | None = None
) -> StorageMismatch | None:
    """Why ``storage`` is not the folder of storage id ``node_id`` at the resolved path
    ``node_path`` (None: it is; no ``node_path``: any path)."""
    if node_path is not None:
        try:
            own = resolved_path(storage)
        except (OSError, RuntimeError) as exc:  # a loop of symbolic links: RuntimeError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return _not_the_nodes(storage, f"its path cannot be resolved ({reason})", node_id)
        if own != node_path:
            return _not_the_nodes_path(storage, own, node_path)
    try:
        found = storage_marker(storage)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return _not_the_nodes(
            storage, f"its {STORAGE_MARKER} file cannot be read ({reason})", node_id
        )
    if found is None:
        return _not_the_nodes(storage, f"it has no {STORAGE_MARKER} file", node_id)
    if found != node_id:
        return _not_the_nodes(storage, f"its {STORAGE_MARKER} file says id {found}", node_id)
    return None


def check_storage(session: Session, storage: Path) -> str:
    """A stand-alone worker's start: its storage folder must be the node's, at the node's
    path where one is published (:class:`StorageMismatch` says why not). With no storage
    published yet (no serve has run on this database), this folder's id and path are
    published, its marker made where there is none. Returns the id."""
    facts = read_facts(session)
    session.commit()
    node_id, node_path = facts.get(STORAGE_ID), facts.get(STORAGE_PATH)
    if node_id is None:
        try:
            own = make_storage_marker(storage)
        except OSError as exc:
            raise StorageMismatch(
                f"storage folder {storage}: cannot make its {STORAGE_MARKER} file "
                f"({exc.strerror or exc}); check [storage] path and the folder's owner and mode"
            ) from None
        node_id = _publish(session, STORAGE_ID, own, replace=False)
        if node_path is None:
            node_path = _publish(session, STORAGE_PATH, resolved_path(storage), replace=False)
    problem = storage_problem(storage, node_id, node_path)
    if problem is not None:
        raise problem
    return node_id


class NodeCheck:
    """Whether a stand-alone worker's model cards and storage folder are the node's, read
    again from the database at most every :data:`CHECK_SECONDS`; logs when that changes.

    One job thread looks at a time, the others meanwhile go by the last look (by nothing but
    notifications before the first look since the start or a reload); the storage folder is
    looked at without the lock, so that a hung mount holds only the thread that looks (and
    no other starts a look while it hangs)."""

    def __init__(self, owner: str, storage: Path, cards: Iterable[ModelCard]):
        self.owner = owner
        self.storage = storage
        self.own_cards = card_identities(cards)
        self._lock = threading.Lock()
        self._due = 0.0  # monotonic time of the next look
        self._looking = False  # a job thread looks now (a hung mount: for as long as it hangs)
        self._looks = 0  # looks begun
        self._applied = 0  # the look whose findings stand
        self._current = 1  # the first look made with the running storage path and cards
        # What the last look found wrong (one line each while it lasts).
        self.card_problem = ""
        self.storage_problem = ""

    def reloaded(self, storage: Path, cards: Iterable[ModelCard]) -> None:
        """The worker reloaded: compare its storage folder and new cards at its next claim
        (only notifications until then)."""
        with self._lock:
            self.storage = storage
            self.own_cards = card_identities(cards)
            self._due = 0.0
            self._current = self._looks + 1

    def claimable(self, session: Session, kinds: list[str]) -> list[str]:
        """The ``kinds`` this worker may claim now: only notifications while its storage
        folder is not the node's, no analyse or results jobs while its cards are not
        serve's."""
        with self._lock:
            look = not self._looking and time.monotonic() >= self._due
            if look:
                self._looking = True
                self._due = time.monotonic() + CHECK_SECONDS
                self._looks += 1
                number, storage = self._looks, self.storage
        if look:
            try:
                # As the claim's look for due jobs: without SQLite's write lock, and its
                # read transaction ended.
                connection = session.connection(execution_options=READ_ONLY)
                facts = dict(connection.execute(select(NodeFact.name, NodeFact.value)).all())
                session.rollback()
                node_id = facts.get(STORAGE_ID)
                problem = (
                    None
                    if node_id is None
                    else storage_problem(storage, node_id, facts.get(STORAGE_PATH))
                )
            except BaseException:
                with self._lock:
                    self._looking = False
                    self._due = 0.0  # the next claim looks again
                raise
            with self._lock:
                self._looking = False
                if number < self._current:
                    # Begun before a reload: not the running configuration's findings.
                    self._due = 0.0
                else:
                    self._applied = number
                    self._look_cards(facts)
                    self._look_storage("" if problem is None else str(problem), storage)
        with self._lock:
            if self._applied < self._current or self.storage_problem:
                return [kind for kind in kinds if kind in STORAGE_FREE_KINDS]
            if self.card_problem:
                return [kind for kind in kinds if kind not in MODEL_KINDS]
            return kinds

    def _look_cards(self, facts: dict[str, str]) -> None:
        published = published_cards(facts)
        differences = [] if published is None else card_differences(published, self.own_cards)
        card_problem = "; ".join(differences)
        if card_problem != self.card_problem:
            if card_problem:
                log.error(
                    "worker %s takes no analyses until its model cards match serve's: %s; "
                    "give it the node's cards and reload it (its export and notification "
                    "jobs it still runs)",
                    self.owner,
                    card_problem,
                )
            else:
                log.info("worker %s: its model cards match serve's; it takes analyses", self.owner)
            self.card_problem = card_problem

    def _look_storage(self, problem: str, storage: Path) -> None:
        if problem != self.storage_problem:
            if problem:
                log.error("worker %s takes no jobs but notifications: %s", self.owner, problem)
            else:
                log.info(
                    "worker %s: storage folder %s is the node's again; it takes jobs",
                    self.owner,
                    storage,
                )
            self.storage_problem = problem


def publish_serve_facts(session: Session, storage: Path, cards: Iterable[ModelCard]) -> None:
    """What serve publishes at start: its storage folder's id and its cards."""
    publish_storage(session, storage)
    publish_cards(session, cards)
