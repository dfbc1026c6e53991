"""The DICOM listener: Storage SCP and Verification SCP on pynetdicom.

The handlers are thin: each C-STORE is parsed and checked, made durable by ``spool``, and
only then answered with 0x0000; its index rows are queued for the writer (``indexer``),
which commits them before the association's release is answered. Nothing here waits on
inference. Who may associate, and how many at once, is decided in ``admission``.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pydicom
import pydicom.config
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

from dicomnode import metrics
from dicomnode.config import NodeSettings, Settings
from dicomnode.folders import make_folders
from dicomnode.ingest import deletion, sink
from dicomnode.ingest.addresses import AddressSlots
from dicomnode.ingest.admission import AdmissionControl
from dicomnode.ingest.arrival import Arrival, InstanceFacts, instance_facts
from dicomnode.ingest.balance import SharedSocketServer
from dicomnode.ingest.incoming import (
    SPARES,
    IncomingFile,
    Limits,
    incoming_folder,
    install,
    read_received,
    write_incoming,
)
from dicomnode.ingest.negotiation import sender_order
from dicomnode.ingest.reactor import (
    BlockingAcceptor,
    DeferredHandshake,
    EventDrivenRequestHandler,
)
from dicomnode.ingest.sink import AssociationEnded, IndexSink
from dicomnode.ingest.slots import AssociationSlots
from dicomnode.ingest.spool import (
    SpoolError,
    free_bytes,
    instance_path,
    sync_file,
    sync_folder,
)
from dicomnode.ingest.validate import InvalidDataset, check_dataset
from dicomnode.tls import load_ca, load_cert_chain

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("dicomnode.ingest")

# Keep identifiers (patient data) out of pynetdicom's own logs.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# pynetdicom validates every UID of every A-ASSOCIATE-RQ (each proposed context's abstract
# and transfer syntaxes: ~400 from dcmtk's storescu), the same few hundred association after
# association; its documented hook lets the answers be remembered (they depend on nothing but
# the UID: ENFORCE_UID_CONFORMANCE is never changed here).
_config.VALIDATORS["UI"] = functools.lru_cache(maxsize=4096)(_config.VALIDATORS["UI"])
# pydicom's value-validation warnings quote the values (patient names, IDs) into the log;
# received bytes are stored as sent, so ingest has no use for them.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_SOP_CLASS_MISMATCH = 0xA900
# Element values larger than this are not read into memory when a received file is parsed.
DEFER_BYTES = 64 * 1024
# The data set's fsync runs here, overlapped with parsing (it waits on the disk, not the GIL).
_SYNC = ThreadPoolExecutor(max_workers=16, thread_name_prefix="spool-sync")


@dataclass
class _AssociationLog:
    calling_ae: str
    address: str
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0
    study_uids: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    # The index ticket of the last instance stored (0: none), waited for at release.
    ticket: int = 0


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The listener's TLS context from ``[tls]``; ValueError names the file that fails."""
    tls = settings.tls
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_cert_chain(
        context, settings.resolve(tls.cert), settings.resolve(tls.key), "[tls] cannot load cert"
    )
    if tls.ca is not None:
        load_ca(context, settings.resolve(tls.ca), "[tls] cannot load ca")
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def _pynetdicom_debug() -> bool:
    return logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)


class ListenerAE(AE):
    """pynetdicom's AE, whose own association limit (``maximum_associations``, checked as
    each association request is answered) counts associations, not connections: pynetdicom
    counts every acceptor thread, also those of connections that have sent no association
    request yet, so that one host's silent connections had every other sender rejected
    ("local limit exceeded") until they timed out; and the threads of associations already
    released or aborted, still stopping, so that a sender at the limit that released and at
    once associated again was rejected."""

    @property
    def active_associations(self) -> list[Association]:
        """Association threads, less the acceptors still waiting for their request (which
        also keep the timeouts they had when accepted if the AE's are changed) and those
        whose association has ended (released or aborted: the thread is stopping)."""
        return [
            assoc
            for assoc in super().active_associations
            if not (assoc.is_acceptor and assoc.requestor.primitive is None)
            and not (assoc.is_released or assoc.is_aborted)
        ]


def apply_timeouts(ae: AE, node: NodeSettings) -> None:
    """``[node]``'s ACSE and network timeouts onto the listener's AE."""
    ae.acse_timeout = node.acse_timeout_seconds
    ae.network_timeout = node.network_timeout_seconds


class AdmittingServer(AssociationServer):
    """An association server that offers each accepted connection to its
    ``admit_connection(client_address) -> bool`` hook (``AdmissionControl``, admission.py)
    in the accepting thread, before any thread serves it, and closes it unserved on False;
    and that tells ``connection_failed(client_address)`` when a connection it admitted fails
    before an association takes it over. Mixed in first: ``class Server(AdmittingServer, ...)``."""

    def verify_request(self, request: object, client_address: tuple) -> bool:
        admit = getattr(self, "admit_connection", None)
        return admit is None or admit(client_address)

    def handle_error(self, request: object, client_address: tuple) -> None:
        failed = getattr(self, "connection_failed", None)
        if failed is not None:
            failed(client_address)
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class _OwnSocketServer(
    BlockingAcceptor, AdmittingServer, ThreadedAssociationServer, DeferredHandshake
):
    """pynetdicom's threaded server, each TLS handshake in its connection's thread."""


class _SharedSocketServer(BlockingAcceptor, AdmittingServer, SharedSocketServer, DeferredHandshake):
    """The server on the socket shared by the listeners (balance.py), each TLS handshake in
    its connection's thread."""


class StorageSCP:
    """Owns the pynetdicom AE and the per-association bookkeeping."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session] | None,
        *,
        slots: AssociationSlots | None = None,
        connections: AssociationSlots | None = None,
        addresses: AddressSlots | None = None,
        listening_fd: int | None = None,
        index: IndexSink | None = None,
    ):
        """``slots``: the node-wide association count shared with other listener processes
        (None: this process's own limit only); ``addresses``: the associations per peer
        address, shared with them likewise (None: counted in this process only);
        ``listening_fd``: the socket shared with them (None: bind ``[node] host:port``
        here); ``connections``: the connections each of them serves, so that the least busy
        one accepts the next; ``index``: where the index rows go (None: a writer thread
        here, on ``sessions``, which only it uses)."""
        if index is None and sessions is None:
            raise ValueError("a listener needs database sessions or an index to hand rows to")
        self.settings = settings
        self.sessions = sessions
        if index is None:
            # Rows written here (tests, tools, a stand-alone listener): the database layer
            # is loaded only then.
            from dicomnode.ingest.indexer import LocalIndex

            index = LocalIndex(self._sessions, lambda: self.settings)
        self.index: IndexSink = index
        self.storage = settings.storage_path
        self.slots = slots
        self.connections = connections
        self.listening_fd = listening_fd
        # Who may associate, and how many at once (admission.py).
        self.admission = AdmissionControl(
            lambda: self.settings, slots=slots, connections=connections, addresses=addresses
        )
        self._associations: dict[int, _AssociationLog] = {}
        self._lock = threading.Lock()
        self._server = None
        self.ae = self._make_ae()

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """Take new settings (a reload): one assignment, so an association reads either the
        old or the new; and the ``[node]`` timeouts onto the AE, which each connection reads
        as it is accepted (pynetdicom also hands them to the established associations)."""
        self._settings = settings
        ae = getattr(self, "ae", None)
        if ae is not None:
            apply_timeouts(ae, settings.node)

    def _sessions(self) -> sessionmaker[Session]:
        if self.sessions is None:
            raise RuntimeError("this listener hands its rows to an index and has no sessions")
        return self.sessions

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = ListenerAE(ae_title=node.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu
        ae.require_called_aet = False
        apply_timeouts(ae, node)
        return ae

    def _limits(self) -> Limits:
        return Limits(self.settings.node.max_instance_bytes, self.settings.storage.min_free_bytes)

    # Event handlers ---------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        # At EVT_REQUESTED only the A-ASSOCIATE-RQ primitive carries the AE titles.
        calling_ae = str(requestor.primitive.calling_ae_title).strip()
        # The title this listener answers as: [node] ae_title as it was at start (a reload
        # that changes it takes effect at the restart).
        own_ae = str(self.ae.ae_title).strip()
        if not self.admission.admit_association(event, calling_ae, own_ae):
            return
        with self._lock:
            self._associations[id(event.assoc)] = _AssociationLog(calling_ae, requestor.address)
        # Each context in the transfer syntax the sender prefers (see negotiation.py).
        acceptor = event.assoc.acceptor
        acceptor.supported_contexts = sender_order(
            requestor.primitive.presentation_context_definition_list,
            acceptor.supported_contexts,
        )

    def _association_ended(self, assoc) -> None:
        """The association's thread ends (the reactor's ``association_ended`` hook): its
        counts are freed, and one that ended neither released, aborted nor rejected (an
        exception in pynetdicom's threads) is logged, counted aborted and its partial data
        set removed, not kept for the life of the process."""
        self.admission.release(assoc)
        with self._lock:
            record = self._associations.pop(id(assoc), None)
        if record is None:
            return
        self._discard_partial(assoc)
        metrics.count_association("aborted")
        log.warning(
            "association ended without release or abort: listener=%s calling_ae=%s "
            "address=%s stored=%d refused=%d",
            self.slots.index if self.slots is not None else "-",
            record.calling_ae,
            record.address,
            record.stored,
            record.refused,
        )

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom rejected the association after ``_on_requested`` admitted it (its own
        count of this process's associations, ``max_associations``, is full)."""
        with self._lock:
            record = self._associations.pop(id(event.assoc), None)
        answer = event.assoc.acceptor.primitive
        source, diagnostic = (
            getattr(answer, "result_source", None),
            getattr(answer, "diagnostic", None),
        )
        limit = (source, diagnostic) == (0x03, 0x02)  # local limit exceeded
        metrics.count_rejection("association_limit" if limit else "protocol")
        log.warning(
            "association rejected: calling AE %r from %s, %s",
            record.calling_ae if record is not None else "-",
            event.assoc.requestor.address,
            "this listener serves [node] max_associations already"
            if limit
            else f"result source {source}, diagnostic {diagnostic}",
        )

    @staticmethod
    def _discard_partial(assoc) -> None:
        # A data set cut off by an abort is still in the incoming folder.
        partial = getattr(getattr(assoc.dimse, "message", None), "_data_set_file", None)
        if isinstance(partial, IncomingFile):
            partial.discard()

    def _on_ended(self, event: evt.Event, outcome: str) -> None:
        # Its counts are free once it has ended, not when its thread has stopped its DUL
        # (a sender that associates again at once is not refused meanwhile).
        self.admission.release(event.assoc)
        self._discard_partial(event.assoc)
        with self._lock:
            record = self._associations.pop(id(event.assoc), None)
        if record is None:
            return
        metrics.count_association(outcome)
        log.info(
            "association %s: listener=%s calling_ae=%s address=%s stored=%d duplicates=%d "
            "refused=%d bytes=%d seconds=%.2f",
            outcome,
            self.slots.index if self.slots is not None else "-",
            record.calling_ae,
            record.address,
            record.stored,
            record.duplicates,
            record.refused,
            record.bytes,
            time.monotonic() - record.started,
        )
        if record.study_uids:
            try:
                self.index.add(
                    AssociationEnded(tuple(sorted(record.study_uids)), datetime.now(UTC))
                )
            except OSError:
                # The studies still become ready from their last instance's deadline.
                log.exception("could not restart the quiet period after %s", outcome)

    def _before_release(self, assoc) -> None:
        """Answer a release only once the association's index rows are committed."""
        record = self._associations.get(id(assoc))
        if record is None or not record.ticket:
            return
        if not self.index.wait(record.ticket, sink.RELEASE_WAIT_SECONDS):
            log.warning(
                "association from %s released before its index rows were written (database "
                "unavailable); they stay queued",
                record.calling_ae,
            )

    def handle_store(self, event: evt.Event) -> int:
        """The C-STORE handler: a DIMSE status; never raises (pynetdicom would answer 0xC211)."""
        try:
            return self.store(event)
        except Exception as exc:
            log.error("C-STORE handler error (%s); answered cannot understand", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND

    def store(self, event: evt.Event) -> int:
        """Store one C-STORE request and return its DIMSE status (raises only on a bug)."""
        record = self._associations.get(id(event.assoc)) or _AssociationLog(
            event.assoc.requestor.ae_title.strip(), event.assoc.requestor.address
        )
        stored_bytes = record.bytes
        status = self._store(event, record)
        if status != STATUS_SUCCESS:
            record.refused += 1
        metrics.count_store(status, record.bytes - stored_bytes)
        return status

    def _received(self, event: evt.Event) -> IncomingFile:
        """The received data set as a file in the incoming folder (streamed or in memory)."""
        received = getattr(event.request, "_dataset_file", None)
        if isinstance(received, IncomingFile):
            received.close()
            return received
        # Received into memory (chunked receiving off, or an offline event): spill it.
        return write_incoming(
            incoming_folder(self.storage),
            self._limits(),
            event.encoded_dataset(include_meta=True),
        )

    def _store(self, event: evt.Event, record: _AssociationLog) -> int:
        received = self._received(event)
        try:
            return self._store_received(event, record, received)
        finally:
            # Moved into the spool on success; otherwise (refused, duplicate) removed.
            received.discard()

    def _store_received(
        self, event: evt.Event, record: _AssociationLog, received: IncomingFile
    ) -> int:
        calling_ae = record.calling_ae
        affected = str(event.request.AffectedSOPInstanceUID or "")
        if received.refusal is not None:
            log.warning(
                "refused %s from %s: %d bytes received, %s",
                affected,
                calling_ae,
                received.size,
                received.refusal,
            )
            return STATUS_OUT_OF_RESOURCES
        if received.size > self.settings.node.max_instance_bytes:
            log.warning(
                "refused %s from %s: %d bytes exceeds [node] max_instance_bytes",
                affected,
                calling_ae,
                received.size,
            )
            return STATUS_OUT_OF_RESOURCES
        if not self.index.healthy:
            log.error("refused %s from %s: database unavailable", affected, calling_ae)
            return STATUS_OUT_OF_RESOURCES
        if free_bytes(self.storage) < self.settings.storage.min_free_bytes:
            log.error(
                "refused %s from %s: storage %s is below the free-space watermark",
                affected,
                calling_ae,
                self.storage,
            )
            return STATUS_OUT_OF_RESOURCES
        transfer_syntax = str(event.context.transfer_syntax)
        # The received bytes go to stable storage while the header is checked.
        data_synced = _SYNC.submit(sync_file, received.path)
        try:
            # Large values (pixel data) stay on disk; check_dataset bounds them by the file.
            # A deflated data set is inflated in memory: offsets are not file offsets there.
            deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
            dataset = read_received(received, transfer_syntax, None if deflated else DEFER_BYTES)
            # Every element first, so instance_facts below reads decoded values only.
            check_dataset(dataset, transfer_syntax, None if deflated else received.size)
            facts = instance_facts(dataset)
        except (InvalidDataset, ValueError) as exc:
            log.warning("refused %s from %s: cannot understand: %s", affected, calling_ae, exc)
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:
            # pydicom's message may quote element values (patient data): type only.
            log.warning(
                "refused %s from %s: cannot parse dataset (%s)",
                affected,
                calling_ae,
                type(exc).__name__,
            )
            return STATUS_CANNOT_UNDERSTAND
        mismatch = _request_mismatch(event, facts)
        if mismatch is not None:
            status, reason = mismatch
            log.warning("refused %s from %s: %s", affected, calling_ae, reason)
            return status
        try:
            path = instance_path(
                self.storage,
                facts.study_instance_uid,
                facts.series_instance_uid,
                facts.sop_instance_uid,
            )
        except SpoolError as exc:
            log.warning("refused %s from %s: %s", affected, calling_ae, exc)
            return STATUS_CANNOT_UNDERSTAND
        if not path.exists():
            # The data's fsync outside the lock below: retention's deletion waits for no
            # sender's disk. (A duplicate's file is discarded: its data need not be synced.)
            try:
                data_synced.result()
            except OSError as exc:
                log.error("refused %s from %s: cannot store: %s", affected, calling_ae, exc)
                return STATUS_OUT_OF_RESOURCES
        # Not while retention deletes a study: a file at the path then may be one it removes.
        with deletion.receiving(self.storage):
            status = self._place(record, received, data_synced, facts, path, transfer_syntax)
        if status == STATUS_SUCCESS:
            record.study_uids.add(facts.study_instance_uid)
        return status

    def _place(
        self,
        record: _AssociationLog,
        received: IncomingFile,
        data_synced: Future,
        facts: InstanceFacts,
        path: Path,
        transfer_syntax: str,
    ) -> int:
        """Store the received instance at ``path`` (a duplicate: keep the file there) and
        hand its rows to the index writer; a DIMSE status."""
        calling_ae, affected = record.calling_ae, facts.sop_instance_uid
        duplicate = path.exists()
        if duplicate:
            # Duplicate SOP Instance UID: keep the first copy, answer success (as PACS do).
            record.duplicates += 1
            log.info("duplicate %s from %s kept as first received", affected, calling_ae)
            size = path.stat().st_size
        else:
            try:
                data_synced.result()
                received.move_to(path, synced=True)
                sync_folder(path.parent)
            except (OSError, SpoolError) as exc:
                log.error("refused %s from %s: cannot store: %s", affected, calling_ae, exc)
                return STATUS_OUT_OF_RESOURCES
            size = received.size
            record.bytes += size
            record.stored += 1
        arrival = Arrival(facts, str(path), size, transfer_syntax, calling_ae, datetime.now(UTC))
        try:
            # Also for a duplicate: its row may be what a crash left unwritten.
            record.ticket = self.index.add(arrival)
        except OSError as exc:
            # The supervisor's writer is gone (the node is stopping): not acknowledged.
            log.error("refused %s from %s: index unavailable: %s", affected, calling_ae, exc)
            return STATUS_OUT_OF_RESOURCES
        if duplicate:
            # Its (unchanged) rows before a deletion of its study is decided, which waits for
            # this: else the writer would take it, after the deletion, for a new instance
            # whose file is gone. One commit wait per duplicate (a study sent again).
            self.index.wait(record.ticket, sink.RELEASE_WAIT_SECONDS)
        return STATUS_SUCCESS

    # Lifecycle --------------------------------------------------------------------

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_OPEN, self.admission.on_opened),
            (evt.EVT_CONN_CLOSE, self.admission.on_closed),
        ]

    def start(self) -> None:
        """Listen in background threads."""
        node = self.settings.node
        # pynetdicom's standard handlers describe every PDU and DIMSE message for its logger
        # (~8 % of a listener's receiving thread per CT slice), also while that logger
        # discards them (logs.py keeps it at WARNING unless debugging): bound only for debug.
        # The associations and servers made from now on bind them, or not, when created.
        _config.LOG_HANDLER_LEVEL = "standard" if _pynetdicom_debug() else "none"
        make_folders(self.storage)
        install(
            lambda: incoming_folder(self.storage),
            self._limits,
            self.slots.index if self.slots is not None else None,
        )
        tls = tls_context(self.settings) if self.settings.tls.enabled else None
        server: dict = {"server_class": _OwnSocketServer}
        if self.listening_fd is not None:
            # The supervisor's socket, shared with the other listeners (balance.py).
            server = {
                "server_class": _SharedSocketServer,
                "listening_fd": self.listening_fd,
                "connections": self.connections,
            }
        self._server = self.ae.make_server(
            (node.host, node.port),
            evt_handlers=self.handlers(),
            ssl_context=tls,
            request_handler=EventDrivenRequestHandler,
            **server,
        )
        # The server offers it each connection it accepts, and tells it of those that fail
        # before an association takes them over;
        self._server.admit_connection = self.admission.admit_connection
        self._server.connection_failed = self.admission.release_connection
        # the association reactor (reactor.py) calls this before it answers a release,
        self._server.before_release = self._before_release
        # and this when the association's thread ends, however it ended.
        self._server.association_ended = self._association_ended
        # AE.start_server keeps its servers in this list and shutdown() removes them from it.
        self.ae._servers.append(self._server)
        # Blocks until a connection comes or stop() wakes it (BlockingAcceptor).
        threading.Thread(
            target=self._server.serve_forever,
            name="dicom-acceptor",
            daemon=True,
        ).start()
        log.info(
            "listening for DICOM%s as %s on %s:%d (process %d)",
            " over TLS" if tls else "",
            node.ae_title,
            node.host,
            node.port,
            os.getpid(),
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        SPARES.remove()
        self.index.close()


def _request_mismatch(event: evt.Event, facts: InstanceFacts) -> tuple[int, str] | None:
    """The refusal status and reason where the data set, the C-STORE request and its
    presentation context disagree on what is stored (None when they agree). A stored file's
    meta (from the request) and its data set must name the same instance (PS3.10 7.1), and a
    context is negotiated for one SOP Class (PS3.7 9.3.1.1)."""
    requested_class = str(event.request.AffectedSOPClassUID)
    if facts.sop_class_uid != requested_class:
        return STATUS_SOP_CLASS_MISMATCH, "SOP Class UID differs from the request"
    if requested_class != str(event.context.abstract_syntax):
        return STATUS_SOP_CLASS_MISMATCH, "SOP Class differs from the presentation context's"
    if facts.sop_instance_uid != str(event.request.AffectedSOPInstanceUID):
        return STATUS_CANNOT_UNDERSTAND, f"the data set is SOP Instance {facts.sop_instance_uid}"
    return None


def offline_store_event(
    encoded: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    calling_ae: str = "FUZZ",
) -> evt.Event:
    """A C-STORE event as pynetdicom builds it from received bytes, without a network.

    For fuzzing and tests of ``StorageSCP.handle_store`` on arbitrary (malformed) bytes.
    """
    from io import BytesIO
    from types import SimpleNamespace

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.presentation import PresentationContextTuple

    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class_uid
    request.AffectedSOPInstanceUID = sop_instance_uid
    request.Priority = 0
    request.DataSet = BytesIO(encoded)
    requestor = SimpleNamespace(ae_title=calling_ae, address="127.0.0.1")
    context = PresentationContextTuple(1, sop_class_uid, transfer_syntax)
    return evt.Event(
        SimpleNamespace(requestor=requestor),
        evt.EVT_C_STORE,
        {"request": request, "context": context},
    )
