"""The worklist policy's due time: tier max waits from the configuration, the head start a
critical study gets over routine ones (and no more: aging), the AI confidence's share of
it, what the request asks for, and that a pending or failed analysis never demotes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomnode.config import MaxWaitMinutes, WorklistSettings, load_settings
from dicomnode.tomlfile import ConfigError
from dicomnode.worklist.policy import (
    FindingFact,
    StudyFacts,
    head_start_share,
    max_waits,
    prioritise,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SITE = WorklistSettings(
    max_wait_minutes=MaxWaitMinutes(stat=10, critical=20, urgent=90, routine=300)
)
HEAD_START = timedelta(minutes=300 - 20)


def analysed(minutes_after_now: float = 0.0, **facts: str) -> StudyFacts:
    return StudyFacts(
        received_at=NOW + timedelta(minutes=minutes_after_now), analysis_status="analysed", **facts
    )


def pneumothorax(probability: float = 0.9, threshold: float = 0.5) -> FindingFact:
    return FindingFact("Pneumothorax", probability, threshold, critical=True)


def effusion(probability: float = 0.9) -> FindingFact:
    return FindingFact("Pleural effusion", probability, 0.5, critical=False)


def due(study: StudyFacts, findings: list[FindingFact], settings=SITE) -> datetime:
    return prioritise(study, findings, NOW, settings).due_at


@pytest.mark.parametrize(
    ("study", "findings", "tier", "minutes"),
    [
        (analysed(requested_priority="STAT"), [], "stat", 10),
        (analysed(), [pneumothorax()], "critical", 20),
        (analysed(), [effusion()], "urgent", 90),
        (analysed(), [], "routine", 300),
    ],
)
def test_due_is_arrival_plus_the_configured_max_wait_of_the_tier(
    study: StudyFacts, findings: list[FindingFact], tier: str, minutes: float
) -> None:
    priority = prioritise(study, findings, NOW, SITE)
    assert priority.tier == tier
    assert priority.due_at == study.received_at + timedelta(minutes=minutes)
    assert max_waits(SITE)[tier] == timedelta(minutes=minutes)


def test_critical_study_overtakes_only_routine_studies_younger_than_its_head_start() -> None:
    routine = due(analysed(), [])
    # Arrived less than the head start later: read first.
    assert due(analysed(HEAD_START.total_seconds() / 60 - 1), [pneumothorax()]) < routine
    # Arrived more than the head start later: the routine study has aged past it.
    assert due(analysed(HEAD_START.total_seconds() / 60 + 1), [pneumothorax()]) > routine


def test_an_old_routine_study_is_read_before_a_new_stat_one_once_it_has_aged_enough() -> None:
    stat_head_start = 300 - 10
    routine = due(analysed(), [])
    assert due(analysed(stat_head_start + 1, requested_priority="STAT"), []) > routine
    assert due(analysed(stat_head_start - 1, requested_priority="STAT"), []) < routine


def test_due_time_does_not_depend_on_now() -> None:
    study, findings = analysed(), [pneumothorax(0.7)]
    first = prioritise(study, findings, NOW, SITE)
    later = prioritise(study, findings, NOW + timedelta(days=3), SITE)
    assert first == later


@pytest.mark.parametrize("status", ["receiving", "queued", "analysing", "failed", "unknown"])
def test_pending_or_failed_analysis_never_demotes(status: str) -> None:
    waiting = StudyFacts(NOW, analysis_status=status)
    # Without findings yet: exactly where an analysed study without findings would be.
    assert due(waiting, []) == due(analysed(), [])
    assert prioritise(waiting, [], NOW, SITE).tier == "routine"
    # Findings kept from an earlier run still count while a re-analysis is pending or failed.
    kept = prioritise(waiting, [pneumothorax()], NOW, SITE)
    assert kept.tier == "critical"
    assert kept.due_at == due(analysed(), [pneumothorax()])
    # What the request asks for never waits on the AI.
    stat = prioritise(StudyFacts(NOW, "DX", "STAT", analysis_status=status), [], NOW, SITE)
    assert (stat.tier, stat.due_at) == ("stat", NOW + timedelta(minutes=10))


def test_confidence_sets_the_share_of_the_head_start() -> None:
    scaled = SITE.model_copy(update={"full_head_start_probability": 0.9})
    assert head_start_share(pneumothorax(0.5), scaled) == pytest.approx(0.25)
    assert head_start_share(pneumothorax(0.9), scaled) == 1.0
    assert head_start_share(pneumothorax(0.99), scaled) == 1.0
    shares = [head_start_share(pneumothorax(p), scaled) for p in (0.5, 0.6, 0.7, 0.8, 0.9)]
    assert shares == sorted(shares) and len(set(shares)) == 5
    # Off by default: any present finding earns the whole head start.
    assert head_start_share(pneumothorax(0.51), SITE) == 1.0
    routine = due(analysed(), [], scaled)
    at_threshold = due(analysed(), [pneumothorax(0.5)], scaled)
    assert at_threshold == routine - HEAD_START * 0.25
    assert due(analysed(), [pneumothorax(0.95)], scaled) == NOW + timedelta(minutes=20)
    # Still the critical tier and still ahead of a routine study of the same arrival.
    assert prioritise(analysed(), [pneumothorax(0.5)], NOW, scaled).tier == "critical"
    assert at_threshold < routine


def test_urgent_order_and_location_tiers() -> None:
    settings = SITE.model_copy(update={"urgent_locations": ["ED", "ICU"]})
    high = prioritise(analysed(requested_priority="high"), [], NOW, settings)
    assert (high.tier, high.reason) == ("urgent", "ordered HIGH")
    ed = prioritise(analysed(patient_location="ed"), [], NOW, settings)
    assert (ed.tier, ed.reason, ed.ups_priority) == ("urgent", "patient in ed", "MEDIUM")
    assert prioritise(analysed(patient_location="WARD 3"), [], NOW, settings).tier == "routine"


def test_stronger_of_order_and_ai_wins_and_both_are_named() -> None:
    scaled = SITE.model_copy(update={"full_head_start_probability": 0.99})
    both = prioritise(analysed(requested_priority="HIGH"), [pneumothorax(0.6)], NOW, scaled)
    assert both.tier == "critical"
    assert both.reason == "AI critical: Pneumothorax 60%; ordered HIGH"
    # A weak critical finding never makes an urgent order wait longer than the order asks.
    assert both.due_at == NOW + timedelta(minutes=90)
    stat = prioritise(analysed(requested_priority="STAT"), [pneumothorax(0.6)], NOW, scaled)
    assert (stat.tier, stat.reason) == ("stat", "ordered STAT; AI: Pneumothorax 60%")
    assert stat.due_at == NOW + timedelta(minutes=10)


def test_site_overrides_of_threshold_and_criticality() -> None:
    settings = SITE.model_copy(
        update={
            "thresholds": {"pneumothorax": 0.8},
            "critical_findings": ["Pleural effusion"],
        }
    )
    assert prioritise(analysed(), [pneumothorax(0.7)], NOW, settings).tier == "routine"
    assert prioritise(analysed(), [pneumothorax(0.85)], NOW, settings).tier == "critical"
    assert prioritise(analysed(), [effusion(0.6)], NOW, settings).tier == "critical"
    demoted = SITE.model_copy(update={"non_critical_findings": ["PNEUMOTHORAX"]})
    assert prioritise(analysed(), [pneumothorax(0.9)], NOW, demoted).tier == "urgent"


def test_max_waits_must_not_decrease_down_the_tiers() -> None:
    with pytest.raises(ValueError, match="must not decrease"):
        MaxWaitMinutes(critical=60, urgent=30)


def test_worklist_section_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "dicomnode.toml"
    path.write_text("[worklist.max_wait_minutes]\ncritical = -5\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert error.value.line == 2
    assert "worklist.max_wait_minutes.critical" in str(error.value)
    path.write_text("[worklist]\nmin_head_start_share = 0.5\n", encoding="utf-8")
    assert load_settings(path).worklist.min_head_start_share == 0.5


def test_shipped_configuration_has_the_default_policy() -> None:
    shipped = load_settings(Path(__file__).resolve().parent.parent / "conf" / "dicomnode.toml")
    assert shipped.worklist == WorklistSettings()
