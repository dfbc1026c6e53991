"""Send result objects to a destination by C-STORE (Storage SCU)."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pynetdicom import AE

from dicomnode.config import Destination

log = logging.getLogger("dicomnode.export")


class ExportError(Exception):
    """The destination did not take the object; the export job retries later."""


def send_file(path: Path, destination: Destination, calling_ae: str, timeout: float = 30.0) -> None:
    """C-STORE one DICOM file to ``destination``; raises ExportError unless it answers 0x0000."""
    ds = pydicom.dcmread(path)
    sop_class = ds.SOPClassUID
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class, [transfer_syntax])
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
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
