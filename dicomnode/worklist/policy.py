"""Reading priority: (study facts, AI findings, now, settings) -> tier, due time, reason.

Pure: no database, no clock. The live worklist and ``dicomnode simulate`` call this one
function, so the simulation measures the policy the radiologists get.

Ordering is earliest deadline first. Each study is due at its arrival plus the max wait
of its tier, and the worklist reads the earliest due first. A critical study therefore
goes ahead of every routine study that arrived less than (routine - critical max wait)
before it, and behind the older ones: a routine study that has waited that long has aged
past any new critical study. That difference, the head start, is the most a critical
study can gain over a routine one, and it bounds how far triage pushes a routine study
back: only studies flagged within one head start after it can overtake it, each by one
reading (AI triage otherwise pushes routine studies back without limit). The due time
never changes as time passes, so the ordered worklist needs no periodic recomputation.

False positives pay the same head start as true findings, and with a model that flags
10% of normal studies they are most of what overtakes a routine study. Optionally the AI
tiers' head start shrinks with the finding's probability (full at
``full_head_start_probability``, ``min_head_start_share`` of it at the threshold, where
false positives crowd); the study keeps its tier either way.

A finding model that would have read the study's images but did not run (its ONNX file
cannot be loaded: the worker leaves it out) is no negative result: the reason names it as
not run (:func:`not_run_text`, the wording the worklist row's "AI results incomplete" uses
too) and never says "no finding" for it. Such a study keeps the place it would have with
no AI at all, routine (or what its order asks for), due at arrival plus the routine max
wait; only the findings of the models that ran can raise it.

Likewise an analysed study some of whose images cannot be read (corrupt or unsupported pixel
data: the analysis leaves them out and reads the others) is no negative result for those: the
reason says how many the AI could not read (:func:`unreadable_text`), and "no finding" is said
only of the images it could read.

Instances that arrive after a reader has looked at a study (:data:`NEW_IMAGE_STATUSES`: it is
claimed or reported) are new images that no report covers. A reported study goes back to the
worklist unread (:data:`UNREAD_AGAIN`), so that they are read (an addendum); a claimed one keeps
its reader. Either way the worklist row says so (:func:`new_images_text`) until the study is
reported again. After a report the new images are new work: the study is due from the first of
them (:func:`arrival`), not from its first arrival long ago, and its tier follows their
analysis like any unread study's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from dicomnode.config import WorklistSettings
from dicomnode.findings import probability_text

DEFAULT_SETTINGS = WorklistSettings()

# Tier name -> rank (read lower ranks first when equally due) and DICOM UPS priority.
TIERS: dict[str, tuple[int, str]] = {
    "stat": (0, "HIGH"),
    "critical": (1, "HIGH"),
    "urgent": (2, "MEDIUM"),
    "routine": (3, "LOW"),
}


def max_waits(settings: WorklistSettings = DEFAULT_SETTINGS) -> dict[str, timedelta]:
    """Tier name -> longest a study of that tier should wait before it is read."""
    minutes = settings.max_wait_minutes
    return {tier: timedelta(minutes=getattr(minutes, tier)) for tier in TIERS}


# The default max waits, for callers that do not read the configuration.
MAX_WAIT: dict[str, timedelta] = max_waits()


@dataclass(frozen=True)
class StudyFacts:
    received_at: datetime
    modality: str = ""
    # Ordering priority from the request (RequestedProcedurePriority / ReportingPriority).
    requested_priority: str = ""
    # Where the patient is (e.g. "ED", "ICU"), when the request says.
    patient_location: str = ""
    # receiving | queued | analysing | analysed | failed
    analysis_status: str = "queued"
    # Finding models that would have read the study's images but did not run (their ONNX
    # file cannot be loaded), by name: the analysis is incomplete without them.
    not_run: tuple[str, ...] = ()
    # Why a failed analysis failed (analysis_status "failed"): UNREADABLE or FAILED_OTHER.
    failure: str = ""
    # The images the analysis was to read (pixel data, not this node's own) and how many of
    # them it could not (left out): the study was analysed on the others.
    images: int = 0
    unreadable_images: int = 0
    # When the first instance arrived after the study was reported (it is unread again): the
    # new images are due from then (:func:`arrival`). None when it has none.
    new_images_after_report_at: datetime | None = None


# Reading statuses in which a reader has looked at the study: an instance that arrives then is
# a new image no report covers (the ingest counts it on the study's row).
NEW_IMAGE_STATUSES = ("in_progress", "reported")
# Where a reported study that receives new images goes: back on the worklist, unread, awaiting
# their analysis (as any study that receives instances).
UNREAD_AGAIN = "waiting"


def after_report(new_images: int, reported_by: str) -> bool:
    """Whether a study's new images came after a report (its latest report, by ``reported_by``,
    is kept while it is read again), not while it was claimed before any report."""
    return new_images > 0 and bool(reported_by)


def new_images_text(new_images: int, reported_by: str) -> str:
    """The worklist's flag for images no report covers: 'new images after report (2)' or, in a
    study claimed before any report, 'new images while claimed (2)'; '' for none."""
    if new_images <= 0:
        return ""
    since = "after report" if after_report(new_images, reported_by) else "while claimed"
    return f"new images {since} ({new_images})"


def keeps_new_images_on_release(reported_by: str) -> bool:
    """A released claim keeps the new-images flag only after a report: without one the whole
    study is unread anyway, and 'while claimed' no longer holds."""
    return bool(reported_by)


def arrival(study: StudyFacts) -> datetime:
    """When the study's unread work arrived: its first instance, or after a report the first
    new image (due from then, like a study that arrived then)."""
    return study.new_images_after_report_at or study.received_at


@dataclass(frozen=True)
class FindingFact:
    meaning: str
    probability: float
    threshold: float
    critical: bool

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Priority:
    tier: str
    tier_rank: int
    score: float
    ups_priority: str
    reason: str
    # Reading order key: the worklist lists studies by due_at, earliest first. It does not
    # change as time passes, so the order needs no periodic re-computation.
    due_at: datetime


def _describe(finding: FindingFact) -> str:
    return f"{finding.meaning} {probability_text(finding.probability)}"


def _one_per_meaning(present: list[FindingFact]) -> list[FindingFact]:
    """The most probable of each finding several models agree on (a pneumothorax found by two
    models is named once); critical if any of them calls it critical. Keeps the order."""
    best: dict[str, FindingFact] = {}
    critical: set[str] = set()
    for finding in present:
        key = finding.meaning.casefold()
        best.setdefault(key, finding)
        if finding.critical:
            critical.add(key)
    return [
        replace(f, critical=True) if k in critical and not f.critical else f
        for k, f in best.items()
    ]


def _upper(values: list[str]) -> set[str]:
    return {value.strip().upper() for value in values}


def apply_overrides(findings: list[FindingFact], settings: WorklistSettings) -> list[FindingFact]:
    """Findings with the site's thresholds and criticality in place of the model card's."""
    critical = _upper(settings.critical_findings)
    non_critical = _upper(settings.non_critical_findings)
    thresholds = {name.strip().upper(): value for name, value in settings.thresholds.items()}
    adjusted = []
    for finding in findings:
        name = finding.meaning.strip().upper()
        is_critical = finding.critical
        if name in critical:
            is_critical = True
        elif name in non_critical:
            is_critical = False
        adjusted.append(
            FindingFact(
                finding.meaning,
                finding.probability,
                thresholds.get(name, finding.threshold),
                is_critical,
            )
        )
    return adjusted


def _log_odds(probability: float) -> float:
    clipped = min(max(probability, 1e-9), 1 - 1e-9)
    return math.log(clipped / (1 - clipped))


def head_start_share(finding: FindingFact, settings: WorklistSettings) -> float:
    """Share of its tier's head start a present AI finding earns from its probability.

    Full at ``full_head_start_probability`` and above; ``min_head_start_share`` at the
    finding's threshold, where a model's false positives crowd; in between linear in the
    log-odds, the scale on which evidence adds up.
    """
    full = settings.full_head_start_probability
    if full <= finding.threshold or finding.probability >= full:
        return 1.0
    floor = settings.min_head_start_share
    above = max(0.0, _log_odds(finding.probability) - _log_odds(finding.threshold))
    return floor + (1.0 - floor) * above / (_log_odds(full) - _log_odds(finding.threshold))


def _order_tier(study: StudyFacts, settings: WorklistSettings) -> tuple[str, str] | None:
    """Tier and reason that the request itself asks for (ordering priority, location)."""
    requested = study.requested_priority.strip().upper()
    location = study.patient_location.strip().upper()
    if requested and requested in _upper(settings.stat_priorities):
        return "stat", f"ordered {requested}"
    if requested and requested in _upper(settings.urgent_priorities):
        return "urgent", f"ordered {requested}"
    if location and location in _upper(settings.urgent_locations):
        return "urgent", f"patient in {study.patient_location.strip()}"
    return None


# How a reason and the worklist row's "AI results incomplete" name a model that did not run.
NOT_RUN = "not run"


def not_run_text(models: tuple[str, ...] | list[str]) -> str:
    """'not run: a, b': the models that would have read a study but did not run."""
    return f"{NOT_RUN}: {', '.join(models)}"


# Why a failed analysis failed: none of the study's images can be read (corrupt or unsupported
# pixel data: the AI never looked), or anything else (the analysis itself went wrong).
UNREADABLE = "unreadable"
FAILED_OTHER = "error"
# How the worklist row (its reason and its status marker) says so: the one wording.
FAILURE_TEXT = {
    UNREADABLE: "AI could not read the image(s) (corrupt or unsupported pixel data)",
    FAILED_OTHER: "AI analysis failed",
}
# A study failed as UNREADABLE has an analysis error that begins with this (the analyse job
# writes it, ahead of each image's reason), so that the kind lasts with the study.
UNREADABLE_ERROR = "no image of the study can be read: "


def failure_kind(analysis_error: str) -> str:
    """The failure kind of a failed analysis from its recorded error (see UNREADABLE_ERROR)."""
    return UNREADABLE if (analysis_error or "").startswith(UNREADABLE_ERROR) else FAILED_OTHER


def unreadable_text(unreadable: int, images: int) -> str:
    """'1 of 2 images could not be read': images an analysed study's AI left out."""
    return f"{unreadable} of {images} images could not be read"


def failure_text(failure: str) -> str:
    """The worklist's words for a failed analysis of kind ``failure``."""
    return FAILURE_TEXT.get(failure, FAILURE_TEXT[FAILED_OTHER])


def _routine_reason(
    analysis_status: str,
    assessed: bool,
    not_run: tuple[str, ...],
    failure: str = "",
    some_unreadable: bool = False,
) -> str:
    """Why a study without a present finding is routine. ``assessed``: a model gave findings
    (present or not); an analysed study without any was looked at by no finding model
    (no card selects its images), which must not read as the AI clearing it. ``not_run``:
    finding models that would have looked but did not run; "no finding" is never said of
    them. ``failure``: why a failed analysis failed (:data:`FAILURE_TEXT`).
    ``some_unreadable``: images were left out; "no finding" is said only of the others (the
    caller adds how many)."""
    if analysis_status == "analysed":
        if not_run:
            if not assessed:
                return f"no AI finding model ran ({not_run_text(not_run)}); read in arrival order"
            read = ", in the images they could read" if some_unreadable else ""
            return (
                "AI: no finding above threshold from the models that ran"
                f"{read}; {not_run_text(not_run)}"
            )
        if not assessed:
            these = "the images it could read" if some_unreadable else "these images"
            return f"no AI finding model applies to {these}; read in arrival order"
        if some_unreadable:
            return "AI: no finding above threshold in the images it could read"
        return "AI: no finding above threshold"
    if analysis_status == "failed":
        return f"{failure_text(failure)}; read in arrival order"
    return "awaiting AI analysis"


def prioritise(
    study: StudyFacts,
    findings: list[FindingFact],
    now: datetime,
    settings: WorklistSettings = DEFAULT_SETTINGS,
) -> Priority:
    """Tier from the order and the most severe present finding; due at arrival + max wait.

    A pending or failed analysis only ever lacks findings, and a study without findings is
    routine (or what its order asks for), so it is never placed below a routine study of the
    same arrival; neither is a study whose finding models did not all run (``study.not_run``,
    named in the reason). ``now`` is accepted for a shared signature: the result does not depend on
    it, which is what lets the worklist keep one stored, time-invariant ordering key.
    """
    del now
    present = _one_per_meaning(
        sorted(
            (f for f in apply_overrides(findings, settings) if f.present),
            key=lambda f: -f.probability,
        )
    )
    critical = [f for f in present if f.critical]
    deciding = critical or present
    ordered = _order_tier(study, settings)
    found: tuple[str, str] | None = None
    if critical:
        found = "critical", "AI critical: " + ", ".join(map(_describe, critical))
    elif present:
        found = "urgent", "AI finding: " + ", ".join(map(_describe, present))
    waits = max_waits(settings)
    # Head start over a routine study of the same arrival: full for what the request asks,
    # scaled by the AI's confidence for what the AI found; the larger one counts.
    head_start = timedelta(0)
    if ordered:
        head_start = waits["routine"] - waits[ordered[0]]
    if found:
        share = max(head_start_share(f, settings) for f in deciding)
        head_start = max(head_start, (waits["routine"] - waits[found[0]]) * share)
    if ordered and (found is None or TIERS[ordered[0]][0] <= TIERS[found[0]][0]):
        tier, reason = ordered
        if present:
            reason += "; AI: " + ", ".join(map(_describe, present))
    elif found:
        tier, reason = found
        if ordered:
            reason += f"; {ordered[1]}"
    else:
        tier, reason = (
            "routine",
            _routine_reason(
                study.analysis_status,
                bool(findings),
                study.not_run,
                study.failure,
                study.unreadable_images > 0,
            ),
        )
    if study.not_run and study.analysis_status == "analysed" and tier != "routine":
        # Found or ordered: the models that did not run are named after the reason.
        reason += f"; {not_run_text(study.not_run)}"
    if study.unreadable_images and study.analysis_status == "analysed":
        # Whatever the tier: the AI did not see every image.
        reason += f"; {unreadable_text(study.unreadable_images, study.images)}"
    rank, ups = TIERS[tier]
    score = max((f.probability for f in deciding), default=0.0)
    return Priority(
        tier=tier,
        tier_rank=rank,
        score=round(score, 6),
        ups_priority=ups,
        reason=reason,
        due_at=arrival(study) + waits["routine"] - head_start,
    )
