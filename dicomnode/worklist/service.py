"""The reading worklist in the database: priorities, reading order,
claim/release/complete/reopen, manual overrides, new images after a reader looked at a study;
every change is written to the audit log in the same transaction."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Row, and_, func, select, text
from sqlalchemy.orm import Session, selectinload

from dicomnode.config import WorklistSettings
from dicomnode.db.models import FindingRow, ResultObject, Study
from dicomnode.db.session import as_utc
from dicomnode.worklist import audit
from dicomnode.worklist.policy import (
    TIERS,
    UNREADABLE_ERROR,
    FindingFact,
    Priority,
    StudyFacts,
    after_report,
    apply_overrides,
    arrival,
    failure_kind,
    failure_text,
    keeps_new_images_on_release,
    max_waits,
    new_images_text,
    prioritise,
)

READING_STATUSES = ("waiting", "ready", "in_progress", "reported")
# Exactly the partial index's condition (ix_studies_open_due), as literal SQL: SQLite uses a
# partial index only when the query repeats its WHERE term, and a bound parameter does not.
OPEN = text("studies.reading_status != 'reported'")


class WorklistError(Exception):
    """A worklist action that cannot be done now; the message says why and what to do."""


class StudyNotFound(WorklistError):
    """No study with that Study Instance UID."""


class ClaimConflict(WorklistError):
    """Someone else is reading the study."""


class NotAllowed(WorklistError):
    """The caller may not do this to the study (e.g. reopen someone else's report)."""


class InvalidRequest(WorklistError):
    """The request itself is wrong (unknown tier, missing reason)."""


def reprioritise(
    session: Session,
    study: Study,
    now: datetime,
    settings: WorklistSettings,
) -> None:
    """Apply the site's policy and any manual override to a study (the caller commits)."""
    facts = StudyFacts(
        received_at=as_utc(study.received_at),
        modality=study.modality,
        analysis_status=study.analysis_status,
        not_run=tuple(name for name in (study.models_not_run or "").split(", ") if name),
        failure=failure_kind(study.analysis_error) if study.analysis_status == "failed" else "",
        images=study.image_count or 0,
        unreadable_images=study.unreadable_image_count or 0,
        new_images_after_report_at=(
            as_utc(study.new_images_at)
            if study.new_images_at and after_report(study.new_images or 0, study.reported_by)
            else None
        ),
    )
    findings = [
        FindingFact(f.code_meaning, f.probability, f.threshold, f.critical) for f in study.findings
    ]
    priority = prioritise(facts, findings, now, settings)
    priority = _with_override(study, priority, arrival(facts), max_waits(settings))
    study.tier = priority.tier
    study.tier_rank = priority.tier_rank
    study.score = priority.score
    study.ups_priority = priority.ups_priority
    study.reason = priority.reason
    study.due_at = priority.due_at
    if study.reading_status in ("waiting", "ready"):
        study.reading_status = _unclaimed_status(study)


def _with_override(
    study: Study, priority: Priority, arrived: datetime, waits: dict[str, timedelta]
) -> Priority:
    """A radiologist's override wins over the AI until cleared; due by the tier's max wait
    after the study's unread work ``arrived`` (policy.arrival)."""
    if not study.override_tier:
        return priority
    tier = study.override_tier
    rank, ups = TIERS[tier]
    return replace(
        priority,
        tier=tier,
        tier_rank=rank,
        ups_priority=ups,
        reason=f"override by {study.override_by}: {study.override_reason} ({priority.reason})",
        due_at=arrived + waits[tier],
    )


def _unclaimed_status(study: Study) -> str:
    return "ready" if study.analysis_status in ("analysed", "failed") else "waiting"


def _study(session: Session, study_instance_uid: str, *, lock: bool = False) -> Study:
    query = select(Study).where(Study.study_instance_uid == study_instance_uid)
    if lock:
        # Two radiologists claiming at once: the second waits, then sees the first's claim.
        # (SQLite has no row locks; its BEGIN IMMEDIATE serialises writers already.)
        query = query.with_for_update()
    study = session.scalars(query.options(selectinload(Study.findings))).one_or_none()
    if study is None:
        raise StudyNotFound(f"no study with Study Instance UID {study_instance_uid}")
    return study


def _not_reported(study: Study) -> None:
    if study.reading_status == "reported":
        raise WorklistError(
            f"study {study.study_instance_uid} was already reported by {study.reported_by}"
        )


def claim(session: Session, study_instance_uid: str, username: str, now: datetime) -> Study:
    """Mark the study as being read by ``username`` (idempotent for the same reader); commits."""
    study = _study(session, study_instance_uid, lock=True)
    _not_reported(study)
    if study.claimed_by == username and study.reading_status == "in_progress":
        return study
    if study.reading_status == "in_progress":
        raise ClaimConflict(
            f"study {study_instance_uid} is being read by {study.claimed_by} since "
            f"{as_utc(study.claimed_at):%Y-%m-%d %H:%M} UTC; ask them or an admin to release it"
        )
    study.reading_status = "in_progress"
    study.claimed_by = username
    study.claimed_at = now
    audit.record(session, username, "claim", now, study_instance_uid=study_instance_uid)
    session.commit()
    return study


def release(
    session: Session, study_instance_uid: str, username: str, now: datetime, *, force: bool = False
) -> Study:
    """Give a claimed study back to the list; only its reader may, or anyone with ``force``."""
    study = _study(session, study_instance_uid, lock=True)
    _not_reported(study)
    if study.reading_status != "in_progress":
        raise WorklistError(f"study {study_instance_uid} is not claimed by anyone")
    if study.claimed_by != username and not force:
        raise ClaimConflict(
            f"study {study_instance_uid} is claimed by {study.claimed_by}, not by you; "
            "only they or an admin can release it"
        )
    detail = f"released claim of {study.claimed_by}"
    study.reading_status = _unclaimed_status(study)
    study.claimed_by = ""
    study.claimed_at = None
    if study.new_images and not keeps_new_images_on_release(study.reported_by):
        study.new_images = 0
        study.new_images_at = None
    audit.record(
        session, username, "release", now, study_instance_uid=study_instance_uid, detail=detail
    )
    session.commit()
    return study


def complete(session: Session, study_instance_uid: str, username: str, now: datetime) -> Study:
    """Mark the study reported by ``username``, who must have claimed it (admins too, as on
    the page: a report is recorded only by its reader); it leaves the worklist; commits."""
    study = _study(session, study_instance_uid, lock=True)
    _not_reported(study)
    if study.reading_status != "in_progress":
        raise WorklistError(
            f"study {study_instance_uid} is not claimed by anyone; claim it before completing it"
        )
    if study.claimed_by != username:
        raise ClaimConflict(
            f"study {study_instance_uid} is being read by {study.claimed_by}; "
            "only they can complete it"
        )
    # The report covers the images that came after an earlier report or during the claim.
    detail = new_images_text(study.new_images or 0, study.reported_by)
    study.reading_status = "reported"
    study.reported_by = username
    study.reported_at = now
    study.new_images = 0
    study.new_images_at = None
    audit.record(
        session, username, "complete", now, study_instance_uid=study_instance_uid, detail=detail
    )
    session.commit()
    return study


def note_new_images(
    session: Session,
    study_id: int,
    arrived: int,
    now: datetime,
    settings: WorklistSettings,
    sender: str = "",
) -> None:
    """Record that ``arrived`` instances came after a reader looked at the study (the ingest
    counted them on its row, :data:`policy.NEW_IMAGE_STATUSES`): priority and due time again
    (after a report, due from the first new image) and an audit entry by the node; the
    caller commits, with the instances."""
    study = session.scalars(
        select(Study)
        .where(Study.id == study_id)
        .options(selectinload(Study.findings))
        .execution_options(populate_existing=True)
    ).one()
    reprioritise(session, study, now, settings)
    claimed = study.reading_status == "in_progress"
    where = f"in progress with {study.claimed_by}" if claimed else "on the worklist"
    audit.record(
        session,
        audit.NODE,
        "new_images",
        now,
        study_instance_uid=study.study_instance_uid,
        detail=(
            f"{arrived} instance(s) received{f' from {sender}' if sender else ''}; "
            f"{new_images_text(study.new_images, study.reported_by)}; {where}"
        ),
    )


def reopen(
    session: Session, study_instance_uid: str, username: str, now: datetime, *, force: bool = False
) -> Study:
    """Put a reported study back on the worklist; only its reporter may, or anyone with
    ``force`` (an admin); commits.

    It comes back in progress, claimed by whoever reopened it (one rule for everyone: the
    reporter goes on reading it, an admin who does not can release it like any claim).
    Priority and due time are kept as they were: completing does not change them."""
    study = _study(session, study_instance_uid, lock=True)
    if study.reading_status != "reported":
        raise WorklistError(
            f"study {study_instance_uid} is not reported; there is nothing to reopen"
        )
    if study.reported_by != username and not force:
        raise NotAllowed(
            f"study {study_instance_uid} was reported by {study.reported_by}, not by you; "
            "only they or an admin can reopen it"
        )
    detail = (
        f"reopened report of {study.reported_by} "
        f"from {as_utc(study.reported_at):%Y-%m-%d %H:%M:%S} UTC"
    )
    study.reading_status = "in_progress"
    study.claimed_by = username
    study.claimed_at = now
    study.reported_by = ""
    study.reported_at = None
    audit.record(
        session, username, "reopen", now, study_instance_uid=study_instance_uid, detail=detail
    )
    session.commit()
    return study


def override(
    session: Session,
    study_instance_uid: str,
    username: str,
    tier: str | None,
    reason: str,
    now: datetime,
    settings: WorklistSettings,
) -> Study:
    """Set (or with ``tier`` None clear) a manual priority tier, with the reason; commits.
    The study is due by the site's max wait for the tier, and cleared, it gets the site's
    policy again."""
    if tier is not None and tier not in TIERS:
        raise InvalidRequest(f"tier {tier!r} is not one of {', '.join(TIERS)}")
    reason = reason.strip()
    if not reason:
        raise InvalidRequest("a manual priority override needs a reason")
    study = _study(session, study_instance_uid, lock=True)
    _not_reported(study)
    before = study.tier
    study.override_tier = tier or ""
    study.override_reason = reason if tier else ""
    study.override_by = username if tier else ""
    study.override_at = now if tier else None
    reprioritise(session, study, now, settings)
    audit.record(
        session,
        username,
        "override" if tier else "clear_override",
        now,
        study_instance_uid=study_instance_uid,
        detail=f"tier {before} -> {study.tier}",
        reason=reason,
    )
    session.commit()
    return study


@dataclass
class WorklistFinding:
    code: str
    scheme: str
    meaning: str
    probability: float
    present: bool
    critical: bool
    model: str


@dataclass
class WorklistResult:
    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    model: str


@dataclass
class WorklistRow:
    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    modality: str
    study_description: str
    priority: str
    ups_priority: str
    score: float
    reason: str
    received_at: datetime
    due_at: datetime
    status: str
    analysis_status: str
    claimed_by: str
    claimed_at: datetime | None
    reported_by: str
    reported_at: datetime | None
    override_tier: str
    override_reason: str
    override_by: str
    findings: list[WorklistFinding] = field(default_factory=list)
    # Instances that no report covers, arrived after the study was reported or while it was
    # claimed (policy.new_images_text), and when the first of them arrived.
    new_images: int = 0
    new_images_at: datetime | None = None
    new_images_text: str = ""
    results: list[WorklistResult] = field(default_factory=list)
    # A failed analysis: why (policy.UNREADABLE or policy.FAILED_OTHER) and the row's words.
    analysis_failure: str = ""
    analysis_failure_text: str = ""


def _where(
    modality: Sequence[str], tier: Sequence[str], status: Sequence[str]
) -> ColumnElement[bool]:
    conditions: list[ColumnElement[bool]] = []
    if status:
        conditions.append(Study.reading_status.in_(status))
    else:
        conditions.append(OPEN)
    if modality:
        conditions.append(Study.modality.in_([m.upper() for m in modality]))
    if tier:
        conditions.append(Study.tier.in_(tier))
    return and_(*conditions)


def reading_order(
    session: Session,
    limit: int = 200,
    offset: int = 0,
    *,
    site: WorklistSettings,
    modality: Sequence[str] = (),
    tier: Sequence[str] = (),
    status: Sequence[str] = (),
) -> list[WorklistRow]:
    """Studies in the order radiologists should read them (earliest due first), their
    findings flagged by the ``site``'s thresholds and critical findings.

    Without ``status``, the open worklist: every study not yet reported.
    """
    studies = session.execute(
        select(*ROW_COLUMNS)
        .where(_where(modality, tier, status))
        .order_by(Study.due_at, Study.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return _worklist_rows(session, studies, site)


def count(
    session: Session,
    *,
    modality: Sequence[str] = (),
    tier: Sequence[str] = (),
    status: Sequence[str] = (),
) -> int:
    """How many studies ``reading_order`` with the same filters would page through."""
    return session.scalar(
        select(func.count()).select_from(Study).where(_where(modality, tier, status))
    )


def study_row(session: Session, study_instance_uid: str, site: WorklistSettings) -> WorklistRow:
    """One study as a worklist row, reported or not (findings flagged as the ``site`` says)."""
    studies = session.execute(
        select(*ROW_COLUMNS).where(Study.study_instance_uid == study_instance_uid)
    ).all()
    if not studies:
        raise StudyNotFound(f"no study with Study Instance UID {study_instance_uid}")
    return _worklist_rows(session, studies, site)[0]


# What a worklist row shows, read as plain columns: building ORM objects for a page of
# studies with their findings and results costs several times the queries themselves.
ROW_COLUMNS = (
    Study.id,
    Study.study_instance_uid,
    Study.accession_number,
    Study.patient_id,
    Study.patient_name,
    Study.modality,
    Study.study_description,
    Study.tier,
    Study.ups_priority,
    Study.score,
    Study.reason,
    Study.received_at,
    Study.due_at,
    Study.reading_status,
    Study.analysis_status,
    # Enough of the analysis error to tell its failure kind (policy.failure_kind).
    func.substr(Study.analysis_error, 1, len(UNREADABLE_ERROR)).label("analysis_error_head"),
    Study.claimed_by,
    Study.claimed_at,
    Study.reported_by,
    Study.reported_at,
    Study.override_tier,
    Study.override_reason,
    Study.override_by,
    Study.new_images,
    Study.new_images_at,
)
FINDING_COLUMNS = (
    FindingRow.study_id,
    FindingRow.code_value,
    FindingRow.code_scheme,
    FindingRow.code_meaning,
    FindingRow.probability,
    FindingRow.threshold,
    FindingRow.critical,
    FindingRow.model_name,
    FindingRow.model_version,
)
RESULT_COLUMNS = (
    ResultObject.id,
    ResultObject.study_id,
    ResultObject.kind,
    ResultObject.sop_instance_uid,
    ResultObject.series_instance_uid,
    ResultObject.model_name,
    ResultObject.model_version,
)


def _worklist_rows(
    session: Session, studies: Sequence[Row], site: WorklistSettings
) -> list[WorklistRow]:
    ids = [study.id for study in studies]
    findings: dict[int, list[Row]] = defaultdict(list)
    results: dict[int, list[Row]] = defaultdict(list)
    if ids:
        for finding in session.execute(
            select(*FINDING_COLUMNS).where(FindingRow.study_id.in_(ids))
        ):
            findings[finding.study_id].append(finding)
        for result in session.execute(
            select(*RESULT_COLUMNS).where(ResultObject.study_id.in_(ids))
        ):
            results[result.study_id].append(result)
    return [worklist_row(study, findings[study.id], results[study.id], site) for study in studies]


def worklist_row(
    study: Row, findings: Sequence[Row], results: Sequence[Row], site: WorklistSettings
) -> WorklistRow:
    """A study's columns with its findings and results, as the worklist shows it: a finding
    is present and critical by the ``site``'s thresholds and lists where they name it (as
    the priority was set), else by its model card's."""
    ordered = sorted(findings, key=lambda f: -f.probability)
    flagged = apply_overrides(
        [FindingFact(f.code_meaning, f.probability, f.threshold, f.critical) for f in ordered],
        site,
    )
    failure = failure_kind(study.analysis_error_head) if study.analysis_status == "failed" else ""
    flag = new_images_text(study.new_images, study.reported_by)
    return WorklistRow(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        modality=study.modality,
        study_description=study.study_description,
        priority=study.tier,
        ups_priority=study.ups_priority,
        score=study.score,
        # The flag leads: it is why a reported study is back, and what to read.
        reason=f"{flag}; {study.reason}" if flag else study.reason,
        received_at=as_utc(study.received_at),
        due_at=as_utc(study.due_at),
        status=study.reading_status,
        analysis_status=study.analysis_status,
        analysis_failure=failure,
        analysis_failure_text=failure_text(failure) if failure else "",
        claimed_by=study.claimed_by,
        claimed_at=as_utc(study.claimed_at) if study.claimed_at else None,
        reported_by=study.reported_by,
        reported_at=as_utc(study.reported_at) if study.reported_at else None,
        override_tier=study.override_tier,
        override_reason=study.override_reason,
        override_by=study.override_by,
        new_images=study.new_images,
        new_images_at=as_utc(study.new_images_at) if study.new_images_at else None,
        new_images_text=flag,
        findings=[
            WorklistFinding(
                code=f.code_value,
                scheme=f.code_scheme,
                meaning=f.code_meaning,
                probability=f.probability,
                present=fact.present,
                critical=fact.critical,
                model=f"{f.model_name} {f.model_version}",
            )
            for f, fact in zip(ordered, flagged, strict=True)
        ],
        results=[
            WorklistResult(
                kind=r.kind,
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_instance_uid,
                model=f"{r.model_name} {r.model_version}",
            )
            for r in sorted(results, key=lambda r: (r.kind != "sr", r.id))
        ],
    )
