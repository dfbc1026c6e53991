"""DICOM TLS: the listener with a certificate from [tls], dcmtk echoscu/storescu ``+tls`` with a
client certificate from the same CA succeed; plain TCP and clients without a certificate fail."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import dcmtk
from sqlalchemy.orm import Session, sessionmaker
from test_scp import Node, secondary_capture, start_node

from dicomnode.config import Settings
from dicomnode.ingest.reactor import WakingDUL
from dicomnode.ingest.scp import tls_context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(folder: Path) -> Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, all PEM."""
    folder.mkdir()
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=dicomnode test CA", cwd=folder,
    )  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN=dicomnode test {name}", cwd=folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
            cwd=folder,
        )  # fmt: skip
    return folder


@pytest.fixture
def tls_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[tuple[Node, Path]]:
    certs = _certificates(tmp_path / "tls")
    tls = {
        "enabled": True,
        "cert": str(certs / "server.pem"),
        "key": str(certs / "server.key"),
        "ca": str(certs / "ca.pem"),
        "require_client_cert": True,
    }
    for node in start_node(tmp_path, sessions, tls=tls):
        yield node, certs


def _dcmtk(tool: str, node: Node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk(tool), "-aet", "MODALITY", "-aec", "DICOMNODE", *args, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dcmtk_echo_and_store_over_tls(
    tls_node: tuple[Node, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, certs = tls_node
    # Over TLS every PDU leaves from the DUL thread, the one that reads the connection too
    # (elsewhere a C-STORE response leaves from the association thread).
    senders: list[str] = []
    send = WakingDUL._send

    def recorded_send(self, pdu):
        senders.append(threading.current_thread().name)
        send(self, pdu)

    monkeypatch.setattr(WakingDUL, "_send", recorded_send)
    client = ["+tls", str(certs / "client.key"), str(certs / "client.pem"), "+cf"]
    echo = _dcmtk("echoscu", node, *client, str(certs / "ca.pem"))
    assert echo.returncode == 0, echo.stderr
    ds = secondary_capture()
    path = tmp_path / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    store = subprocess.run(
        [
            dcmtk("storescu"), "-aet", "MODALITY", "-aec", "DICOMNODE", *client,
            str(certs / "ca.pem"), "127.0.0.1", str(node.port), str(path),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert store.returncode == 0, store.stderr
    assert node.instances(str(ds.SOPInstanceUID)) == 1
    assert senders and not any(name.startswith("AcceptorThread@") for name in senders), senders


def test_plain_tcp_and_anonymous_tls_are_refused(tls_node: tuple[Node, Path]) -> None:
    node, certs = tls_node
    plain = _dcmtk("echoscu", node)
    assert plain.returncode != 0
    # TLS, but no client certificate: the handshake fails (require_client_cert).
    anonymous = _dcmtk("echoscu", node, "+tla", "+cf", str(certs / "ca.pem"))
    assert anonymous.returncode != 0
    # The listener still serves a proper TLS client afterwards.
    client = ["+tls", str(certs / "client.key"), str(certs / "client.pem")]
    again = _dcmtk("echoscu", node, *client, "+cf", str(certs / "ca.pem"))
    assert again.returncode == 0, again.stderr


def test_tls_settings_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs ca"):
        Settings.model_validate({"tls": {"enabled": True}})
    settings = Settings.model_validate(
        {"tls": {"enabled": True, "cert": str(tmp_path / "missing.pem"), "ca": "ca.pem"}}
    )
    with pytest.raises(ValueError, match=r"missing\.pem"):
        tls_context(settings)
