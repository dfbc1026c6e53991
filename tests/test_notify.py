"""Critical-result notification: webhook and HL7 v2 over MLLP to local receivers, delivered
through the job queue and the worker, retried after a refusal or a receiver that is down."""

from __future__ import annotations

import json
import logging
import socketserver
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
import pytest
from conftest import free_port
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.config import NotifySettings, Settings
from dicomnode.db.models import FindingRow, Job, Study
from dicomnode.notify import (
    CriticalResult,
    FindingNote,
    WebhookError,
    becomes_critical,
    enqueue_notifications,
    hl7_message,
    send_webhook,
    webhook_body,
)
from dicomnode.worker import Worker

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PATIENT_ID = "PAT-7731"
PATIENT_NAME = "Doe^Jane"
STUDY_UID = "1.2.826.0.1.3680043.8.498.77"

RESULT = CriticalResult(
    study_instance_uid=STUDY_UID,
    accession_number="ACC|42",
    patient_id=PATIENT_ID,
    patient_name="Doe^Jane^^Dr^III",
    modality="DX",
    tier="critical",
    ups_priority="HIGH",
    reason="AI critical: Pneumothorax 87%",
    received_at=T0,
    due_at=T0 + timedelta(minutes=15),
    findings=[
        FindingNote("36118008", "SCT", "Pneumothorax", 0.87, 0.5, True, "cxr 1"),
        FindingNote("60046008", "SCT", "Pleural effusion", 0.2, 0.5, False, "cxr 1"),
    ],
)


# Pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ("routine", "critical", True),
        ("urgent", "critical", True),
        ("routine", "stat", True),
        ("critical", "critical", False),
        ("stat", "critical", False),
        ("critical", "routine", False),
        ("routine", "urgent", False),
    ],
)
def test_notify_only_on_entering_a_critical_tier(before: str, after: str, expected: bool) -> None:
    assert becomes_critical(before, after) is expected


def test_webhook_body_names_the_study_not_the_patient() -> None:
    body = webhook_body(RESULT, "dicomnode-notify-9")
    assert body["event"] == "critical_result"
    assert body["notification_id"] == "dicomnode-notify-9"
    assert body["study_instance_uid"] == STUDY_UID
    assert body["accession_number"] == "ACC|42"
    assert (body["tier"], body["ups_priority"]) == ("critical", "HIGH")
    assert body["reason"] == "AI critical: Pneumothorax 87%"
    assert body["notice"] == RESEARCH_DEMO_NOTICE
    assert body["findings"][0] == {
        "code": "36118008",
        "scheme": "SCT",
        "meaning": "Pneumothorax",
        "probability": 0.87,
        "threshold": 0.5,
        "present": True,
        "critical": True,
        "model": "cxr 1",
    }
    assert body["findings"][1]["present"] is False
    text = json.dumps(body)
    assert PATIENT_ID not in text and "Doe" not in text


def test_hl7_message_is_an_oru_r01_with_escaped_values() -> None:
    settings = NotifySettings(hl7_sending_facility="RAD", hl7_receiving_application="RIS")
    text = hl7_message(RESULT, "DN9", settings, T0 + timedelta(minutes=2))
    message = hl7.parse(text)
    msh = message.segment("MSH")
    assert str(msh(9)) == "ORU^R01^ORU_R01"
    assert str(msh(10)) == "DN9"
    assert (str(msh(3)), str(msh(4)), str(msh(5))) == ("DICOMNODE", "RAD", "RIS")
    assert str(msh(7)) == "20240501120200+0000"
    pid = message.segment("PID")
    assert str(pid(3)) == PATIENT_ID
    # DICOM PN family^given^middle^prefix^suffix -> HL7 XPN family^given^middle^suffix^prefix
    assert str(pid(5)) == "Doe^Jane^^III^Dr"
    obr = message.segment("OBR")
    assert message.unescape(str(obr(3))) == "ACC|42"
    assert str(obr(25)) == "P"
    observations = {str(obx(3)(1)(1)): obx for obx in message.segments("OBX")}
    assert str(observations["AI-TIER"](5)) == "critical"
    assert str(observations["AI-REASON"](5)) == "AI critical: Pneumothorax 87%"
    assert str(observations["113014"](5)) == STUDY_UID
    assert str(observations["36118008"](2)) == "NM"
    assert str(observations["36118008"](5)) == "0.8700"
    assert str(observations["36118008"](8)) == "A"
    assert str(observations["60046008"](8)) == "N"
    assert str(message.segment("NTE")(3)) == RESEARCH_DEMO_NOTICE


# Local receivers ---------------------------------------------------------------------------


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that answers the first ``failures`` POSTs with ``status``
    (500 unless told)."""

    def __init__(self, port: int, failures: int = 0, status: int = 500):
        self.failures = failures
        self.status = status
        self.requests: list[tuple[dict, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                receiver.requests.append((dict(self.headers), body))
                failing = len(receiver.requests) <= receiver.failures
                status = receiver.status if failing else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"


class MLLPReceiver:
    """A TCP server on 127.0.0.1 that reads MLLP frames and answers each with an HL7 ACK:
    ``codes`` in turn (then AA), or nothing at all when ``silent``."""

    def __init__(self, codes: list[str] | None = None, silent: bool = False):
        self.codes = list(codes or [])
        self.silent = silent
        self.frames: list[bytes] = []
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while END_BLOCK not in buffer:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    buffer += chunk
                receiver.frames.append(buffer)
                if receiver.silent:
                    self.request.recv(1)  # hold the connection until the client gives up
                    return
                message = hl7.parse(buffer[1 : -len(END_BLOCK)].decode("utf-8"))
                code = receiver.codes.pop(0) if receiver.codes else "AA"
                ack = str(message.create_ack(code)).encode("utf-8")
                self.request.sendall(START_BLOCK + ack + END_BLOCK)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def messages(self) -> list[hl7.Message]:
        return [hl7.parse(frame[1 : -len(END_BLOCK)].decode("utf-8")) for frame in self.frames]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mllp() -> Iterator[MLLPReceiver]:
    receiver = MLLPReceiver(codes=["AE"])
    yield receiver
    receiver.close()


# Through the queue and the worker ------------------------------------------------------


def critical_study(session: Session) -> int:
    study = Study(
        study_instance_uid=STUDY_UID,
        accession_number="ACC-42",
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        modality="DX",
        received_at=T0,
        last_instance_at=T0,
        ready_at=T0,
        due_at=T0 + timedelta(minutes=15),
        analysis_status="analysed",
        tier="critical",
        tier_rank=1,
        score=0.87,
        ups_priority="HIGH",
        reason="AI critical: Pneumothorax 87%",
    )
    session.add(study)
    session.flush()
    session.add(
        FindingRow(
            study_id=study.id,
            model_name="cxr-pneumothorax-demo",
            model_version="1",
            code_value="36118008",
            code_scheme="SCT",
            code_meaning="Pneumothorax",
            probability=0.87,
            threshold=0.5,
            critical=True,
        )
    )
    session.commit()
    return study.id


def queue_notifications(sessions: sessionmaker[Session], notify: NotifySettings) -> list[int]:
    with sessions() as session:
        study = session.get(Study, critical_study(session))
        jobs = enqueue_notifications(session, study, notify)
        session.commit()
        return [job.id for job in jobs]


def make_worker(sessions: sessionmaker[Session], notify: NotifySettings) -> Worker:
    return Worker(Settings(notify=notify), sessions, cards=[])


def job_row(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def make_due_now(sessions: sessionmaker[Session], job_id: int) -> None:
    """Skip the retry backoff: the job's run_after moves to the past."""
    with sessions() as session:
        session.get(Job, job_id).run_after = datetime.now(UTC) - timedelta(seconds=1)
        session.commit()


def test_webhook_refused_then_retried_and_delivered(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    receiver = WebhookReceiver(free_port(), failures=1)
    try:
        notify = NotifySettings(
            webhook_enabled=True,
            webhook_url=f"http://127.0.0.1:{receiver.server.server_address[1]}/critical",
            webhook_headers={"Authorization": "Bearer site-token"},
            webhook_timeout_seconds=5,
        )
        [job_id] = queue_notifications(sessions, notify)
        worker = make_worker(sessions, notify)
        with caplog.at_level(logging.DEBUG):
            assert worker.run_once() is True
            failed = job_row(sessions, job_id)
            assert (failed.state, failed.attempts) == ("queued", 1)
            assert "500" in failed.last_error
            assert worker.run_once() is False  # backing off
            make_due_now(sessions, job_id)
            assert worker.run_once() is True
        delivered = job_row(sessions, job_id)
        assert (delivered.state, delivered.attempts) == ("done", 2)
        assert len(receiver.requests) == 2
        (_, first), (headers, body) = receiver.requests
        assert first == body  # a retry repeats the same notification
        assert headers["Idempotency-Key"] == body["notification_id"] == f"dicomnode-notify-{job_id}"
        assert headers["Authorization"] == "Bearer site-token"
        assert headers["Content-Type"] == "application/json"
        assert body["study_instance_uid"] == STUDY_UID
        assert body["findings"][0]["meaning"] == "Pneumothorax"
        assert PATIENT_ID not in caplog.text and "Doe" not in caplog.text
    finally:
        receiver.close()


def test_webhook_receiver_down_then_up(sessions: sessionmaker[Session]) -> None:
    port = free_port()
    notify = NotifySettings(
        webhook_enabled=True, webhook_url=f"http://127.0.0.1:{port}/", webhook_timeout_seconds=5
    )
    [job_id] = queue_notifications(sessions, notify)
    worker = make_worker(sessions, notify)
    assert worker.run_once() is True
    failed = job_row(sessions, job_id)
    assert failed.state == "queued"
    assert "ConnectError" in failed.last_error
    receiver = WebhookReceiver(port)
    try:
        make_due_now(sessions, job_id)
        assert worker.run_once() is True
        assert job_row(sessions, job_id).state == "done"
        assert len(receiver.requests) == 1
    finally:
        receiver.close()


def test_hl7_error_ack_then_retried_and_accepted(
    sessions: sessionmaker[Session], mllp: MLLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    notify = NotifySettings(
        hl7_enabled=True, hl7_host="127.0.0.1", hl7_port=mllp.port, hl7_timeout_seconds=5
    )
    [job_id] = queue_notifications(sessions, notify)
    worker = make_worker(sessions, notify)
    with caplog.at_level(logging.DEBUG):
        assert worker.run_once() is True
        failed = job_row(sessions, job_id)
        assert failed.state == "queued"
        assert "AE" in failed.last_error
        make_due_now(sessions, job_id)
        assert worker.run_once() is True
    assert job_row(sessions, job_id).state == "done"
    # MLLP framing: <VT> message <FS><CR>, one message per frame.
    assert all(f.startswith(START_BLOCK) and f.endswith(END_BLOCK) for f in mllp.frames)
    first, second = mllp.messages()
    assert str(first.segment("MSH")(10)) == str(second.segment("MSH")(10)) == f"DN{job_id}"
    assert str(second.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert str(second.segment("PID")(3)) == PATIENT_ID
    assert str(second.segment("PID")(5)) == PATIENT_NAME
    assert PATIENT_ID not in caplog.text and "Doe" not in caplog.text


def test_hl7_without_ack_times_out_and_is_retried(sessions: sessionmaker[Session]) -> None:
    receiver = MLLPReceiver(silent=True)
    try:
        notify = NotifySettings(
            hl7_enabled=True, hl7_host="127.0.0.1", hl7_port=receiver.port, hl7_timeout_seconds=0.3
        )
        [job_id] = queue_notifications(sessions, notify)
        assert make_worker(sessions, notify).run_once() is True
        failed = job_row(sessions, job_id)
        assert failed.state == "queued"
        assert "no HL7 ACK" in failed.last_error
    finally:
        receiver.close()


def test_both_channels_queue_one_job_each_and_disabled_sends_nothing(
    sessions: sessionmaker[Session],
) -> None:
    both = NotifySettings(
        webhook_enabled=True, webhook_url="http://127.0.0.1:9/", hl7_enabled=True, hl7_host="x"
    )
    job_ids = queue_notifications(sessions, both)
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids)).order_by(Job.id)).all()
        assert [(j.kind, j.payload) for j in jobs] == [
            ("notify", {"channel": "webhook"}),
            ("notify", {"channel": "hl7"}),
        ]
    # Switched off since the jobs were queued: they finish without sending anything.
    worker = make_worker(sessions, NotifySettings())
    assert worker.run_once() and worker.run_once()
    assert [job_row(sessions, job_id).state for job_id in job_ids] == ["done", "done"]


def test_nothing_is_queued_when_no_channel_is_enabled(sessions: sessionmaker[Session]) -> None:
    assert queue_notifications(sessions, NotifySettings()) == []


def test_enabled_channel_needs_its_endpoint() -> None:
    with pytest.raises(ValueError, match="webhook_url"):
        NotifySettings(webhook_enabled=True)
    with pytest.raises(ValueError, match="hl7_host"):
        NotifySettings(hl7_enabled=True)
    with pytest.raises(ValueError, match="http"):
        NotifySettings(webhook_url="ftp://example.org/")


# The webhook's secrets -------------------------------------------------------------------

TOKEN = "s3cr3t-hook-token"
HEADER_TOKEN = "Bearer header-s3cr3t"


def _secret_notify(port: int) -> NotifySettings:
    return NotifySettings(
        webhook_enabled=True,
        webhook_url=f"http://127.0.0.1:{port}/hooks/critical-path?token={TOKEN}",
        webhook_headers={"Authorization": HEADER_TOKEN},
        webhook_timeout_seconds=5,
    )


def _assert_no_secret(text: str) -> None:
    for secret in (TOKEN, "header-s3cr3t", "/hooks", "critical-path", "token="):
        assert secret not in text, f"{secret!r} in {text!r}"


def test_a_refused_webhook_is_told_by_status_and_host_without_its_token() -> None:
    receiver = WebhookReceiver(free_port(), failures=1, status=401)
    port = receiver.server.server_address[1]
    try:
        with pytest.raises(WebhookError) as raised:
            send_webhook(webhook_body(RESULT, "dicomnode-notify-1"), _secret_notify(port))
    finally:
        receiver.close()
    assert str(raised.value) == f"webhook 127.0.0.1:{port} answered HTTP 401 Unauthorized"
    assert raised.value.__cause__ is None and raised.value.__context__ is None
    _assert_no_secret(str(raised.value))
    [(headers, _)] = receiver.requests  # it did reach the receiver, token and all
    assert headers["Authorization"] == HEADER_TOKEN


def test_an_unreachable_webhook_is_told_by_host_and_failure_kind_without_its_token() -> None:
    port = free_port()
    with pytest.raises(WebhookError) as raised:
        send_webhook(webhook_body(RESULT, "dicomnode-notify-1"), _secret_notify(port))
    assert str(raised.value) == f"webhook 127.0.0.1:{port} unreachable: ConnectError"
    assert raised.value.__cause__ is None and raised.value.__context__ is None
    _assert_no_secret(str(raised.value))


def test_a_failed_webhook_keeps_its_token_out_of_the_log_and_the_job(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    receiver = WebhookReceiver(free_port(), failures=5, status=401)
    try:
        notify = _secret_notify(receiver.server.server_address[1])
        [job_id] = queue_notifications(sessions, notify)
        with caplog.at_level(logging.INFO):
            assert make_worker(sessions, notify).run_once() is True
    finally:
        receiver.close()
    failed = job_row(sessions, job_id)
    assert failed.state == "queued"
    assert "HTTP 401" in failed.last_error
    _assert_no_secret(failed.last_error)
    assert "HTTP 401" in caplog.text
    # httpx's own INFO line ("HTTP Request: POST <url>") is caught here too: caplog takes
    # every level, so this checks only the node's lines for the token.
    _assert_no_secret("\n".join(r.getMessage() for r in caplog.records if r.name != "httpx"))


def test_with_the_default_log_set_up_httpx_does_not_log_the_webhook_url() -> None:
    """A process as the worker sets it up (setup_logging at INFO) sends to a refusing and to
    an unreachable webhook: nothing it writes holds the URL's path, token or headers."""
    receiver = WebhookReceiver(free_port(), failures=1, status=401)
    refusing = receiver.server.server_address[1]
    probe = textwrap.dedent(
        f"""
        from dicomnode.config import NotifySettings
        from dicomnode.logs import setup_logging
        from dicomnode.notify import send_webhook
        setup_logging("INFO")
        for port in ({refusing}, {free_port()}):
            settings = NotifySettings(
                webhook_enabled=True,
                webhook_url=f"http://127.0.0.1:{{port}}/hooks/critical-path?token={TOKEN}",
                webhook_headers={{"Authorization": {HEADER_TOKEN!r}}},
                webhook_timeout_seconds=5,
            )
            try:
                send_webhook({{"notification_id": "n-1"}}, settings)
            except Exception as exc:
                print(f"{{type(exc).__name__}}: {{exc}}")
        """
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        )
    finally:
        receiver.close()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WebhookError: webhook 127.0.0.1:" in result.stdout
    assert "answered HTTP 401" in result.stdout and "unreachable: ConnectError" in result.stdout
    _assert_no_secret(result.stdout + result.stderr)
    assert "HTTP Request" not in result.stderr
