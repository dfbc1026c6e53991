"""Reading priority policy and model selection rules (pure functions)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from pydicom import Dataset

from dicomnode.findings import probability_text
from dicomnode.models.registry import ModelCard, SelectionRules
from dicomnode.pipeline.select import ImageFacts, image_facts, rules_match, select_models
from dicomnode.worklist.policy import (
    FAILED_OTHER,
    MAX_WAIT,
    TIERS,
    UNREADABLE,
    UNREADABLE_ERROR,
    FindingFact,
    StudyFacts,
    failure_kind,
    keeps_new_images_on_release,
    new_images_text,
    prioritise,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ANALYSED = StudyFacts(received_at=NOW - timedelta(minutes=5), analysis_status="analysed")


def pneumothorax(probability: float, threshold: float = 0.5) -> FindingFact:
    return FindingFact("Pneumothorax", probability, threshold, critical=True)


def effusion(probability: float, threshold: float = 0.5) -> FindingFact:
    return FindingFact("Pleural effusion", probability, threshold, critical=False)


def test_present_critical_finding_is_critical_high() -> None:
    priority = prioritise(ANALYSED, [effusion(0.2), pneumothorax(0.87)], NOW)
    assert priority.tier == "critical"
    assert priority.tier_rank == TIERS["critical"][0]
    assert priority.ups_priority == "HIGH"
    assert "Pneumothorax 87%" in priority.reason
    assert "effusion" not in priority.reason
    assert priority.score == pytest.approx(0.87)


@pytest.mark.parametrize(
    "probability,text",
    [
        (0.0, "0%"),
        (0.0001, "<1%"),
        (0.004, "<1%"),
        (0.0099, "<1%"),
        (0.01, "1%"),
        (0.546, "55%"),
        (0.99, "99%"),
        (0.9951, ">99%"),
        (0.99915, ">99%"),
        (1.0, "100%"),
    ],
)
def test_probability_text_never_reads_as_certain_unless_it_is(probability, text) -> None:
    assert probability_text(probability) == text


def test_near_certain_finding_reads_above_99_percent_not_100() -> None:
    priority = prioritise(ANALYSED, [pneumothorax(0.99915)], NOW)
    assert priority.reason == "AI critical: Pneumothorax >99%"
    assert priority.score == pytest.approx(0.99915)


def test_critical_finding_below_threshold_is_routine() -> None:
    priority = prioritise(ANALYSED, [pneumothorax(0.49)], NOW)
    assert priority.tier == "routine"
    assert priority.ups_priority == "LOW"
    assert "Pneumothorax" not in priority.reason
    assert "no finding" in priority.reason


def test_an_analysed_study_no_finding_model_looked_at_does_not_read_as_cleared() -> None:
    """A study whose images no finding model selects (a localiser series, For Processing
    images) is analysed without any finding: its reason must not say the AI found nothing."""
    priority = prioritise(ANALYSED, [], NOW)
    assert priority.tier == "routine"
    assert "no AI finding model applies" in priority.reason
    assert "no finding above threshold" not in priority.reason


def test_a_model_that_did_not_run_is_not_reported_as_finding_nothing() -> None:
    """The pneumothorax model left out (its ONNX file cannot be loaded): the effusion model's
    negative result must not read as the AI clearing the study; the study keeps the place it
    would have with no AI at all (routine, due at arrival + the routine max wait)."""
    incomplete = replace(ANALYSED, not_run=("cxr-pneumothorax-demo",))
    priority = prioritise(incomplete, [effusion(0.1)], NOW)
    assert priority.reason == (
        "AI: no finding above threshold from the models that ran; not run: cxr-pneumothorax-demo"
    )
    without_ai = prioritise(replace(incomplete, analysis_status="failed"), [], NOW)
    assert (priority.tier, priority.due_at) == ("routine", without_ai.due_at)
    # No finding model ran at all.
    nothing_ran = prioritise(incomplete, [], NOW)
    assert nothing_ran.tier == "routine"
    assert nothing_ran.reason == (
        "no AI finding model ran (not run: cxr-pneumothorax-demo); read in arrival order"
    )
    # A finding of the models that ran still raises it; the reason names what did not run.
    urgent = prioritise(incomplete, [effusion(0.8)], NOW)
    assert urgent.tier == "urgent"
    assert urgent.reason == "AI finding: Pleural effusion 80%; not run: cxr-pneumothorax-demo"
    ordered = prioritise(replace(incomplete, requested_priority="STAT"), [effusion(0.1)], NOW)
    assert ordered.reason == "ordered STAT; not run: cxr-pneumothorax-demo"
    # Not yet analysed again (new instances): awaiting, whatever the last analysis missed.
    waiting = prioritise(replace(incomplete, analysis_status="queued"), [effusion(0.1)], NOW)
    assert waiting.reason == "awaiting AI analysis"


def test_images_the_ai_could_not_read_are_not_reported_as_finding_nothing() -> None:
    """One of two images cannot be read (left out, the study analysed on the other): the reason
    says so whatever the tier, and "no finding" only of the images the AI could read; the
    study's place is unchanged."""
    partial = replace(ANALYSED, images=2, unreadable_images=1)
    priority = prioritise(partial, [effusion(0.1)], NOW)
    assert priority.reason == (
        "AI: no finding above threshold in the images it could read; "
        "1 of 2 images could not be read"
    )
    assert (priority.tier, priority.due_at) == (
        "routine",
        prioritise(ANALYSED, [effusion(0.1)], NOW).due_at,
    )
    critical = prioritise(partial, [pneumothorax(0.9)], NOW)
    assert critical.tier == "critical"
    assert critical.reason == "AI critical: Pneumothorax 90%; 1 of 2 images could not be read"
    no_model = prioritise(partial, [], NOW)
    assert no_model.reason == (
        "no AI finding model applies to the images it could read; read in arrival order; "
        "1 of 2 images could not be read"
    )
    # With a model that did not run too: both are named, the models first.
    both = replace(partial, not_run=("cxr-pneumothorax-demo",))
    assert prioritise(both, [effusion(0.1)], NOW).reason == (
        "AI: no finding above threshold from the models that ran, in the images they could "
        "read; not run: cxr-pneumothorax-demo; 1 of 2 images could not be read"
    )
    # Not yet analysed again, or failed: what the last analysis could not read is not said.
    assert prioritise(replace(partial, analysis_status="queued"), [], NOW).reason == (
        "awaiting AI analysis"
    )
    assert prioritise(replace(ANALYSED, images=2), [effusion(0.1)], NOW).reason == (
        "AI: no finding above threshold"
    )


def test_probability_at_threshold_counts_as_present() -> None:
    assert prioritise(ANALYSED, [pneumothorax(0.5)], NOW).tier == "critical"


def test_present_non_critical_finding_is_urgent() -> None:
    priority = prioritise(ANALYSED, [pneumothorax(0.3), effusion(0.72)], NOW)
    assert priority.tier == "urgent"
    assert priority.ups_priority == "MEDIUM"
    assert "Pleural effusion 72%" in priority.reason
    assert priority.score == pytest.approx(0.72)


def test_stat_order_outranks_every_ai_tier() -> None:
    stat = StudyFacts(NOW, requested_priority="stat", analysis_status="queued")
    priority = prioritise(stat, [], NOW)
    assert priority.tier == "stat"
    assert priority.ups_priority == "HIGH"
    assert "STAT" in priority.reason
    critical = prioritise(ANALYSED, [pneumothorax(0.99)], NOW)
    assert priority.tier_rank < critical.tier_rank
    # A STAT study keeps its tier and names the AI findings too.
    with_finding = prioritise(StudyFacts(NOW, requested_priority="STAT"), [pneumothorax(0.9)], NOW)
    assert with_finding.tier == "stat"
    assert "Pneumothorax 90%" in with_finding.reason


@pytest.mark.parametrize(
    ("status", "words"),
    [
        ("queued", "awaiting"),
        ("receiving", "awaiting"),
        ("analysing", "awaiting"),
        ("failed", "failed"),
    ],
)
def test_pending_or_failed_analysis_is_routine_with_reason(status: str, words: str) -> None:
    priority = prioritise(StudyFacts(NOW, analysis_status=status), [], NOW)
    assert priority.tier == "routine"
    assert priority.tier_rank == max(rank for rank, _ in TIERS.values())
    assert priority.ups_priority == "LOW"
    assert words in priority.reason
    assert priority.score == 0.0


def test_a_study_whose_images_cannot_be_read_says_so_not_that_the_ai_failed() -> None:
    unreadable = StudyFacts(NOW, analysis_status="failed", failure=UNREADABLE)
    priority = prioritise(unreadable, [], NOW)
    assert priority.reason == (
        "AI could not read the image(s) (corrupt or unsupported pixel data); read in arrival order"
    )
    assert "failed" not in priority.reason
    # Its place is that of any failed analysis: routine, due at arrival + the routine wait.
    failed = prioritise(StudyFacts(NOW, analysis_status="failed", failure=FAILED_OTHER), [], NOW)
    assert failed.reason == "AI analysis failed; read in arrival order"
    assert (
        (priority.tier, priority.due_at)
        == (failed.tier, failed.due_at)
        == (
            "routine",
            NOW + MAX_WAIT["routine"],
        )
    )
    # The kind lasts with the study as the first words of its analysis error.
    assert failure_kind(UNREADABLE_ERROR + "x.dcm: cannot be read") == UNREADABLE
    assert failure_kind("RuntimeError: out of memory") == FAILED_OTHER
    assert failure_kind("") == FAILED_OTHER


def test_score_orders_studies_within_a_tier() -> None:
    studies = {
        "weak": prioritise(ANALYSED, [pneumothorax(0.61)], NOW),
        "strong": prioritise(ANALYSED, [pneumothorax(0.95)], NOW),
        "urgent": prioritise(ANALYSED, [effusion(0.99)], NOW),
        "routine": prioritise(ANALYSED, [], NOW),
        "stat": prioritise(StudyFacts(NOW, requested_priority="STAT"), [], NOW),
    }
    order = sorted(studies, key=lambda name: (studies[name].tier_rank, -studies[name].score))
    assert order == ["stat", "strong", "weak", "urgent", "routine"]


def test_critical_score_ignores_stronger_non_critical_finding() -> None:
    priority = prioritise(ANALYSED, [effusion(0.99), pneumothorax(0.6)], NOW)
    assert priority.tier == "critical"
    assert priority.score == pytest.approx(0.6)


def test_due_time_is_within_the_tier_max_wait_and_fixed_over_time() -> None:
    cases = [
        (StudyFacts(NOW, requested_priority="STAT"), []),
        (ANALYSED, [pneumothorax(0.9)]),
        (ANALYSED, [effusion(0.9)]),
        (ANALYSED, []),
        (StudyFacts(NOW, analysis_status="failed"), []),
    ]
    for study, findings in cases:
        priority = prioritise(study, findings, NOW)
        assert study.received_at <= priority.due_at <= study.received_at + MAX_WAIT[priority.tier]
        later = prioritise(study, findings, NOW + timedelta(hours=3))
        assert later.due_at == priority.due_at


def test_later_critical_study_is_due_before_earlier_routine_one() -> None:
    routine = prioritise(
        StudyFacts(NOW - timedelta(minutes=20), analysis_status="analysed"), [], NOW
    )
    critical = prioritise(StudyFacts(NOW, analysis_status="analysed"), [pneumothorax(0.8)], NOW)
    stat = prioritise(StudyFacts(NOW + timedelta(minutes=1), requested_priority="STAT"), [], NOW)
    assert stat.due_at < routine.due_at
    assert critical.due_at < routine.due_at


# Selection rules -------------------------------------------------------------------------

CXR = ImageFacts(
    modality="DX", body_part="CHEST", view="PA", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1"
)


def card(name: str, **rules: list[str]) -> ModelCard:
    return ModelCard.model_validate(
        {
            "model": {"name": name, "version": "1", "task": "classification", "onnx": "x.onnx"},
            "input": {"shape": [1, 8, 8]},
            "outputs": [{"name": "probability", "kind": "probabilities"}],
            "select": rules,
        }
    )


def test_empty_rules_admit_everything() -> None:
    assert rules_match(SelectionRules(), CXR)
    assert rules_match(SelectionRules(), ImageFacts("", "", "", ""))


def test_rules_are_case_insensitive() -> None:
    rules = SelectionRules(modalities=["dx", "cr"], body_parts=["Chest"], views=["pa", "ap"])
    assert rules_match(rules, CXR)
    assert rules_match(rules, ImageFacts("cr", "chest", "Ap", ""))
    ds = Dataset()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    assert rules_match(rules, image_facts(ds))


def test_non_matching_rule_rejects() -> None:
    assert not rules_match(SelectionRules(modalities=["CT"]), CXR)
    assert not rules_match(SelectionRules(modalities=["DX"], views=["LATERAL"]), CXR)
    assert not rules_match(SelectionRules(body_parts=["HEAD"]), CXR)
    assert not rules_match(SelectionRules(sop_classes=["1.2.840.10008.5.1.4.1.1.2"]), CXR)
    assert rules_match(SelectionRules(sop_classes=[CXR.sop_class_uid]), CXR)


def test_select_models_keeps_only_matching_cards() -> None:
    cards = [
        card("any"),
        card("chest-dx", modalities=["DX"], body_parts=["CHEST"]),
        card("head-ct", modalities=["CT"], body_parts=["HEAD"]),
        card("lateral", views=["LL"]),
    ]
    assert [c.model.name for c in select_models(cards, CXR)] == ["any", "chest-dx"]
    assert select_models([], CXR) == []


def test_a_finding_two_models_agree_on_is_named_once() -> None:
    findings = [
        FindingFact("Pneumothorax", 0.84, 0.5, critical=False),
        FindingFact("Pneumothorax", 0.91, 0.6, critical=True),
        FindingFact("Cardiomegaly", 0.7, 0.5, critical=False),
    ]
    priority = prioritise(ANALYSED, findings, NOW)
    assert priority.tier == "critical"
    assert priority.reason.count("Pneumothorax") == 1 and "Pneumothorax 91%" in priority.reason
    # The most probable one is not flagged critical by its model, the other is: still critical.
    findings[0] = FindingFact("Pneumothorax", 0.97, 0.5, critical=False)
    priority = prioritise(ANALYSED, findings, NOW)
    assert priority.tier == "critical" and "Pneumothorax 97%" in priority.reason


def test_new_images_after_a_report_are_due_from_their_arrival() -> None:
    """A reported study with new images is new work: due from the first new image by its
    tier's max wait, not from its first arrival long ago (which would list it overdue)."""
    reported_long_ago = replace(ANALYSED, received_at=NOW - timedelta(days=20))
    late = replace(reported_long_ago, new_images_after_report_at=NOW - timedelta(minutes=1))
    priority = prioritise(late, [pneumothorax(0.999)], NOW)
    assert priority.tier == "critical"
    assert priority.due_at == NOW - timedelta(minutes=1) + MAX_WAIT["critical"]
    assert prioritise(late, [], NOW).due_at == NOW - timedelta(minutes=1) + MAX_WAIT["routine"]
    before = prioritise(reported_long_ago, [], NOW).due_at
    assert before == NOW - timedelta(days=20) + MAX_WAIT["routine"]


def test_new_images_text_says_after_a_report_or_while_claimed() -> None:
    assert new_images_text(0, "dr_house") == ""
    assert new_images_text(2, "dr_house") == "new images after report (2)"
    assert new_images_text(1, "") == "new images while claimed (1)"
    # A released claim keeps the flag only where a report exists.
    assert keeps_new_images_on_release("dr_house")
    assert not keeps_new_images_on_release("")
