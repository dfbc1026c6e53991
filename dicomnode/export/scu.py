"""Send result objects to a destination by C-STORE (Storage SCU)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicomnode.config import Destination
from dicomnode.tls import destination_tls_args, handshake_failure

log = logging.getLogger("dicomnode.export")

# Transfer syntaxes that pynetdicom converts a decoded data set between (explicit and implicit
# VR of one byte order; compressed and big endian data are sent as they are).
CONVERTIBLE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# C-STORE statuses of an object the destination keeps: success, and the warnings coercion of
# data elements, elements discarded, data set does not match the SOP class.
STORED = (0x0000, 0xB000, 0xB006, 0xB007)

# pynetdicom's loggers that report why an association failed: its request (connect,
# negotiation) or, once established, its messages (DIMSE timeout, connection closed, abort).
ASSOCIATION_LOGGERS = (
    "pynetdicom.transport",
    "pynetdicom.acse",
    "pynetdicom.dul",
    "pynetdicom.fsm",
    "pynetdicom.association",
    "pynetdicom.dimse",
    "pynetdicom.dimse_messages",
    "pynetdicom.dsutils",
    "pynetdicom.events",
    "pynetdicom.pdu",
    "pynetdicom.presentation",
)
# The line pynetdicom logs before the one that says why it could not connect.
_UNABLE_TO_CONNECT = "Association request failed: unable to connect to remote"
# How a TLS error (a failed handshake) is taken from the traceback pynetdicom logs for it.
_TLS_FAILED = "TLS error: "


class ExportError(Exception):
    """The destination did not take the object; the export job retries later."""


class DestinationUnavailable(ExportError):
    """The destination could not be reached, or the association ended before it answered:
    it refused nothing, and the export is retried for as long as that takes.

    ``reason`` is the message without the destination's name, for a caller that names it
    itself (``dicomnode destinations echo``); by default the whole message."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class DestinationOutOfResources(DestinationUnavailable):
    """The destination answered a C-STORE with 0xA7xx, Refused: Out of Resources (its disk
    is full): a transient status (PS3.4), so the export waits and is retried as for a
    destination that is down, using none of its attempts, unless the destination stores other
    objects meanwhile (:mod:`dicomnode.export.jobs` then takes it for a refusal of this
    object, as a PACS filter that refuses one SOP class answers); other failure statuses
    refuse the object."""


class ContextsNotAccepted(ExportError):
    """The destination accepted the association but none of the presentation contexts
    proposed (pynetdicom then aborts it): it refuses those SOP classes (or transfer syntaxes),
    it is not down. Each object of them fails as one whose context was rejected in an
    association that carried others: retried with backoff, dead-lettered after its attempts.

    ``reason`` is the message without the destination's name, as for
    :class:`DestinationUnavailable`."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def out_of_resources(status: int) -> bool:
    """Whether a C-STORE status is one of PS3.4's 0xA7xx, Refused: Out of Resources."""
    return status & 0xFF00 == 0xA700


def describe(destination: Destination) -> str:
    """How logs and errors name a destination: ``name (AE@host:port)``."""
    return f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"


class _AssociationLines(logging.Filter):
    """Takes the warnings and errors pynetdicom logs for an export's association (from the
    requesting thread and the association's own threads), for the export's error.

    A destination that is down made pynetdicom log two ERROR lines per attempt ("Association
    request failed: unable to connect to remote", "TCP Initialisation Error: ...") that name
    no destination, and one that stops answering or goes away after accepting the association
    one more ("DIMSE timeout reached while waiting for message response", "Connection closed
    while waiting for DIMSE message"), besides the node's own line that names it. Installed
    once on :data:`ASSOCIATION_LOGGERS` (a filter on a logger sees only what that logger logs,
    not its children's records); it touches nothing logged outside :meth:`taking`, so the
    same process's Storage SCP and other associations log as before.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        # Lines taken so far per AE (by id) requesting an association now, and the threads
        # that request them.
        self._lines: dict[int, list[str]] = {}
        self._requesters: dict[int, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True  # pynetdicom's narration, shown when the node debugs
        thread = threading.current_thread()
        with self._lock:
            if not self._lines:
                return True
            key = self._requesters.get(thread.ident or 0)
            if key is None:
                # pynetdicom's DUL thread (it connects) has an ``assoc``, the association's
                # reactor thread is the Association, which has an ``ae``.
                assoc = getattr(thread, "assoc", thread)
                key = id(getattr(assoc, "ae", None))
            lines = self._lines.get(key)
            if lines is None:
                return True
            # pynetdicom logs a failed TLS handshake's traceback: its reason is kept, in one
            # line, and the traceback goes nowhere.
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, ssl.SSLError):
                lines.append(_TLS_FAILED + handshake_failure(exc))
            else:
                lines.append(record.getMessage())
            return False

    @contextmanager
    def taking(self, ae: AE) -> Iterator[list[str]]:
        """Take what is logged at WARNING or above for ``ae``'s association, requested and
        used from this thread; yields the list the lines go to."""
        lines: list[str] = []
        thread = threading.get_ident()
        with self._lock:
            self._lines[id(ae)] = lines
            self._requesters[thread] = id(ae)
        try:
            yield lines
        finally:
            with self._lock:
                del self._lines[id(ae)]
                del self._requesters[thread]


_ASSOCIATION_LINES = _AssociationLines()
for _name in ASSOCIATION_LOGGERS:
    logging.getLogger(_name).addFilter(_ASSOCIATION_LINES)


def why_not_associated(lines: Sequence[str]) -> str:
    """Why an association request failed, from what pynetdicom logged for it (the connect
    error, the rejection's result, source and reason), or what the caller can say without."""
    said = [
        line for line in lines if line != _UNABLE_TO_CONNECT and not line.startswith(_TLS_FAILED)
    ]
    return "; ".join(said) or "peer down or refused"


def offered_syntaxes(syntax: str) -> list[str]:
    """Transfer syntaxes to propose for a file in ``syntax``: its own first, and for explicit
    or implicit VR little endian the other one too, which pynetdicom converts the file to
    where the destination accepts only that."""
    if syntax not in CONVERTIBLE:
        return [syntax]
    return [syntax, *(other for other in CONVERTIBLE if other != syntax)]


def _send_at_once(event: evt.Event) -> None:
    """Turn Nagle's algorithm off on an association's socket as it connects.

    A C-STORE request goes out as a command PDU and then the dataset's PDUs; with Nagle's
    algorithm the kernel holds a small dataset PDU until the peer acknowledges the command
    PDU, and a peer waiting for the whole message delays that acknowledgement (Linux: up to
    40 ms). Every small object (an SR, a KOS) then took ~40 ms longer to send.
    Over DICOM TLS the socket is an ``ssl.SSLSocket``, whose option is its TCP socket's.
    """
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextmanager
def associate(
    destination: Destination,
    calling_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    timeout: float = 30.0,
    base_dir: Path | None = None,
) -> Iterator[tuple[Association, list[str]]]:
    """An association from ``calling_ae`` to ``destination``, proposing ``contexts`` (abstract
    syntax, transfer syntaxes), released (or waited for, if it ended otherwise) at the end.

    Yields the established association and the list that what pynetdicom logs for it at
    WARNING or above (which names no destination: a DIMSE timeout, the connection closed) is
    taken into meanwhile, instead of its log; those lines are logged here at DEBUG at the end.
    ``timeout`` is the ACSE, DIMSE and network timeout and the longest wait for the TCP
    connection and TLS handshake. Raises DestinationUnavailable, saying why, when no
    association is made: the connect error, the rejection's result, source and reason, a
    failed TLS handshake (or TLS files that cannot be loaded).

    With ``tls = true`` the association is DICOM TLS (:func:`dicomnode.tls.destination_context`;
    its relative paths against ``base_dir``, the installation's folder, by default the current
    one).
    """
    where = describe(destination)
    tls_args = None
    if destination.tls:
        try:
            tls_args = destination_tls_args(destination, base_dir or Path.cwd())
        except ValueError as exc:
            reason = f"TLS cannot be set up: {exc}"
            raise DestinationUnavailable(
                f"TLS to {where} cannot be set up: {exc}", reason
            ) from None
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    # pynetdicom's connect (the TLS handshake in it) otherwise waits as long as the system
    # lets it: ~2 min for a firewalled PACS that drops the SYN, for ever for one that accepts
    # the connection and says nothing in the handshake; an export thread waited with it.
    ae.connection_timeout = timeout
    for abstract_syntax, syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, list(syntaxes))
    with _ASSOCIATION_LINES.taking(ae) as lines:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _send_at_once)],
            tls_args=tls_args,
        )
        accepted = assoc.is_established
        # An A-ASSOCIATE-AC whose presentation contexts were all rejected: pynetdicom aborts
        # the association and logs "No accepted presentation contexts".
        contexts_refused = (
            not accepted
            and not assoc.is_rejected
            and bool(assoc.rejected_contexts)
            and not assoc.accepted_contexts
        )
        try:
            if accepted:
                yield assoc, lines
        finally:
            if assoc.is_established:
                assoc.release()
            # What its reactor thread logs as an association that was not released ends (a
            # network timeout, an abort) is taken too.
            if not assoc.is_released and assoc.is_alive():
                assoc.join(timeout)
            for line in lines:
                log.debug("association to %s: pynetdicom: %s", where, line)
    if contexts_refused:
        reason = f"association not accepted ({why_not_associated(lines)})"
        raise ContextsNotAccepted(f"{where}: {reason}", reason)
    if not accepted:
        handshake = next((line for line in lines if line.startswith(_TLS_FAILED)), None)
        if handshake is not None:
            why = handshake.removeprefix(_TLS_FAILED)
            raise DestinationUnavailable(
                f"TLS handshake with {where} failed: {why}", f"TLS handshake failed: {why}"
            )
        reason = f"association not accepted ({why_not_associated(lines)})"
        raise DestinationUnavailable(f"{where}: {reason}", reason)


def send_file(
    path: Path,
    destination: Destination,
    calling_ae: str,
    timeout: float = 30.0,
    base_dir: Path | None = None,
) -> None:
    """C-STORE one DICOM file to ``destination``; raises ExportError unless it answers 0x0000
    (or a warning status)."""
    outcome = send_files([path], destination, calling_ae, timeout, base_dir)[0]
    if outcome is not None:
        raise outcome


def send_files(
    paths: Sequence[Path],
    destination: Destination,
    calling_ae: str,
    timeout: float = 30.0,
    base_dir: Path | None = None,
) -> list[Exception | None]:
    """C-STORE DICOM files to ``destination`` over one association, in order.

    Returns per file None when the destination took it, else why not: the file cannot be
    read, the destination accepts neither its SOP class nor its transfer syntax (also where
    it accepted the association with none of the contexts proposed: an ExportError per file,
    not an outage), it answered a failure status, or (:class:`DestinationUnavailable`) the
    association ended before the file was sent or its response came, or it answered 0xA7xx
    (:class:`DestinationOutOfResources`); a failure status for one file does not stop the
    files after it being sent. Raises DestinationUnavailable when no association is made
    (the destination is down or rejects it), saying why. What pynetdicom logs as warnings or
    errors for the association, which name no destination (a connect error, a DIMSE
    timeout), is logged here at DEBUG instead, and said in the reason. Files are read one at
    a time as they are sent (their headers first, for the presentation contexts).

    With ``tls = true`` the association is DICOM TLS (:func:`dicomnode.tls.destination_context`;
    its relative paths against ``base_dir``, the installation's folder, by default the current
    one); a handshake that fails (a certificate the destination's CA did not sign, one that
    does not name its host) raises DestinationUnavailable that says so in one line, as does a
    certificate or CA file that cannot be loaded.
    """
    where = describe(destination)
    outcomes: list[Exception | None] = [None] * len(paths)
    # Per readable file: its SOP class and transfer syntax, a presentation context to propose.
    contexts: dict[int, tuple[str, str]] = {}
    for index, path in enumerate(paths):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            contexts[index] = (header.SOPClassUID, header.file_meta.TransferSyntaxUID)
        except Exception as exc:  # missing, unreadable or incomplete: only this file fails
            outcomes[index] = exc
    if not contexts:
        return outcomes
    requested = [
        (sop_class, offered_syntaxes(syntax))
        for sop_class, syntax in sorted(set(contexts.values()))
    ]
    try:
        with associate(destination, calling_ae, requested, timeout, base_dir) as (assoc, lines):
            _send_all(assoc, paths, contexts, outcomes, where, lines)
    except ContextsNotAccepted:
        # Not an outage: each object is refused as where its context alone was rejected.
        for index, (sop_class, syntax) in contexts.items():
            outcomes[index] = ExportError(f"{where}: {_what(sop_class, syntax)} not accepted")
    return outcomes


def _what(sop_class: str, syntax: str) -> str:
    """An object's SOP class and transfer syntax as errors name them."""
    return f"{UID(sop_class).name} in {UID(syntax).name}"


def _send_all(
    assoc: Association,
    paths: Sequence[Path],
    contexts: dict[int, tuple[str, str]],
    outcomes: list[Exception | None],
    where: str,
    lines: list[str],
) -> None:
    """C-STORE the readable files (``contexts``) on an established association, each one's
    outcome into ``outcomes``. A failure status for one (out of resources too: a PACS filter
    answers 0xA700 for a SOP class it refuses) does not stop the others being sent."""
    keep_responses(assoc)
    for index in contexts:
        outcomes[index] = _store(assoc, paths[index], where, lines)


def keep_responses(assoc: Association) -> None:
    """Make the association's reactor give back any response it takes off the DIMSE queue.

    pynetdicom's ``send_c_store`` pauses the association's reactor before sending and waits
    for the response on the DIMSE queue, but the pause is a flag that the reactor sets before
    it blocks and clears after it wakes: a send that starts in that instant sees it paused
    while it is not, and when the peer answers quickly the reactor takes the response, logs
    "Received unexpected C-STORE service message" and drops it. The send then waits out the
    DIMSE timeout and aborts the association, failing its remaining objects (seen here in
    benchmark runs sending a study's 14 objects to a dcmtk storescp: about 1 association in 200
    with one worker process, 2 in 60 with two).
    An association that only sends (an export, the demo's modality) serves no requests, so a
    response the reactor takes is put back for the send waiting on it; anything else goes to
    pynetdicom as before. Call it once the association is established, before the first send.
    """
    serve = assoc._serve_request

    def keep(msg: Any, context_id: int) -> None:
        if msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
        else:
            serve(msg, context_id)

    assoc._serve_request = keep  # type: ignore[method-assign]


def _store(assoc: Association, path: Path, where: str, lines: list[str]) -> Exception | None:
    """C-STORE one file on an established association; None when the peer took it. Without
    a response, says why from what pynetdicom logged meanwhile (``lines``)."""
    if not assoc.is_established:
        return DestinationUnavailable(f"{where}: association ended before {path.name} was sent")
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # the file changed since its header was read
        return exc
    what = _what(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    said = len(lines)
    try:
        status = assoc.send_c_store(ds)
    except ValueError:  # no accepted presentation context for it
        return ExportError(f"{where}: {what} not accepted")
    except RuntimeError:
        if assoc.is_established:
            raise
        # The peer closed or aborted the association since the check above.
        return DestinationUnavailable(f"{where}: association ended before {path.name} was sent")
    code = getattr(status, "Status", None)
    if code is None:
        why = f" ({'; '.join(lines[said:])})" if lines[said:] else ""
        return DestinationUnavailable(f"{where}: no C-STORE response for {ds.SOPInstanceUID}{why}")
    if out_of_resources(code):
        return DestinationOutOfResources(
            f"{where}: out of resources (C-STORE status 0x{code:04X}) for {ds.SOPInstanceUID}"
        )
    if code not in STORED:
        return ExportError(f"{where}: C-STORE status 0x{code:04X} for {ds.SOPInstanceUID}")
    return None
