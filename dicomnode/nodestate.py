"""What the node's processes on every host share besides the jobs, kept in the database's
``node_facts`` table: the id of the node's storage folder and the model cards serve runs.

A worker on another host reads the received images and writes the result objects under its
own ``[storage] path``, and runs its own model cards: a folder that is not the node's (not
mounted, another path than serve's) failed every analysis or filed result files outside the
node's storage, and a worker without one of serve's cards triaged studies without that
model, quietly. So:

- ``dicomnode serve`` writes a random id once into :data:`STORAGE_MARKER` at the root of its
  storage folder and publishes it, with its model cards (name, version and a digest of each
  card), at its start and at each reload;
- a worker refuses to start where its storage folder does not hold the marker with the
  published id (:class:`StorageMismatch`); with none published yet (no serve ever ran on the
  database) the first worker publishes its folder's, making the marker where there is none;
- a running worker looks again at most every :data:`CHECK_SECONDS` (:class:`NodeCheck`):
  with cards other than the published ones it takes no analyse or results jobs (their
  exports and notifications it still runs), with another storage id no jobs at all, one
  log line when that starts and one when it ends.
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
MODEL_CARDS = "model_cards"
# How often a running worker reads the facts again (one small query).
CHECK_SECONDS = 15.0
# Job kinds that run the models.
MODEL_KINDS = frozenset({"analyse", "results"})


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


def publish_storage(session: Session, storage: Path) -> str:
    """Serve's storage folder is the node's: its id (a marker made where there is none)
    published, replacing another (with a WARNING: workers on that folder then stop)."""
    storage_id = make_storage_marker(storage)
    before = read_facts(session).get(STORAGE_ID)
    _publish(session, STORAGE_ID, storage_id)
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


def storage_problem(storage: Path, node_id: str) -> StorageMismatch | None:
    """Why ``storage`` is not the folder of storage id ``node_id`` (None: it is)."""
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
    """A worker's start: its storage folder must be the node's (:class:`StorageMismatch`
    says why not). With no storage published yet (no serve has run on this database), this
    folder's id is published, its marker made where there is none. Returns the id."""
    node_id = read_facts(session).get(STORAGE_ID)
    session.commit()
    if node_id is None:
        try:
            own = make_storage_marker(storage)
        except OSError as exc:
            raise StorageMismatch(
                f"storage folder {storage}: cannot make its {STORAGE_MARKER} file "
                f"({exc.strerror or exc}); check [storage] path and the folder's owner and mode"
            ) from None
        node_id = _publish(session, STORAGE_ID, own, replace=False)
    problem = storage_problem(storage, node_id)
    if problem is not None:
        raise problem
    return node_id


class NodeCheck:
    """Whether a worker's model cards and storage folder are the node's, read again from the
    database at most every :data:`CHECK_SECONDS`; logs when that changes."""

    def __init__(self, owner: str, storage: Path, cards: Iterable[ModelCard]):
        self.owner = owner
        self.storage = storage
        self.own_cards = card_identities(cards)
        self._lock = threading.Lock()
        self._due = 0.0  # monotonic time of the next look
        # What the last look found wrong (one line each while it lasts).
        self.card_problem = ""
        self.storage_problem = ""

    def cards_changed(self, cards: Iterable[ModelCard]) -> None:
        """The worker reloaded: compare its new cards at its next claim."""
        with self._lock:
            self.own_cards = card_identities(cards)
            self._due = 0.0

    def claimable(self, session: Session, kinds: list[str]) -> list[str]:
        """The ``kinds`` this worker may claim now: none while its storage folder is not the
        node's, no analyse or results jobs while its cards are not serve's."""
        with self._lock:
            if time.monotonic() >= self._due:
                # As the claim's look for due jobs: without SQLite's write lock, and its read
                # transaction ended.
                connection = session.connection(execution_options=READ_ONLY)
                facts = dict(connection.execute(select(NodeFact.name, NodeFact.value)).all())
                session.rollback()
                self._look(facts)
                self._due = time.monotonic() + CHECK_SECONDS
            if self.storage_problem:
                return []
            if self.card_problem:
                return [kind for kind in kinds if kind not in MODEL_KINDS]
            return kinds

    def _look(self, facts: dict[str, str]) -> None:
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
        node_id = facts.get(STORAGE_ID)
        problem = None if node_id is None else storage_problem(self.storage, node_id)
        storage_problem_text = "" if problem is None else str(problem)
        if storage_problem_text != self.storage_problem:
            if storage_problem_text:
                log.error("worker %s takes no jobs: %s", self.owner, storage_problem_text)
            else:
                log.info(
                    "worker %s: storage folder %s is the node's again; it takes jobs",
                    self.owner,
                    self.storage,
                )
            self.storage_problem = storage_problem_text


def publish_serve_facts(session: Session, storage: Path, cards: Iterable[ModelCard]) -> None:
    """What serve publishes at start: its storage folder's id and its cards."""
    publish_storage(session, storage)
    publish_cards(session, cards)
