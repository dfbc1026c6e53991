"""Worklist service on SQLite and PostgreSQL: reading order, filters, paging, claim, release,
complete, overrides, and the audit rows each change writes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from worklist_seed import NOW, add_study

from dicomnode.config import WorklistSettings
from dicomnode.db.models import AuditEntry, Study
from dicomnode.db.session import as_utc
from dicomnode.worklist import audit
from dicomnode.worklist.service import (
    ClaimConflict,
    InvalidRequest,
    StudyNotFound,
    WorklistError,
    claim,
    complete,
    count,
    override,
    reading_order,
    release,
    reprioritise,
    study_row,
)

LATER = NOW + timedelta(minutes=1)
SITE = WorklistSettings()


def _order(session, **filters) -> list[str]:
    return [row.accession_number for row in reading_order(session, site=SITE, **filters)]


def _audit(session, uid: str) -> list[AuditEntry]:
    return list(
        session.scalars(
            select(AuditEntry).where(AuditEntry.study_instance_uid == uid).order_by(AuditEntry.id)
        )
    )


def test_critical_first_then_by_due_time_with_statuses(sessions) -> None:
    with sessions() as session:
        add_study(session, "ROUTINE-OLD", minutes_ago=60, probability=0.1)
        add_study(session, "PENDING", minutes_ago=30)
        critical = add_study(session, "CRITICAL", minutes_ago=5, probability=0.9)
        assert _order(session) == ["CRITICAL", "ROUTINE-OLD", "PENDING"]
        rows = {row.accession_number: row for row in reading_order(session, site=SITE)}
        assert rows["CRITICAL"].priority == "critical"
        assert "Pneumothorax 90%" in rows["CRITICAL"].reason
        assert rows["CRITICAL"].status == "ready"
        assert rows["PENDING"].status == "waiting"
        assert rows["CRITICAL"].findings[0].present
        assert study_row(session, critical, SITE).study_instance_uid == critical


def test_findings_are_flagged_as_the_site_sets_them(sessions) -> None:
    """A row's findings are present and critical by the site's thresholds and critical
    lists, as its priority was set, not by the model card's (a routine study showed a red
    critical finding at a probability under the site's threshold)."""
    site = WorklistSettings(thresholds={"Pneumothorax": 0.95}, non_critical_findings=[])
    calm = WorklistSettings(non_critical_findings=["pneumothorax"])
    with sessions() as session:
        uid = add_study(session, "PTX", probability=0.9)
        assert [(f.present, f.critical) for f in study_row(session, uid, SITE).findings] == [
            (True, True)
        ]
        assert [(f.present, f.critical) for f in study_row(session, uid, site).findings] == [
            (False, True)
        ]
        [row] = reading_order(session, site=calm)
        assert [(f.present, f.critical) for f in row.findings] == [(True, False)]


def test_claim_release_complete_change_state_and_write_audit_rows(sessions) -> None:
    with sessions() as session:
        uid = add_study(session, "ACC1", probability=0.9)
        study = claim(session, uid, "dr_house", NOW)
        assert (study.reading_status, study.claimed_by) == ("in_progress", "dr_house")
        # Claiming again as the same reader is harmless and writes nothing new.
        claim(session, uid, "dr_house", NOW)
        release(session, uid, "dr_house", LATER)
        row = study_row(session, uid, SITE)
        assert (row.status, row.claimed_by) == ("ready", "")
        claim(session, uid, "dr_grey", LATER)
        complete(session, uid, "dr_grey", LATER + timedelta(minutes=5))
        row = study_row(session, uid, SITE)
        assert (row.status, row.reported_by) == ("reported", "dr_grey")
        entries = _audit(session, uid)
        assert [(e.actor, e.action) for e in entries] == [
            ("dr_house", "claim"),
            ("dr_house", "release"),
            ("dr_grey", "claim"),
            ("dr_grey", "complete"),
        ]
        assert entries[0].at is not None
        assert "released claim of dr_house" in entries[1].detail


def test_claim_by_someone_else_fails_with_a_clear_error(sessions) -> None:
    with sessions() as session:
        uid = add_study(session, "ACC2", probability=0.9)
        claim(session, uid, "dr_house", NOW)
    with sessions() as session, pytest.raises(ClaimConflict, match="being read by dr_house"):
        claim(session, uid, "dr_grey", LATER)
    with sessions() as session, pytest.raises(ClaimConflict, match="only they or an admin"):
        release(session, uid, "dr_grey", LATER)
    with sessions() as session, pytest.raises(ClaimConflict, match="only they can complete"):
        complete(session, uid, "dr_grey", LATER)
    with sessions() as session:
        # An admin may release a forgotten claim; the audit row names whose claim it was.
        release(session, uid, "admin", LATER, force=True)
        assert study_row(session, uid, SITE).status == "ready"
        assert _audit(session, uid)[-1].detail == "released claim of dr_house"
        assert [e.action for e in _audit(session, uid)] == ["claim", "release"]


def test_reported_studies_leave_the_list_and_cannot_be_claimed(sessions) -> None:
    with sessions() as session:
        uid = add_study(session, "DONE", probability=0.9)
        add_study(session, "OPEN", probability=0.2)
        claim(session, uid, "dr_house", NOW)
        complete(session, uid, "dr_house", NOW)
        assert _order(session) == ["OPEN"]
        assert count(session) == 1
        assert _order(session, status=["reported"]) == ["DONE"]
    with sessions() as session, pytest.raises(WorklistError, match="already reported"):
        claim(session, uid, "dr_grey", LATER)


@pytest.mark.parametrize("analysed", [True, False], ids=["ready", "waiting"])
def test_complete_needs_the_callers_claim(sessions, analysed: bool) -> None:
    """Completing an unclaimed study is refused, as the page never offers it: a report is
    recorded only by whoever claimed the study; nothing changes and nothing is audited."""
    with sessions() as session:
        uid = add_study(session, "ACC", probability=0.9 if analysed else None)
        status = "ready" if analysed else "waiting"
        assert study_row(session, uid, SITE).status == status
    with sessions() as session, pytest.raises(WorklistError) as refused:
        complete(session, uid, "dr_house", NOW)
    assert str(refused.value) == (
        f"study {uid} is not claimed by anyone; claim it before completing it"
    )
    with sessions() as session:
        row = study_row(session, uid, SITE)
        assert (row.status, row.claimed_by, row.reported_by) == (status, "", "")
        assert _audit(session, uid) == []
        claim(session, uid, "dr_house", NOW)
        complete(session, uid, "dr_house", LATER)
        row = study_row(session, uid, SITE)
        assert (row.status, row.reported_by, row.reported_at) == ("reported", "dr_house", LATER)
        assert [(e.action, e.detail) for e in _audit(session, uid)] == [
            ("claim", ""),
            ("complete", ""),
        ]


def test_override_moves_the_study_and_is_audited_with_reason(sessions) -> None:
    with sessions() as session:
        add_study(session, "CRITICAL", minutes_ago=5, probability=0.95)
        routine = add_study(session, "ROUTINE", minutes_ago=20, probability=0.1)
        assert _order(session) == ["CRITICAL", "ROUTINE"]
        reason = "clinician called: trauma"
        study = override(session, routine, "dr_house", "stat", reason, NOW, SITE)
        assert (study.tier, study.ups_priority) == ("stat", "HIGH")
        assert "override by dr_house: clinician called: trauma" in study.reason
        assert _order(session) == ["ROUTINE", "CRITICAL"]
        entry = _audit(session, routine)[-1]
        assert (entry.actor, entry.action) == ("dr_house", "override")
        assert entry.detail == "tier routine -> stat"
        assert entry.reason == "clinician called: trauma"

        override(session, routine, "dr_house", None, "resolved by phone", LATER, SITE)
        assert _order(session) == ["CRITICAL", "ROUTINE"]
        assert study_row(session, routine, SITE).override_tier == ""
        assert _audit(session, routine)[-1].action == "clear_override"


def test_override_survives_reanalysis(sessions) -> None:
    with sessions() as session:
        uid = add_study(session, "ACC", probability=0.9)
        override(session, uid, "dr_house", "routine", "known chronic finding", NOW, SITE)
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        reprioritise(session, study, LATER, SITE)
        assert study.tier == "routine"
        assert "known chronic finding" in study.reason


def test_an_override_set_and_cleared_keeps_the_sites_worklist_settings(sessions) -> None:
    """The override is due by the site's max wait for its tier, and cleared, the study gets
    the site's policy back (both used the built-in defaults: a day ahead of other routine
    studies, and a finding the site calls non-critical critical again)."""
    site = WorklistSettings(
        max_wait_minutes={"stat": 15, "critical": 60, "urgent": 480, "routine": 2880},
        non_critical_findings=["Pneumothorax"],
    )
    with sessions() as session:
        uid = add_study(session, "PTX", minutes_ago=0, probability=0.95)
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        reprioritise(session, study, NOW, site)
        assert study.tier == "urgent"
        received = as_utc(study.received_at)

        override(session, uid, "dr_house", "urgent", "clinician called", NOW, site)
        assert as_utc(study.due_at) - received == timedelta(minutes=480)
        override(session, uid, "dr_house", None, "mistake", LATER, site)
        assert (study.tier, study.ups_priority) == ("urgent", "MEDIUM")
        assert as_utc(study.due_at) - received == timedelta(minutes=480)


def test_override_needs_a_known_tier_and_a_reason(sessions) -> None:
    with sessions() as session:
        uid = add_study(session, "ACC", probability=0.9)
        with pytest.raises(InvalidRequest, match="needs a reason"):
            override(session, uid, "dr_house", "stat", "  ", NOW, SITE)
        with pytest.raises(InvalidRequest, match="not one of"):
            override(session, uid, "dr_house", "asap", "why not", NOW, SITE)
        with pytest.raises(StudyNotFound):
            override(session, "1.2.3.4", "dr_house", "stat", "why not", NOW, SITE)


def test_filters_and_paging(sessions) -> None:
    with sessions() as session:
        for index in range(5):
            add_study(session, f"DX{index}", minutes_ago=50 - index, probability=0.1)
        add_study(session, "CT0", minutes_ago=40, modality="CT", probability=0.1)
        add_study(session, "PTX", minutes_ago=1, probability=0.8)
        pending = add_study(session, "PENDING", minutes_ago=2)
        claim(session, pending, "dr_house", NOW)

        assert count(session) == 8
        assert _order(session, modality=["ct"]) == ["CT0"]
        assert _order(session, tier=["critical"]) == ["PTX"]
        assert _order(session, status=["in_progress"]) == ["PENDING"]
        assert count(session, modality=["DX"], tier=["routine"]) == 6
        everything = _order(session)
        assert everything[0] == "PTX"
        pages = [_order(session, limit=3, offset=offset) for offset in (0, 3, 6)]
        assert [accession for page in pages for accession in page] == everything
        assert [len(page) for page in pages] == [3, 3, 2]


def test_audit_entries_newest_first_and_filtered(sessions) -> None:
    with sessions() as session:
        uid = add_study(session, "ACC", probability=0.9)
        claim(session, uid, "dr_house", NOW)
        audit.record(session, "dr_grey", "view_study", LATER, study_instance_uid=uid)
        session.commit()
        assert [e.action for e in audit.entries(session)] == ["view_study", "claim"]
        assert [e.action for e in audit.entries(session, actor="dr_house")] == ["claim"]
        assert len(audit.entries(session, study_instance_uid=uid, limit=1)) == 1


def test_the_view_throttle_forgets_views_older_than_its_interval() -> None:
    views = audit.ViewThrottle(timedelta(minutes=5))
    views.PRUNE_AT = 3
    for study in ("1.1", "1.2", "1.3"):
        assert views.due("dr_house", f"images of {study}", NOW)
    assert not views.due("dr_house", "images of 1.1", NOW + timedelta(minutes=4))
    # Views past the bound: those older than the interval are forgotten, not kept for ever
    # (one per user and study whose images were seen); recent ones are kept.
    later = NOW + timedelta(minutes=6)
    assert views.due("dr_grey", "images of 1.1", later)
    assert views.due("dr_grey", "images of 1.2", later)
    assert views.due("dr_grey", "images of 1.3", later)
    assert views.due("dr_grey", "images of 1.4", later)
    assert len(views._last) == 4  # dr_house's three forgotten at dr_grey's first
    assert not views.due("dr_grey", "images of 1.1", later + timedelta(minutes=1))
