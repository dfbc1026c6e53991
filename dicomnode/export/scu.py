"""Send result objects to a destination by C-STORE (Storage SCU)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pydicom
from pynetdicom import AE, evt

from dicomnode.config import Destination

log = logging.getLogger("dicomnode.export")


class ExportError(Exception):
    """The destination did not take the object; the export job retries later."""


def _send_at_once(event: evt.Event) -> None:
    """Turn Nagle's algorithm off on an association's socket as it connects.

    A C-STORE request goes out as a command PDU and then the dataset's PDUs; with Nagle's
    algorithm the kernel holds a small dataset PDU until the peer acknowledges the command
    PDU, and a peer waiting for the whole message delays that acknowledgement (Linux: up to
    40 ms). Every small object (an SR, a KOS) then took ~40 ms longer to send.
    """
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_file(path: Path, destination: Destination, calling_ae: str, timeout: float = 30.0) -> None:
    """C-STORE one DICOM file to ``destination``; raises ExportError unless it answers 0x0000."""
    ds = pydicom.dcmread(path)
    sop_class = ds.SOPClassUID
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class, [transfer_syntax])
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _send_at_once)],
    )
    if not assoc.is_established:
        raise ExportError(f"{where}: association not accepted (peer down or refused)")
    try:
        if not assoc.accepted_contexts:
            raise ExportError(f"{where}: SOP class {sop_class.name} not accepted")
        status = assoc.send_c_store(ds)
        code = getattr(status, "Status", None)
        if code is None:
            raise ExportError(f"{where}: no C-STORE response for {ds.SOPInstanceUID}")
        if code not in (0x0000, 0xB000, 0xB006, 0xB007):
            raise ExportError(f"{where}: C-STORE status 0x{code:04X} for {ds.SOPInstanceUID}")
    finally:
        assoc.release()
