"""``dicomnode destinations echo``: a C-ECHO from ``[node] ae_title`` to each configured
destination, against real peers (dcmtk storescp, plain and ``+tls``; a pynetdicom SCP that
knows one calling AE; a port nobody listens on; one that accepts and says nothing), one line
each and exit 0 only when all answered; and ``destinations list``."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, storescp
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from test_cli import run_cli
from test_export_tls import _tls_pacs
from test_tls import _certificates

NODE_AE = "TRIAGENODE"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a PACS certificate for 127.0.0.1 and a client certificate, signed by it."""
    return _certificates(tmp_path_factory.mktemp("echo-tls") / "tls")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, which signed none of ``certs``."""
    return _certificates(tmp_path_factory.mktemp("echo-tls-other") / "tls") / "ca.pem"


def _config(tmp_path: Path, *destinations: str, node_ae: str = NODE_AE) -> Path:
    """A configuration file with ``[node] ae_title`` and ``destinations`` (TOML tables)."""
    path = tmp_path / "dicomnode.toml"
    tables = "\n".join(f"[[destinations]]\n{table}" for table in destinations)
    path.write_text(f'[node]\nae_title = "{node_ae}"\n\n{tables}', encoding="utf-8")
    return path


def _destination(name: str, port: int, ae_title: str = "PACS", **keys: object) -> str:
    lines = [f'name = "{name}"', f'ae_title = "{ae_title}"', 'host = "127.0.0.1"', f"port = {port}"]
    # JSON's strings, numbers, booleans and arrays of strings are TOML's too.
    lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    return "\n".join(lines) + "\n"


def _echo(config: Path, *names: str) -> tuple[int, list[str], str]:
    result = run_cli("destinations", "echo", "--config", str(config), *names)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout.splitlines(), result.stderr


@pytest.fixture
def verification_scp() -> Iterator[int]:
    """A pynetdicom Verification SCP (AE PACS) that accepts only the calling AE NODE_AE."""
    ae = AE("PACS")
    ae.add_supported_context(Verification)
    ae.require_calling_aet = [NODE_AE]
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_a_storescp_answers(tmp_path: Path) -> None:
    with storescp(tmp_path) as pacs:
        config = _config(tmp_path, _destination("pacs", pacs.port))
        code, lines, stderr = _echo(config)
        log = pacs.log.read_text(errors="replace")
    assert code == 0, (lines, stderr)
    assert len(lines) == 1
    assert re.fullmatch(rf"pacs  PACS@127\.0\.0\.1:{pacs.port}  no TLS  OK \(\d+ ms\)", lines[0])
    assert "Received Echo Request" in log


def test_a_port_nobody_listens_on_is_refused_and_fails_the_command(tmp_path: Path) -> None:
    with storescp(tmp_path) as pacs:
        config = _config(
            tmp_path, _destination("pacs", pacs.port), _destination("gone", free_port(), "GONE")
        )
        code, lines, _ = _echo(config)
    assert code == 1
    assert len(lines) == 2
    assert lines[0].startswith("pacs  ") and lines[0].endswith(" ms)"), lines
    assert re.match(r"gone  GONE@127\.0\.0\.1:\d+ +no TLS  ", lines[1]), lines
    assert "Connection refused" in lines[1], lines


def test_a_peer_that_rejects_the_calling_ae_says_why(tmp_path: Path, verification_scp: int) -> None:
    """The SCP knows NODE_AE only: the node's ae_title decides, and the rejection's result,
    source and reason are said."""
    known = _config(tmp_path, _destination("pacs", verification_scp))
    code, lines, _ = _echo(known)
    assert code == 0, lines
    assert " OK (" in lines[0]
    stranger = _config(tmp_path, _destination("pacs", verification_scp), node_ae="STRANGER")
    code, lines, _ = _echo(stranger)
    assert code == 1
    assert len(lines) == 1
    assert "Rejected Permanent" in lines[0], lines
    assert "Service User" in lines[0], lines
    assert "Calling AE title not recognised" in lines[0], lines


def test_tls_with_the_right_ca_answers_and_with_another_fails_the_handshake(
    tmp_path: Path, certs: Path, other_ca: Path
) -> None:
    with _tls_pacs(tmp_path, certs, "-ic") as pacs:
        config = _config(
            tmp_path,
            _destination("secure", pacs.port, tls=True, tls_ca=str(certs / "ca.pem")),
            _destination("wrongca", pacs.port, tls=True, tls_ca=str(other_ca)),
        )
        code, lines, _ = _echo(config)
        only_secure, secure_lines, _ = _echo(config, "secure")
    assert code == 1
    assert len(lines) == 2
    assert re.fullmatch(rf"secure   PACS@127\.0\.0\.1:{pacs.port}  TLS  OK \(\d+ ms\)", lines[0])
    assert lines[1].startswith(f"wrongca  PACS@127.0.0.1:{pacs.port}  TLS  "), lines
    assert "TLS handshake failed: certificate verify failed" in lines[1], lines
    assert only_secure == 0
    assert len(secure_lines) == 1 and secure_lines[0].startswith("secure ")


def test_a_peer_that_accepts_and_says_nothing_times_out(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        config = _config(tmp_path, _destination("mute", port, timeout_seconds=1.0))
        code, lines, _ = _echo(config)
    assert code == 1
    assert "timed out after 1 s" in lines[0], lines


def test_a_peer_that_does_not_answer_the_echo_times_out_after_timeout(tmp_path: Path) -> None:
    """An SCP that accepts the association but answers the C-ECHO too late; --timeout
    overrides the destination's timeout_seconds."""
    ae = AE("PACS")
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_ECHO, lambda event: time.sleep(2) or 0x0000)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        config = _config(tmp_path, _destination("slow", server.server_address[1]))
        result = run_cli("destinations", "echo", "--config", str(config), "--timeout", "0.5")
    finally:
        server.shutdown()
    assert result.returncode == 1, result.stdout
    assert "timed out after 0.5 s: no C-ECHO response (DIMSE timeout" in result.stdout


def test_an_unknown_name_is_a_usage_error_and_nothing_is_checked(tmp_path: Path) -> None:
    with storescp(tmp_path) as pacs:
        config = _config(tmp_path, _destination("pacs", pacs.port))
        code, lines, stderr = _echo(config, "pacs", "nosuch")
        log = pacs.log.read_text(errors="replace")
    assert code == 2
    assert lines == []
    assert "error: no destination 'nosuch'" in stderr, stderr
    assert "(configured: pacs)" in stderr, stderr
    assert "Echo" not in log


def test_list_prints_each_destination(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        _destination("pacs", 104),
        _destination("viewer", 11112, "VIEW", outputs=["sr", "kos"], timeout_seconds=5.0),
    )
    result = run_cli("destinations", "list", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "pacs    PACS@127.0.0.1:104    no TLS  outputs all     timeout 30 s",
        "viewer  VIEW@127.0.0.1:11112  no TLS  outputs sr,kos  timeout 5 s",
    ]
