"""Event-driven reactors for the listener's associations (pynetdicom acceptors).

pynetdicom 3.0 runs two polling loops per association. The DUL thread sleeps 1 ms whenever
its socket and queues are idle, and the association thread sleeps 1 ms before each look for
a decoded DIMSE message. One C-STORE crosses them three times (the request's first PDU
arrives, the decoded message is picked up, the response goes out), so every instance waits
for nothing about 1.5 ms on average, and every idle association wakes 2,000 times a second.

Here the DUL thread blocks in ``select`` on the association's socket and a wake-up socket
(nudged when a PDU is queued for sending or the thread is told to stop), and the
association thread blocks on an event that the DUL sets after every state-machine action
but P-DATA that completes no DIMSE message (an instance of 0.5 MB comes in several PDUs).
Both still wake every ``TICK`` seconds for the ARTIM, idle and kill checks that pynetdicom's
loops make. And a PDU is read from the socket into one buffer, not 4 KiB per ``recv`` call
(32 system calls and copies per 128 KiB PDU). And an association starts without a deep copy
of the node's presentation contexts (40 ms of CPU each). And a plain C-STORE response is sent
by the association thread that made it (``send_data_now``), not queued for the DUL thread
and woken for. And a TLS connection's handshake runs in its association's thread, not in the
thread that accepts every connection (``DeferredHandshake``). And a connection's association
request must arrive in full within the ACSE timeout, not only start to (``WholeReadSocket``).
And the thread that accepts connections blocks until one comes or the listener stops, not
waking every 0.1 s to look for a stop (``BlockingAcceptor``). The code is pynetdicom's own
(3.0.4), with the sleeps, the read loop and the copy replaced; tests/test_reactor.py fails
when pynetdicom's originals change, so that they are reviewed again.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import selectors
import socket
import ssl
import threading
import time
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

from dicomnode.ingest.dimse import QuickStoreDIMSE
from dicomnode.ingest.keepalive import enable_keepalive

# The loggers of the pynetdicom modules whose code runs here, so its lines keep their names.
DUL_LOGGER = logging.getLogger("pynetdicom.dul")
log = logging.getLogger("dicomnode.ingest")
ASSOCIATION_LOGGER = logging.getLogger("pynetdicom.association")
# Longest wait of either loop with nothing to do: the granularity of pynetdicom's timers
# (ARTIM, network idle) and of a kill that no nudge announces.
TICK = 0.05
# What a PDU read allocates before any of its data has arrived.
FIRST_READ = 1 << 20
# Largest PDU read when [node] max_pdu sets none for P-DATA, and for the association PDUs,
# which no negotiated maximum bounds (a request proposing every storage class with every
# transfer syntax is ~100 KiB).
ASSOCIATION_PDU_LIMIT = 1 << 20
# The states of an acceptor's DUL before its association request is in.
_BEFORE_REQUEST = frozenset({"Sta1", "Sta2"})
# P-DATA sent by this node (Evt9) or received from the peer (Evt10).
_DATA_EVENTS = frozenset({"Evt9", "Evt10"})
# An unrecognised or invalid PDU received (PS3.8 9.2: the state machine sends an A-ABORT).
_INVALID_PDU = "Evt19"
# pynetdicom's ERROR lines for a PDU its DUL cannot take (dul.py READ_PDU_EXC_C and _F; the
# second followed by the decoding error's traceback). A port scanner or a load balancer's
# HTTP probe gave one per 6 bytes it sent; the node logs one WARNING instead (WakingDUL).
INVALID_PDU_MESSAGES = ("Unknown PDU type received", "Unable to decode the received PDU data")
# pynetdicom's ERROR lines for a connection that ends before a PDU is in (dul.py READ_PDU_EXC_A
# and _D, each followed by the read's exception with a traceback, and _E): the peer closed or
# reset it in the middle of a PDU, or a read timed out. No error of the node: one WARNING.
CUT_PDU_MESSAGES = (
    "Connection closed before the entire PDU was received",
    "The received PDU is shorter than expected",
)
# The transport connection closed (PS3.8 9.2).
_CONNECTION_CLOSED = "Evt17"


class NodeClosed(OSError):
    """A read the node ends (WholeReadSocket) after its own WARNING has said why."""


class WakingDUL(DULServiceProvider):
    """pynetdicom's DUL with the idle sleep replaced by a ``select`` that data wakes."""

    def __init__(self, assoc: Association):
        super().__init__(assoc)
        # Set after every state-machine action: the association reactor's wake-up.
        self.activity = threading.Event()
        self._wake: tuple[socket.socket, socket.socket] | None = None
        # One PDU on the wire at a time: the association thread sends its responses itself.
        self._sending = threading.Lock()
        # What pynetdicom said of the last PDU it could not take (_InvalidPduLines), for the
        # node's one line; whether the decoding error's traceback is still to come.
        self.invalid_pdu = ""
        self.traceback_follows = False
        # The same for a connection that ended in the middle of a PDU: pynetdicom's line and
        # the read's exception (when one follows).
        self.cut_pdu = ""
        self.cut_pdu_error: BaseException | None = None
        self.cut_pdu_error_follows = False

    def nudge(self) -> None:
        """Wake the reactor if it waits (a PDU to send, a kill)."""
        wake = self._wake
        if wake is None:
            return
        # Full (a nudge is pending anyway) or closed (the reactor has ended): no matter.
        with contextlib.suppress(OSError):
            wake[1].send(b"\0")

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.nudge()

    def _send(self, pdu: Any) -> None:
        with self._sending:
            super()._send(pdu)

    def send_data_now(self, primitive: P_DATA) -> None:
        """Send P-DATA from the calling thread (the association's), as the DUL thread's
        DT-1 would (Sta6 + Evt9: send the P-DATA-TF, stay in Sta6), without handing it over
        and waking that thread: one thread switch less per response. Through the DUL as
        before outside Sta6, behind primitives still queued for it, and over TLS (an
        OpenSSL connection is not to be written by one thread while another reads it)."""
        transport = self.socket
        if (
            self.state_machine.current_state == "Sta6"
            and self.to_provider_queue.empty()
            and transport is not None
            and not isinstance(transport.socket, ssl.SSLSocket)
        ):
            self._send(P_DATA_TF(primitive))
        else:
            self.send_pdu(primitive)

    def kill_dul(self) -> None:
        super().kill_dul()
        self.nudge()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.nudge()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def run_reactor(self) -> None:
        """pynetdicom's ``DULServiceProvider.run_reactor`` without the idle sleep."""
        self._idle_timer.start()
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wake = (reader, writer)
        self.assoc._dul_ready.set()
        try:
            while not self._kill_thread:
                # The ARTIM timer's event goes ahead of any other of this loop.
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    # Either encode and send a primitive or receive and decode a PDU.
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    self._abort_after(exc)
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait(reader)
                    continue
                state = self.state_machine.current_state
                self.state_machine.do_action(event)
                if event == _INVALID_PDU:
                    self._close_after_invalid_pdu(state)
                elif event == _CONNECTION_CLOSED and self.cut_pdu:
                    self._closed_in_a_pdu(state)
                if self._worth_a_look(event):
                    self.activity.set()
        finally:
            self._wake = None
            reader.close()
            writer.close()
            self.activity.set()

    def _is_transport_event(self) -> bool:
        """pynetdicom's, but no PDU is read while events wait for the state machine: the
        first bytes can come before the connection's open event is taken (Sta1), and a read
        made then, before the state machine had acted on an invalid PDU, waited for the rest
        of a PDU that would never come (the ACSE timeout) instead of closing."""
        if not self.event_queue.empty():
            return False
        return super()._is_transport_event()

    def _close_after_invalid_pdu(self, state: str) -> None:
        """The peer sent a PDU that is not DICOM or cannot be decoded, in ``state``, and the
        state machine has answered with an A-ABORT (AA-1, AA-7 or AA-8) to wait in Sta13 for
        the peer to close, or for the ARTIM timer (the ACSE timeout). Meanwhile whatever else
        the peer sent was read as more PDUs, one ERROR each (an HTTP request gave six), and a
        part of one held the connection for the network timeout. One WARNING naming the peer;
        before any association request (a port scanner, an HTTP probe) the connection is
        closed now, as the ARTIM timer's expiry would (Sta13 + Evt18: AA-2). Within an
        association the peer is a DICOM application: closing at once, with what it sent
        still unread, would reset the connection (RST) and could lose the A-ABORT it is owed,
        so there Sta13 waits for the peer to close, or for the ARTIM timer, as PS3.8 has it."""
        if state == "Sta13":
            # More of what the peer had in flight after the first invalid PDU, each read as a
            # PDU and answered with an A-ABORT (AA-7): said once, for the first.
            self.invalid_pdu = ""
            self.traceback_follows = False
            return
        requestor = self.assoc.requestor
        before = state in _BEFORE_REQUEST
        log.warning(
            "connection from %s:%s %s: it sent what is not a valid DICOM PDU%s (%s); A-ABORT sent",
            requestor.address,
            requestor.port,
            "closed" if before else "aborted",
            " before any association request" if before else "",
            self.invalid_pdu or "an invalid PDU",
        )
        self.invalid_pdu = ""
        self.traceback_follows = False
        if before and self.state_machine.current_state == "Sta13":
            self.state_machine.do_action("Evt18")
        if before:
            # The association thread waits for the association request (up to the ACSE
            # timeout), which will not come: it ends as if that timeout had run out.
            self.to_user_queue.put(None)

    def _closed_in_a_pdu(self, state: str) -> None:
        """The connection ended before a PDU was in, in ``state``: pynetdicom logged an ERROR
        (with a traceback when the read raised) and the state machine has taken the closed
        connection (Evt17). One WARNING naming the peer instead, none where the node ended
        the read itself (:class:`NodeClosed`: its WARNING said why)."""
        said, error = self.cut_pdu, self.cut_pdu_error
        self.cut_pdu, self.cut_pdu_error, self.cut_pdu_error_follows = "", None, False
        requestor = self.assoc.requestor
        before = " before any association request" if state in _BEFORE_REQUEST else ""
        if isinstance(error, TimeoutError):
            log.warning(
                "connection from %s:%s closed: it sent part of a PDU%s, then nothing for the "
                "network timeout (%s s)",
                requestor.address,
                requestor.port,
                before,
                self.assoc.network_timeout,
            )
        elif not isinstance(error, NodeClosed):
            # "ConnectionResetError: [Errno 104] Connection reset by peer", or what the short
            # read's line says in brackets: "16 of 1006 bytes received".
            why = f"{type(error).__name__}: {error}" if error else said
            if error is None and "(" in said:
                why = said.partition("(")[2].removesuffix(")")
            log.warning(
                "connection from %s:%s closed by the peer in the middle of a PDU%s (%s)",
                requestor.address,
                requestor.port,
                before,
                why,
            )
        if state in _BEFORE_REQUEST:
            # The association thread waits for the association request (up to the ACSE
            # timeout), which will not come: it ends as if that timeout had run out.
            self.to_user_queue.put(None)

    def _worth_a_look(self, event: str) -> bool:
        """Whether the association reactor may find something new after ``event``.

        P-DATA sent (Evt9) or received (Evt10) while established changes nothing it looks
        at unless a received PDU completed a DIMSE message: a 0.5 MB instance comes in
        several PDUs, and waking the reactor for each costs two thread switches for nothing.
        """
        if event not in _DATA_EVENTS or self.state_machine.current_state != "Sta6":
            return True
        return not self.assoc.dimse.msg_queue.empty()

    def _wait(self, reader: socket.socket) -> None:
        """Block until the peer sends, a PDU is queued or a nudge comes (at most TICK)."""
        if not self.to_provider_queue.empty():
            return
        waited: list[Any] = [reader]
        transport = self.socket
        connected = isinstance(transport, AssociationSocket) and transport._is_connected
        if connected and transport.socket is not None:
            waited.append(transport.socket)
        try:
            select.select(waited, [], [], TICK)
        except (OSError, ValueError):
            # The socket closed under us: the next loop's transport check reports it.
            select.select([reader], [], [], 0.001)
        with contextlib.suppress(OSError):
            while reader.recv(4096):
                pass

    def _abort_after(self, exc: Exception) -> None:
        """As pynetdicom does: A-ABORT outside the state machine, stop both reactors."""
        DUL_LOGGER.error("Exception in DUL.run(), aborting association")
        DUL_LOGGER.exception(exc)
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        with self._sending:  # not into the middle of a response the association sends
            self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class _InvalidPduLines(logging.Filter):
    """On pynetdicom's DUL logger: in a WakingDUL's thread, its lines for a PDU it cannot
    take (``INVALID_PDU_MESSAGES`` and the traceback after the second) become DEBUG records,
    shown only when that logger shows DEBUG, and are noted for the node's one WARNING
    (:meth:`WakingDUL._close_after_invalid_pdu`). Other DULs (the export's) keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        dul = threading.current_thread()
        if not isinstance(dul, WakingDUL) or record.levelno <= logging.DEBUG:
            return True
        if isinstance(record.msg, str) and record.msg.startswith(INVALID_PDU_MESSAGES):
            dul.invalid_pdu = record.getMessage()
            dul.traceback_follows = record.msg.startswith(INVALID_PDU_MESSAGES[1])
        elif isinstance(record.msg, str) and record.msg.startswith(CUT_PDU_MESSAGES):
            dul.cut_pdu = record.getMessage()
            dul.cut_pdu_error = None
            dul.cut_pdu_error_follows = record.msg.startswith(CUT_PDU_MESSAGES[0])
        elif dul.traceback_follows and record.exc_info:
            dul.traceback_follows = False
            error = record.exc_info[1]
            dul.invalid_pdu += f": {type(error).__name__}{f': {error}' if str(error) else ''}"[:300]
        elif dul.cut_pdu_error_follows and record.exc_info:
            dul.cut_pdu_error_follows = False
            dul.cut_pdu_error = record.exc_info[1]
        else:
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_INVALID_PDU_LINES = _InvalidPduLines()
if _INVALID_PDU_LINES not in DUL_LOGGER.filters:
    DUL_LOGGER.addFilter(_INVALID_PDU_LINES)


class EventDrivenAssociation(Association):
    """An acceptor association whose reactor waits on its DUL's activity, not a sleep."""

    dul: WakingDUL

    def __init__(self, ae: Any, mode: str):
        super().__init__(ae, mode)
        # The DUL and DIMSE providers that Association made have not started and nothing
        # refers to them.
        self.dul = WakingDUL(self)
        self.dimse = QuickStoreDIMSE(self)
        # The timeout setters apply the timeouts to the DUL's timers.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def kill(self) -> None:
        self._kill = True
        self.dul.activity.set()
        super().kill()

    def run_reactor(self) -> None:
        """pynetdicom's, after a TLS connection's handshake, then the server's
        ``association_ended`` hook however it ended: the counts the connection holds are
        freed also where pynetdicom closes the connection without EVT_CONN_CLOSE (an
        exception in its DUL thread) or this thread raises."""
        try:
            if self._tls_handshake():
                super().run_reactor()
        finally:
            ended = getattr(self._server, "association_ended", None)
            if ended is not None:
                ended(self)

    def _tls_handshake(self) -> bool:
        """Complete a TLS connection's handshake (``DeferredHandshake`` left it), within the
        socket's timeout; False, the connection closed, when it fails."""
        transport = self.dul.socket
        connection = transport.socket if transport is not None else None
        if not isinstance(connection, ssl.SSLSocket):
            return True
        try:
            connection.do_handshake()
            return True
        except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
            log.warning("TLS handshake with %s failed: %s", self.requestor.address, exc)
            transport.close()  # type: ignore[union-attr]
            connection.close()  # pynetdicom's close skips it when shutdown fails
            return False

    def _run_reactor(self) -> None:
        """pynetdicom's ``Association._run_reactor`` without the 1 ms sleep per loop."""
        activity = self.dul.activity
        self._is_paused = False
        while not self._kill:
            # Paused while the acceptor uses the send_*() methods itself.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            # Cleared before looking: anything the DUL does from here on wakes the wait below.
            activity.clear()
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
                continue
            if self.is_established and self.acse.is_release_requested():
                # The server's hook (scp.py): the association's index rows are committed.
                before_release = getattr(self._server, "before_release", None)
                if before_release is not None:
                    before_release(self)
                self.acse.send_release(is_response=True)
                ASSOCIATION_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOCIATION_LOGGER.info(log_msg)
                # Ensure that EVT_ACSE_RECV fires for subscribers.
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                ASSOCIATION_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return
            activity.wait(TICK)


class WholeReadSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU into one buffer instead of 4 KiB at a time.

    ``largest``: the longest read taken (the PDU length this node advertised, at least
    ``ASSOCIATION_PDU_LIMIT``; None: any). A longer one closes the connection, as a peer that
    breaks the negotiated maximum would otherwise make the listener hold what it announces.

    ``request_deadline``: when (``time.monotonic``) the association request must have been
    read in full (None: no bound). pynetdicom's ACSE timeout closes a connection that sends
    nothing, but not one that sends its request a byte at a time: each byte restarts the
    socket's timeout, and the connection held its threads for as long as the peer liked."""

    largest: int | None = None
    request_deadline: float | None = None

    def _bound_request_read(self) -> None:
        """While the association request is read, let no read outlast the request's
        deadline; TimeoutError once it has passed."""
        deadline = self.request_deadline
        if deadline is None:
            return
        connection = self.socket
        assert connection is not None
        # Sta2: awaiting the request; Sta1 too, where the peer's first bytes came before the
        # DUL took the connection's open event from its queue (it reads before it looks).
        if self.assoc.dul.state_machine.current_state not in _BEFORE_REQUEST:
            self.request_deadline = None  # the request is in: the network timeout again
            connection.settimeout(self.assoc.network_timeout)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("association request not received within the ACSE timeout")
        network_timeout = self.assoc.network_timeout
        if network_timeout is None or left < network_timeout:
            connection.settimeout(left)
        else:
            connection.settimeout(network_timeout)

    def _timed_out(self) -> bool:
        """A read timed out: say so where it was the association request's deadline (the
        network timeout's are WakingDUL's to log); whether it did."""
        deadline = self.request_deadline
        network_timeout = self.assoc.network_timeout
        if deadline is not None and (
            network_timeout is None or deadline - time.monotonic() < network_timeout
        ):
            log.warning(
                "connection from %s closed: its association request did not arrive in full "
                "within the ACSE timeout (%s s)",
                self.assoc.requestor.address,
                self.assoc.acse_timeout,
            )
            return True
        return False

    def recv(self, nr_bytes: int) -> bytearray:
        """Block until ``nr_bytes`` are read; fewer if the connection breaks (as pynetdicom).

        The length comes from the peer's PDU header (up to 4 GiB): memory is taken as the
        data arrive (at most twice what has arrived), never for the length alone. OSError
        (which pynetdicom's DUL takes as the connection closing) when the length is more than
        ``largest``, or when no data come for the socket's timeout (a peer that stalls in
        the middle of a PDU, where pynetdicom's own timers cannot see it)."""
        if self.largest is not None and nr_bytes > self.largest:
            requestor = self.assoc.requestor
            log.warning(
                "connection from %s closed: it announced a PDU of %d bytes, more than the "
                "%d this node receives ([node] max_pdu)",
                requestor.address,
                nr_bytes,
                self.largest,
            )
            raise NodeClosed(f"PDU of {nr_bytes} bytes, more than {self.largest}")
        buffer = bytearray(min(nr_bytes, FIRST_READ))
        read = 0
        while read < nr_bytes:
            if read == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - len(buffer))))
            with memoryview(buffer) as whole, whole[read:] as free:
                try:
                    self._bound_request_read()
                    count = self.socket.recv_into(free)  # type: ignore[union-attr]
                except TimeoutError as exc:
                    if self._timed_out():
                        raise NodeClosed(str(exc)) from exc
                    raise
            if not count:
                del buffer[read:]
                return buffer
            read += count
        if self.request_deadline is not None:
            # What this node sends in answer is bound by the network timeout, as before.
            self.socket.settimeout(self.assoc.network_timeout)  # type: ignore[union-attr]
        return buffer


class DeferredHandshake(AssociationServer):
    """An association server that wraps an accepted TLS connection without its handshake,
    which the connection's association does in its own thread (``EventDrivenAssociation``).

    pynetdicom handshakes in ``get_request``, in the one thread that accepts every
    connection, on a socket without a timeout: a peer that connected and sent nothing, or
    vanished before its ClientHello, stopped the listener accepting anyone, for good. Mixed
    in after the server class: ``class Server(ThreadedAssociationServer, DeferredHandshake)``.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = self.socket.accept()  # type: ignore[union-attr]
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address


class BlockingAcceptor(AssociationServer):
    """An association server whose accepting loop blocks until a connection waits or
    :meth:`shutdown` wakes it through a socket pair.

    socketserver's ``serve_forever`` looks for a shutdown every ``poll_interval``: an idle
    listener woke 10 times a second, and pynetdicom's ``service_actions``, called each time,
    ran a full garbage collection every 60th (every 6 s; here every 60th connection, as its
    comment means). Mixed in first: ``class Server(BlockingAcceptor, ..., AssociationServer)``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._stopping = threading.Event()
        self._serving = threading.Event()
        self._stopped = threading.Event()
        # Serving begins, or shutdown comes first, under it: not both.
        self._state = threading.Lock()
        super().__init__(*args, **kwargs)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept connections until :meth:`shutdown` (``poll_interval`` is not used);
        returns at once after one (its sockets are closed)."""
        with self._state:
            if self._stopping.is_set():
                return
            self._serving.set()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)  # type: ignore[arg-type]
                selector.register(self._wake_reader, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    ready = selector.select()
                    if self._stopping.is_set():
                        break
                    if any(key.fileobj is self.socket for key, _ in ready):
                        # socketserver's accept, verify_request and process_request.
                        self._handle_request_noblock()
                        self.service_actions()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop accepting, close the socket and leave the AE's servers: pynetdicom's
        ``shutdown``, without socketserver's, which waits for socketserver's own loop."""
        with self._state:
            self._stopping.set()
            serving = self._serving.is_set()
        self._wake_writer.send(b"\0")
        if serving:
            self._stopped.wait()
        self._wake_reader.close()
        self._wake_writer.close()
        self.server_close()
        with contextlib.suppress(ValueError):
            self.ae._servers.remove(self)  # type: ignore[arg-type]


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, building an ``EventDrivenAssociation``."""

    def _create_association(self) -> Association:
        """pynetdicom's ``RequestHandler._create_association`` with the class replaced."""
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"
        # A peer that stops in the middle of a PDU leaves the DUL blocked in a read that no
        # timer of pynetdicom's interrupts: the socket's own timeout ends it, and the
        # association's slot is freed.
        self.request.settimeout(self.ae.network_timeout)
        # And a peer that vanished (power lost, NAT state dropped) is found by the kernel.
        enable_keepalive(self.request)
        sock = WholeReadSocket(assoc, client_socket=self.request)
        if assoc.acse_timeout is not None:
            sock.request_deadline = time.monotonic() + assoc.acse_timeout
        limit = self.ae.maximum_pdu_size
        sock.largest = max(limit, ASSOCIATION_PDU_LIMIT) if limit else None
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # pynetdicom deep-copies the server's 171 contexts x 45 transfer syntaxes here: 40 ms
        # of CPU before every association can start. Negotiation only reads them (it builds
        # new context objects for its answer) and no handler of ours changes them, so each
        # association gets its own list of the same objects.
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc
