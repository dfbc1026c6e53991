"""Export by C-STORE to a real dcmtk storescp, and to a destination that is down."""

from __future__ import annotations

import socket
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, free_port, wait_for
from pynetdicom.association import Association
from test_scp import secondary_capture

from dicomnode.config import Destination
from dicomnode.export.scu import ExportError, send_file


def saved(tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    ds = secondary_capture()
    path = tmp_path / "result.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_send_file_delivers_to_pacs(tmp_path: Path, pacs: StoreSCP) -> None:
    path, ds = saved(tmp_path)
    destination = Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port)
    send_file(path, destination, calling_ae="DICOMNODE", timeout=10)
    received = wait_for(pacs.received, timeout=10, interval=0.05, what="storescp to write")
    assert len(received) == 1
    copy = pydicom.dcmread(received[0])
    assert copy.SOPInstanceUID == ds.SOPInstanceUID
    assert copy.PixelData == ds.PixelData


def test_export_association_sends_each_pdu_at_once(
    tmp_path: Path, pacs: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nagle's algorithm is off on the export socket: a small object's dataset PDU would
    otherwise wait for the PACS to acknowledge the command PDU (a delayed ACK, ~40 ms)."""
    no_delay: list[int] = []
    send_c_store = Association.send_c_store

    def looking(self: Association, *args: object, **kwargs: object) -> object:
        sock = self.dul.socket.socket
        no_delay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return send_c_store(self, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", looking)
    path, _ = saved(tmp_path)
    destination = Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port)
    send_file(path, destination, calling_ae="DICOMNODE", timeout=10)
    assert len(no_delay) == 1 and no_delay[0] != 0
    assert len(wait_for(pacs.received, timeout=10, interval=0.05, what="storescp to write")) == 1


def test_send_file_to_closed_port_names_destination(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    destination = Destination(
        name="archive-b", ae_title="ARCHIVE", host="127.0.0.1", port=free_port()
    )
    with pytest.raises(ExportError, match=r"archive-b \(ARCHIVE@127\.0\.0\.1:\d+\)"):
        send_file(path, destination, calling_ae="DICOMNODE", timeout=5)
