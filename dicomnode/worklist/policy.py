"""Reading priority: (study facts, AI findings, now) -> tier, score, UPS priority, reason.

Pure: no database, no clock. The live worklist and any simulation call this one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

# Tier name -> rank (read lower ranks first) and DICOM UPS priority.
TIERS: dict[str, tuple[int, str]] = {
    "stat": (0, "HIGH"),
    "critical": (1, "HIGH"),
    "urgent": (2, "MEDIUM"),
    "routine": (3, "LOW"),
}


# Tier name -> longest a study of that tier should wait before it is read.
MAX_WAIT: dict[str, timedelta] = {
    "stat": timedelta(minutes=15),
    "critical": timedelta(minutes=30),
    "urgent": timedelta(hours=4),
    "routine": timedelta(hours=24),
}


@dataclass(frozen=True)
class StudyFacts:
    received_at: datetime
    modality: str = ""
    # Ordering priority from the request (e.g. RequestedProcedurePriority "STAT").
    requested_priority: str = ""
    analysis_status: str = "queued"


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
    return f"{finding.meaning} {finding.probability:.0%}"


def prioritise(study: StudyFacts, findings: list[FindingFact], now: datetime) -> Priority:
    """Tier from the most severe present finding; score orders studies within a tier.

    Within a tier the most confident finding comes first; studies without findings keep
    arrival order (score 0, ties broken by arrival time by the worklist query).
    """
    del now  # Aging arrives with the configurable policy; ordering is by arrival meanwhile.
    present = sorted((f for f in findings if f.present), key=lambda f: -f.probability)
    critical = [f for f in present if f.critical]
    if study.requested_priority.upper() == "STAT":
        tier, reason = "stat", "ordered STAT"
        if present:
            reason += "; AI: " + ", ".join(_describe(f) for f in present)
    elif critical:
        tier, reason = "critical", "AI critical: " + ", ".join(_describe(f) for f in critical)
    elif present:
        tier, reason = "urgent", "AI finding: " + ", ".join(_describe(f) for f in present)
    else:
        tier = "routine"
        if study.analysis_status == "analysed":
            reason = "AI: no finding above threshold"
        elif study.analysis_status == "failed":
            reason = "AI analysis failed; read in arrival order"
        else:
            reason = "awaiting AI analysis"
    rank, ups = TIERS[tier]
    score = max((f.probability for f in (critical or present)), default=0.0)
    return Priority(
        tier=tier, tier_rank=rank, score=round(score, 6), ups_priority=ups, reason=reason
    )
