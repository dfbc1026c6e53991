"""Critical-result notification: a JSON webhook and an HL7 v2 ORU^R01 over MLLP.

When analysis makes a study critical, one ``notify`` job per enabled channel is queued in
the same transaction; the worker sends it and the job queue retries it with backoff until
the receiver accepts it (HTTP 2xx, HL7 ACK with AA/CA). A retry carries the same
notification id (webhook) or message control id (HL7), so receivers can drop duplicates.
Building the messages is pure; sending is the only I/O. Patient data never reaches the
logs: log lines name the job, study id and channel only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import hl7
import hl7.mllp
import httpx
from sqlalchemy.orm import Session

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.config import NotifySettings
from dicomnode.db.models import Job, Study
from dicomnode.db.session import READ_ONLY, as_utc, utcnow
from dicomnode.jobs.queue import enqueue

log = logging.getLogger("dicomnode.notify")

CRITICAL_TIERS = ("stat", "critical")
CHANNELS = ("webhook", "hl7")
# HL7 acknowledgment codes that mean the receiver took the message (original, enhanced).
ACCEPTED = ("AA", "CA")


def becomes_critical(tier_before: str, tier_after: str) -> bool:
    """True when a study enters a critical tier (STAT or critical) from a lower one."""
    return tier_after in CRITICAL_TIERS and tier_before not in CRITICAL_TIERS


def enabled_channels(settings: NotifySettings) -> list[str]:
    """Channels switched on in ``[notify]``."""
    enabled = {"webhook": settings.webhook_enabled, "hl7": settings.hl7_enabled}
    return [channel for channel in CHANNELS if enabled[channel]]


def enqueue_notifications(session: Session, study: Study, settings: NotifySettings) -> list[Job]:
    """Queue one notification job per enabled channel (the caller commits)."""
    return [
        enqueue(session, "notify", study.id, {"channel": channel})
        for channel in enabled_channels(settings)
    ]


@dataclass(frozen=True)
class FindingNote:
    code: str
    scheme: str
    meaning: str
    probability: float
    threshold: float
    critical: bool
    model: str

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class CriticalResult:
    """What a notification tells: the study, its tier and why."""

    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    modality: str
    tier: str
    ups_priority: str
    reason: str
    received_at: datetime
    due_at: datetime
    findings: list[FindingNote] = field(default_factory=list)


def critical_result(study: Study) -> CriticalResult:
    """The notification's content, read from the study's row and findings."""
    return CriticalResult(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        modality=study.modality,
        tier=study.tier,
        ups_priority=study.ups_priority,
        reason=study.reason,
        received_at=as_utc(study.received_at),
        due_at=as_utc(study.due_at),
        findings=[
            FindingNote(
                code=f.code_value,
                scheme=f.code_scheme,
                meaning=f.code_meaning,
                probability=f.probability,
                threshold=f.threshold,
                critical=f.critical,
                model=f"{f.model_name} {f.model_version}",
            )
            for f in sorted(study.findings, key=lambda f: -f.probability)
        ],
    )


# Webhook -----------------------------------------------------------------------------------


def webhook_body(result: CriticalResult, notification_id: str) -> dict:
    """JSON body of the webhook POST. It names the study by UID and accession, not patient."""
    return {
        "event": "critical_result",
        "notification_id": notification_id,
        "study_instance_uid": result.study_instance_uid,
        "accession_number": result.accession_number,
        "modality": result.modality,
        "tier": result.tier,
        "ups_priority": result.ups_priority,
        "reason": result.reason,
        "received_at": result.received_at.isoformat(),
        "due_at": result.due_at.isoformat(),
        "findings": [
            {
                "code": f.code,
                "scheme": f.scheme,
                "meaning": f.meaning,
                "probability": round(f.probability, 4),
                "threshold": f.threshold,
                "present": f.present,
                "critical": f.critical,
                "model": f.model,
            }
            for f in result.findings
        ],
        "notice": RESEARCH_DEMO_NOTICE,
    }


class WebhookError(RuntimeError):
    """A webhook that failed, told by its host and what went wrong only: the URL's path and
    query and the headers may hold the receiver's token, and this text is logged and kept in
    the job's last error, which admins see."""


def _webhook_host(url: str) -> str:
    """``host:port`` of the webhook URL (no user info, path or query)."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        return "(unparsable URL)"
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{host}:{parsed.port}" if parsed.port else host


def send_webhook(body: dict, settings: NotifySettings) -> str:
    """POST ``body`` as JSON; raises ``WebhookError`` on a network error or a non-2xx answer."""
    headers = {"Idempotency-Key": body["notification_id"], **settings.webhook_headers}
    host = _webhook_host(settings.webhook_url)
    # httpx's errors quote the URL (and may quote a header value): what is raised names the
    # failure and the host only, and not from the original, so no traceback prints it either.
    try:
        response = httpx.post(
            settings.webhook_url,
            json=body,
            headers=headers,
            timeout=settings.webhook_timeout_seconds,
        )
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        failure = f"webhook {host} unreachable: {type(exc).__name__}"
    except httpx.TimeoutException as exc:
        failure = (
            f"webhook {host} did not answer within {settings.webhook_timeout_seconds:g} s: "
            f"{type(exc).__name__}"
        )
    except Exception as exc:
        failure = f"webhook {host} request failed: {type(exc).__name__}"
    else:
        if response.is_success:
            return f"webhook HTTP {response.status_code}"
        failure = f"webhook {host} answered HTTP {response.status_code} {response.reason_phrase}"
    raise WebhookError(failure)


# HL7 v2 over MLLP --------------------------------------------------------------------------

_ENCODING = hl7.parse("MSH|^~\\&|")


def _text(value: object) -> str:
    """A value escaped for an HL7 field (separators become escape sequences)."""
    return _ENCODING.escape(str(value)) if value is not None else ""


def _person_name(dicom_name: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) as HL7 XPN (...^suffix^prefix)."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (_text(part) for part in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def _hl7_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def hl7_message(
    result: CriticalResult, control_id: str, settings: NotifySettings, now: datetime
) -> str:
    """ORU^R01 (HL7 v2.5.1): the tier, the reason and each finding's probability as OBX."""
    e = _text
    observed = _hl7_time(result.received_at)
    segments = [
        "|".join(
            [
                "MSH",
                "^~\\&",
                e(settings.hl7_sending_application),
                e(settings.hl7_sending_facility),
                e(settings.hl7_receiving_application),
                e(settings.hl7_receiving_facility),
                _hl7_time(now),
                "",
                "ORU^R01^ORU_R01",
                e(control_id),
                "P",
                "2.5.1",
            ]
        ),
        f"PID|1||{e(result.patient_id)}||{_person_name(result.patient_name)}",
        f"OBR|1||{e(result.accession_number)}|AI-TRIAGE^AI triage result^L|||{observed}"
        + "|" * 15
        + f"{_hl7_time(now)}|||P",
    ]
    observations = [
        ("ST", "AI-TIER^Worklist tier^L", e(result.tier), ""),
        ("ST", "AI-REASON^Reason^L", e(result.reason), ""),
        ("ST", "113014^Study Instance UID^DCM", e(result.study_instance_uid), ""),
    ]
    for finding in result.findings:
        observations.append(
            (
                "NM",
                f"{e(finding.code)}^{e(finding.meaning)}^{e(finding.scheme)}",
                f"{finding.probability:.4f}",
                "A" if finding.present else "N",
            )
        )
    for number, (kind, code, value, flag) in enumerate(observations, 1):
        segments.append(f"OBX|{number}|{kind}|{code}||{value}|||{flag}|||P")
    segments.append(f"NTE|1||{e(RESEARCH_DEMO_NOTICE)}")
    return "\r".join(segments)


async def _exchange(message: str, settings: NotifySettings) -> hl7.Message:
    timeout = settings.hl7_timeout_seconds
    reader, writer = await asyncio.wait_for(
        hl7.mllp.open_hl7_connection(settings.hl7_host, settings.hl7_port), timeout
    )
    try:
        writer.writemessage(message)
        await asyncio.wait_for(writer.drain(), timeout)
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()


def send_hl7(message: str, control_id: str, settings: NotifySettings) -> str:
    """Send over MLLP and wait for the ACK; raises unless it accepts this message."""
    try:
        ack = asyncio.run(_exchange(message, settings))
    except TimeoutError as exc:
        raise TimeoutError(
            f"no HL7 ACK from {settings.hl7_host}:{settings.hl7_port} within "
            f"{settings.hl7_timeout_seconds:g} s"
        ) from exc
    msa = ack.segment("MSA")
    code, acknowledged = str(msa(1)), str(msa(2))
    if acknowledged != control_id:
        raise ValueError(f"HL7 ACK is for message {acknowledged!r}, not {control_id!r}")
    if code not in ACCEPTED:
        raise ValueError(f"HL7 receiver answered {code} (MSA-1) to message {control_id}")
    return f"HL7 ACK {code}"


# Worker entry ------------------------------------------------------------------------------


def send_notification(
    session: Session, settings: NotifySettings, job: Job, now: datetime | None = None
) -> str:
    """Run one ``notify`` job: build the message from the study as it is now and send it.

    The study is read in a read-only transaction, ended before the message goes out: on
    SQLite a transaction that may write holds the write lock from its start, and every
    writer (the index writer, lease renewals, other workers' claims) waited for the
    receiver's answer, up to its timeout."""
    channel = job.payload.get("channel", "")
    if channel not in enabled_channels(settings):
        return f"channel {channel!r} not enabled; nothing sent"
    job_id = job.id  # the rollback below expires the job: read again, it would begin one
    read_only = not session.in_transaction()  # else the caller's transaction goes on
    if read_only:
        session.connection(execution_options=READ_ONLY)
    study = session.get(Study, job.study_id)
    result = None if study is None else critical_result(study)
    if read_only:
        session.rollback()
    if result is None:
        return "study no longer exists"
    if channel == "webhook":
        return send_webhook(webhook_body(result, f"dicomnode-notify-{job_id}"), settings)
    control_id = f"DN{job_id}"
    return send_hl7(
        hl7_message(result, control_id, settings, now or utcnow()), control_id, settings
    )
