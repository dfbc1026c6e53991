"""Discrete-event simulation of a reading room: FIFO against the node's worklist policy.

Pure and seeded: the same scenario and seed give the same studies, reading times and
results. Both orderings read the very same studies, and the radiologists' reading times
are drawn per reading slot (each radiologist's first read of a shift, second, ...) rather
than per study. Every study shares one reading-time distribution, so this is the same
reading room statistically; it also means both orderings see the very same moments at
which a radiologist becomes free, so their difference is the ordering's alone, not noise
from which long read happened to land before a shift change. The policy ordering calls
:func:`dicomnode.worklist.policy.prioritise`, the function the live worklist uses, and
sorts by its ``due_at`` with ties in arrival order, as the worklist query does.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from statistics import NormalDist

import numpy as np

from dicomnode.simulate.scenario import Reading, Scenario
from dicomnode.worklist.policy import FindingFact, StudyFacts, prioritise

DAY = 24 * 60
# Simulated minute 0; any fixed instant would do (the policy ignores the calendar).
EPOCH = datetime(2025, 1, 6, tzinfo=UTC)
# Days the reading room keeps reading after the last arrival before giving up.
MAX_DRAIN_DAYS = 30

ORDERINGS = ("fifo", "policy")


class Unstable(Exception):
    """The radiologists never catch up with the studies: demand exceeds capacity."""


@dataclass
class SimStudy:
    id: int
    arrival: float  # minutes from the simulation start
    stat: bool
    truth: dict[str, bool]  # finding name -> present (ground truth)
    findings: list[FindingFact]  # the model's output, as the node would store it
    analysis_failed: bool
    measured: bool  # arrived in the measured days (not warm-up)

    @property
    def flagged(self) -> bool:
        """The model reports a critical finding (what the policy sees)."""
        return any(f.critical and f.present for f in self.findings)

    def groups(self, critical_names: set[str]) -> list[str]:
        """Ground-truth tier and whether the model flagged it."""
        if self.stat:
            truth = "stat"
        elif any(present and name in critical_names for name, present in self.truth.items()):
            truth = "critical"
        elif any(self.truth.values()):
            truth = "urgent"
        else:
            truth = "routine"
        return [truth, "flagged" if self.flagged else "not flagged"]


@dataclass
class Outcome:
    """One study as read: when it started and when the report was done."""

    study: SimStudy
    start: float
    end: float

    @property
    def wait(self) -> float:
        return self.start - self.study.arrival

    @property
    def turnaround(self) -> float:
        return self.end - self.study.arrival


@dataclass
class Run:
    ordering: str
    outcomes: list[Outcome] = field(default_factory=list)


def _probability(z: float, cutoff: float, separation: float, threshold: float) -> float:
    """The model's probability for binormal score ``z``: ``threshold`` at ``cutoff``.

    Its log-odds rise with the score's log-likelihood ratio (slope: the separation of the
    two score distributions), as for a model calibrated on its training data.
    """
    logit = math.log(threshold / (1 - threshold)) + max(separation, 0.1) * (z - cutoff)
    return 1.0 / (1.0 + math.exp(-min(max(logit, -50.0), 50.0)))


def generate_studies(scenario: Scenario, days: int, seed: int) -> list[SimStudy]:
    """Studies of ``warmup_days + days`` days: arrivals, ground truth, model output."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(scenario.arrivals.hourly_weights, dtype=float)
    weights /= weights.sum()
    normal = NormalDist()
    total_days = scenario.warmup_days + days
    arrivals: list[float] = []
    for day in range(total_days):
        count = rng.poisson(scenario.arrivals.studies_per_day)
        hours = rng.choice(24, size=count, p=weights)
        arrivals.extend(day * DAY + (hours + rng.random(count)) * 60)
    arrivals.sort()
    studies = []
    for index, arrival in enumerate(arrivals):
        truth: dict[str, bool] = {}
        findings = []
        for finding in scenario.findings:
            present = bool(rng.random() < finding.prevalence)
            # Binormal model: scores of negatives ~ N(0, 1), cut at the specificity's
            # quantile; positives shifted so that the same cut keeps the sensitivity.
            cutoff = normal.inv_cdf(min(max(finding.specificity, 1e-9), 1 - 1e-9))
            shift = normal.inv_cdf(min(max(finding.sensitivity, 1e-9), 1 - 1e-9))
            z = rng.normal(cutoff + shift if present else 0.0, 1.0)
            truth[finding.name] = present
            findings.append(
                FindingFact(
                    finding.name,
                    round(_probability(z, cutoff, cutoff + shift, finding.threshold), 6),
                    finding.threshold,
                    finding.critical,
                )
            )
        failed = bool(rng.random() < scenario.analysis.failure_rate)
        studies.append(
            SimStudy(
                id=index,
                arrival=float(arrival),
                stat=bool(rng.random() < scenario.arrivals.stat_fraction),
                truth=truth,
                findings=[] if failed else findings,
                analysis_failed=failed,
                measured=arrival >= scenario.warmup_days * DAY,
            )
        )
    return studies


class ReadingTimes:
    """Lognormal reading times, one seeded stream per radiologist shift."""

    def __init__(self, reading: Reading, seed: int):
        self.mu = math.log(reading.median_minutes)
        self.sigma = math.log(reading.p90_minutes / reading.median_minutes) / NormalDist().inv_cdf(
            0.9
        )
        self.seed = seed
        self.streams: dict[int, np.random.Generator] = {}

    def next(self, shift: int) -> float:
        """Minutes of this shift's next read."""
        stream = self.streams.get(shift)
        if stream is None:
            stream = self.streams[shift] = np.random.default_rng([self.seed, 1, shift])
        return float(stream.lognormal(self.mu, self.sigma))


def _minutes(moment: datetime) -> float:
    return (moment - EPOCH) / timedelta(minutes=1)


def policy_key(scenario: Scenario) -> Callable[[SimStudy, bool], tuple[float, float, int]]:
    """Reading-order key from the live policy: (due, arrival, id), before/after analysis."""

    def key(study: SimStudy, analysed: bool) -> tuple[float, float, int]:
        received = EPOCH + timedelta(minutes=study.arrival)
        status = ("failed" if study.analysis_failed else "analysed") if analysed else "queued"
        facts = StudyFacts(
            received_at=received,
            modality="DX",
            requested_priority="STAT" if study.stat else "",
            analysis_status=status,
        )
        findings = study.findings if analysed else []
        priority = prioritise(facts, findings, received, scenario.policy)
        return (_minutes(priority.due_at), study.arrival, study.id)

    return key


def _fifo_key(study: SimStudy, analysed: bool) -> tuple[float, float, int]:
    del analysed
    return (study.arrival, study.arrival, study.id)


@dataclass(order=True)
class _Event:
    time: float
    order: int  # at equal times: shift ends, then reads end, shift starts, arrivals, AI
    seq: int
    kind: str = field(compare=False)
    subject: int = field(compare=False)


def _shift_intervals(scenario: Scenario, days: int) -> list[tuple[float, float]]:
    """(start, end) minutes of every radiologist's every shift, day 0 on."""
    intervals = []
    for day in range(days):
        for shift in scenario.shifts:
            for _ in range(shift.radiologists):
                intervals.append((day * DAY + shift.start_minute, day * DAY + shift.end_minute))
    return intervals


def run(scenario: Scenario, studies: list[SimStudy], ordering: str, seed: int = 0) -> Run:
    """Read ``studies`` with radiologists on the scenario's shifts, in the given ordering."""
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, not {ordering!r}")
    key = policy_key(scenario) if ordering == "policy" else _fifo_key
    last_arrival = studies[-1].arrival if studies else 0.0
    horizon_days = int(last_arrival // DAY) + 1 + MAX_DRAIN_DAYS
    shifts = _shift_intervals(scenario, horizon_days)
    reading_times = ReadingTimes(scenario.reading, seed)

    events: list[_Event] = []
    seq = 0

    def push(time: float, order: int, kind: str, subject: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, _Event(time, order, seq, kind, subject))

    for index, (start, end) in enumerate(shifts):
        push(start, 2, "shift_start", index)
        push(end, 0, "shift_end", index)
    for study in studies:
        push(study.arrival, 3, "arrival", study.id)
        push(study.arrival + scenario.analysis.minutes, 4, "analysed", study.id)

    queue: list[tuple[tuple[float, float, int], int]] = []
    current_key: dict[int, tuple[float, float, int]] = {}
    idle: set[int] = set()
    result = Run(ordering)
    remaining = len(studies)

    def next_study() -> SimStudy | None:
        while queue:
            entry_key, study_id = heapq.heappop(queue)
            if current_key.get(study_id) == entry_key:
                del current_key[study_id]
                return studies[study_id]
        return None

    def start_reading(reader: int, now: float) -> bool:
        study = next_study()
        if study is None:
            return False
        end = now + reading_times.next(reader)
        result.outcomes.append(Outcome(study, now, end))
        push(end, 1, "read_done", reader)
        return True

    def enqueue(study: SimStudy, analysed: bool) -> None:
        entry_key = key(study, analysed)
        current_key[study.id] = entry_key
        heapq.heappush(queue, (entry_key, study.id))

    while events and remaining:
        event = heapq.heappop(events)
        now = event.time
        if event.kind == "arrival":
            enqueue(studies[event.subject], analysed=False)
        elif event.kind == "analysed":
            if event.subject in current_key:  # still waiting: the worklist re-sorts it
                enqueue(studies[event.subject], analysed=True)
        elif event.kind == "shift_start":
            idle.add(event.subject)
        elif event.kind == "shift_end":
            idle.discard(event.subject)
            continue
        elif event.kind == "read_done":
            remaining -= 1
            if now < shifts[event.subject][1]:
                idle.add(event.subject)
        for reader in sorted(idle):
            if not start_reading(reader, now):
                break
            idle.discard(reader)
    if remaining:
        raise Unstable(
            f"{scenario.name}: {remaining} studies still unread {MAX_DRAIN_DAYS} days after "
            "the last arrival; the shifts cannot keep up with the studies"
        )
    return result


def simulate(scenario: Scenario, days: int | None = None, seed: int | None = None) -> list[Run]:
    """FIFO and policy runs of the same generated studies."""
    seed = seed if seed is not None else scenario.seed
    studies = generate_studies(scenario, days if days is not None else scenario.days, seed)
    return [run(scenario, studies, ordering, seed) for ordering in ORDERINGS]
