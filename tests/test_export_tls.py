"""DICOM TLS on exports: a destination with ``tls = true`` sends results to a dcmtk
``storescp +tls`` (with the node's client certificate where it requires one); a PACS
certificate the destination's CA did not sign, or one that does not name its host, fails the
export with a one-line WARNING, is retried with backoff and leaves the worker running; the
configuration refuses a certificate without its key and check-config names a missing file."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, storescp, wait_for
from pynetdicom.association import Association
from sqlalchemy.orm import Session, sessionmaker
from test_config import check_config, write
from test_export import _assert_retried_later, _due_now, _jobs, saved, study_with_exports
from test_tls import _certificates

from dicomnode.config import Destination, Settings
from dicomnode.export.scu import DestinationUnavailable, send_file
from dicomnode.tls import destination_tls_args
from dicomnode.worker import Worker


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a PACS (server) certificate for 127.0.0.1 and localhost, and a client
    certificate for the node, all signed by it (test_tls.py's)."""
    return _certificates(tmp_path_factory.mktemp("export-tls") / "tls")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, which signed none of ``certs``."""
    return _certificates(tmp_path_factory.mktemp("export-tls-other") / "tls") / "ca.pem"


def _tls_pacs(tmp_path: Path, certs: Path, *peer: str) -> storescp:
    """dcmtk storescp over TLS with the PACS certificate; ``peer``: how it treats the node's
    certificate (``-ic``: not asked for; ``-rc +cf ca.pem``: required, signed by the CA)."""
    key, cert = str(certs / "server.key"), str(certs / "server.pem")
    return storescp(tmp_path, "--accept-all", "+tls", key, cert, *peer)


def _destination(port: int, host: str = "127.0.0.1", **tls: object) -> Destination:
    return Destination(name="pacs", ae_title="PACS", host=host, port=port, tls=True, **tls)


def _worker(tmp_path: Path, sessions: sessionmaker[Session], destination: Destination) -> Worker:
    settings = Settings(
        storage={"path": tmp_path / "storage"},
        worker={"threads": 1, "backoff_base_seconds": 60},
        destinations=[destination],
    )
    return Worker(settings, sessions, cards=[])


def _received_uids(pacs: StoreSCP, count: int) -> set[str]:
    received = wait_for(
        lambda: len(pacs.received()) == count and pacs.received(), timeout=10, what="storescp"
    )
    return {str(pydicom.dcmread(path).SOPInstanceUID) for path in received}


def test_results_reach_a_pacs_over_tls_with_nagle_off(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    certs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A study's results leave over one TLS association to storescp +tls, its certificate
    checked against tls_ca; TCP_NODELAY is set on the TLS socket as on a plain one."""
    sockets: list[tuple[type, int]] = []
    send_c_store = Association.send_c_store

    def looking(self: Association, *args: object, **kwargs: object) -> object:
        sock = self.dul.socket.socket
        sockets.append((type(sock), sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        return send_c_store(self, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", looking)
    jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs", "overlay": "pacs", "kos": "pacs"})
    with _tls_pacs(tmp_path, certs, "-ic") as pacs:
        worker = _worker(tmp_path, sessions, _destination(pacs.port, tls_ca=certs / "ca.pem"))
        assert worker.run_once()
        assert [job.state for job in _jobs(sessions, jobs.values())] == ["done"] * 3
        assert len(_received_uids(pacs, 3)) == 3
        assert pacs.associations() == 1
        log = pacs.log.read_text(errors="replace")
    assert "TLS" in log  # storescp negotiated TLS for the association
    assert len(sockets) == 3
    assert all(kind is ssl.SSLSocket and no_delay != 0 for kind, no_delay in sockets), sockets


def test_a_pacs_that_requires_a_client_certificate_gets_the_nodes(
    tmp_path: Path, certs: Path
) -> None:
    """storescp --require-peer-cert: without tls_cert/tls_key the export fails, with them the
    object arrives."""
    path, ds = saved(tmp_path)
    ca = certs / "ca.pem"
    with _tls_pacs(tmp_path, certs, "--require-peer-cert", "+cf", str(ca)) as pacs:
        anonymous = _destination(pacs.port, tls_ca=ca, timeout_seconds=5)
        # With TLS 1.3 storescp says so after the client's handshake: at the association
        # request, still before any object.
        with pytest.raises(DestinationUnavailable, match=r"^TLS handshake with pacs \("):
            send_file(path, anonymous, calling_ae="DICOMNODE", timeout=5)
        assert pacs.received() == []
        client = _destination(
            pacs.port, tls_ca=ca, tls_cert=certs / "client.pem", tls_key=certs / "client.key"
        )
        send_file(path, client, calling_ae="DICOMNODE", timeout=10)
        assert _received_uids(pacs, 1) == {str(ds.SOPInstanceUID)}


def test_a_pacs_certificate_from_another_ca_fails_the_export_and_it_is_retried(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    certs: Path,
    other_ca: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The handshake fails (certificate verify failed): a one-line WARNING that says so, no
    traceback from pynetdicom, the exports queued with backoff (an unreachable destination,
    not a refusal), and the worker goes on running them."""
    jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs", "kos": "pacs"})
    with _tls_pacs(tmp_path, certs, "-ic") as pacs:
        worker = _worker(tmp_path, sessions, _destination(pacs.port, tls_ca=other_ca))
        with caplog.at_level(logging.DEBUG):
            assert worker.run_once()
            _assert_retried_later(sessions, jobs.values(), "TLS handshake with pacs")
            _due_now(sessions, jobs.values())
            assert worker.run_once()  # the worker is still there, and tries again
        assert [(job.state, job.attempts) for job in _jobs(sessions, jobs.values())] == [
            ("queued", 2)
        ] * 2
        assert pacs.received() == []
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.name == "dicomnode.worker"
    message = warning.getMessage()
    assert "\n" not in message
    assert (
        f"TLS handshake with pacs (PACS@127.0.0.1:{pacs.port}) failed: certificate verify "
        "failed: unable to get local issuer certificate" in message
    ), message
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in caplog.text


def test_a_pacs_certificate_for_another_host_fails_unless_the_name_check_is_off(
    tmp_path: Path, certs: Path
) -> None:
    """The PACS certificate names 127.0.0.1 and localhost; as 127.0.0.2 the handshake fails,
    unless tls_verify_hostname = false (the chain is still checked against tls_ca)."""
    path, ds = saved(tmp_path)
    ca = certs / "ca.pem"
    with _tls_pacs(tmp_path, certs, "-ic") as pacs:
        elsewhere = _destination(pacs.port, host="127.0.0.2", tls_ca=ca)
        with pytest.raises(DestinationUnavailable, match="IP address mismatch") as caught:
            send_file(path, elsewhere, calling_ae="DICOMNODE", timeout=5)
        assert str(caught.value).startswith("TLS handshake with pacs (PACS@127.0.0.2:")
        unchecked = _destination(pacs.port, host="127.0.0.2", tls_ca=ca, tls_verify_hostname=False)
        send_file(path, unchecked, calling_ae="DICOMNODE", timeout=10)
        assert _received_uids(pacs, 1) == {str(ds.SOPInstanceUID)}


def test_a_peer_silent_in_the_tls_handshake_fails_within_the_timeout(
    tmp_path: Path, certs: Path
) -> None:
    """The handshake runs inside pynetdicom's connect: bounded by timeout_seconds too."""
    path, _ = saved(tmp_path)
    silent = socket.create_server(("127.0.0.1", 0))  # connections wait in its backlog
    try:
        destination = _destination(silent.getsockname()[1], tls_ca=certs / "ca.pem")
        started = time.monotonic()
        with pytest.raises(DestinationUnavailable, match="association not accepted"):
            send_file(path, destination, calling_ae="DICOMNODE", timeout=1)
        assert time.monotonic() - started < 8
    finally:
        silent.close()


TLS_DESTINATION = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'


def test_a_client_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, TLS_DESTINATION + 'port = 2762\ntls = true\ntls_cert = "node.pem"\n')
    result = check_config(path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{path}:1:" in result.stderr, result.stderr
    assert "[destinations.0" in result.stderr
    assert "tls_cert needs tls_key" in result.stderr, result.stderr


def test_tls_files_without_tls_are_refused(tmp_path: Path) -> None:
    """tls_ca set but tls left false would send in the clear what was meant to go over TLS."""
    path = write(tmp_path, TLS_DESTINATION + 'port = 2762\ntls_ca = "ca.pem"\n')
    result = check_config(path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "apply only with tls = true" in result.stderr, result.stderr


def test_check_config_names_a_missing_tls_file(tmp_path: Path, certs: Path) -> None:
    missing = tmp_path / "absent-ca.pem"
    path = write(
        tmp_path,
        f'[storage]\npath = "{tmp_path / "storage"}"\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n'
        f'[models]\nfolders = ["{tmp_path / "cards"}"]\n\n'
        + TLS_DESTINATION
        + f'port = 2762\ntls = true\ntls_ca = "{missing}"\n'
        f'tls_cert = "{certs / "client.pem"}"\ntls_key = "{certs / "client.key"}"\n',
    )
    result = check_config(path)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if "absent-ca.pem" in line]
    assert f"{path}:14: [destinations.0.tls_ca]" in line, result.stderr
    assert "pacs: cannot load tls_ca" in line and "No such file" in line, line


def test_a_destinations_tls_context_is_built_once_and_again_for_a_renewed_file(
    tmp_path: Path, certs: Path
) -> None:
    """Each association to a destination reuses its context; a CA file written anew (a
    renewal) or other tls keys (a reload) give a new one."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes((certs / "ca.pem").read_bytes())
    destination = _destination(104, tls_ca=ca)
    context, host = destination_tls_args(destination, tmp_path)
    assert host == "127.0.0.1" and context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert destination_tls_args(destination, tmp_path)[0] is context
    ca.write_bytes((certs / "ca.pem").read_bytes())
    written = ca.stat().st_mtime_ns + 1_000_000_000  # a second later, however coarse the clock
    os.utime(ca, ns=(written, written))
    renewed = destination_tls_args(destination, tmp_path)[0]
    assert renewed is not context
    unchecked = _destination(104, tls_ca=ca, tls_verify_hostname=False)
    assert not destination_tls_args(unchecked, tmp_path)[0].check_hostname
