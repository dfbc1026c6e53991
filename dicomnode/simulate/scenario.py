"""A reading-room scenario: ``conf/scenarios/*.toml`` -> typed, validated settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicomnode.config import WorklistSettings
from dicomnode.tomlfile import load_toml

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Minutes = Annotated[float, Field(gt=0.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _clock_minutes(value: str) -> int:
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
    if not match or int(match.group(1)) > 24 or int(match.group(2)) > 59:
        raise ValueError(f"{value!r} is not a time of day as HH:MM")
    minutes = int(match.group(1)) * 60 + int(match.group(2))
    if minutes > 24 * 60:
        raise ValueError(f"{value!r} is past 24:00")
    return minutes


class Arrivals(_Section):
    studies_per_day: float = Field(gt=0)
    # Relative number of studies arriving in each hour of the day, 00-01 h first.
    hourly_weights: list[Annotated[float, Field(ge=0)]] = [1.0] * 24
    # Share of studies ordered STAT by the requesting clinician.
    stat_fraction: Fraction = 0.0

    @field_validator("hourly_weights")
    @classmethod
    def _one_per_hour(cls, value: list[float]) -> list[float]:
        if len(value) != 24 or sum(value) <= 0:
            raise ValueError("hourly_weights needs 24 weights (00-01 h first), not all zero")
        return value


class Shift(_Section):
    start: str
    end: str
    radiologists: int = Field(ge=1)

    @field_validator("start", "end")
    @classmethod
    def _time_of_day(cls, value: str) -> str:
        _clock_minutes(value)
        return value

    @property
    def start_minute(self) -> int:
        return _clock_minutes(self.start)

    @property
    def end_minute(self) -> int:
        """Minutes after the shift's start-day midnight; past 1440 for overnight shifts."""
        end = _clock_minutes(self.end)
        return end if end > self.start_minute else end + 24 * 60


class Reading(_Section):
    # Reading time is lognormal: half the studies take less than the median, 90% less
    # than p90.
    median_minutes: Minutes
    p90_minutes: Minutes

    @model_validator(mode="after")
    def _p90_above_median(self) -> Reading:
        if self.p90_minutes <= self.median_minutes:
            raise ValueError("p90_minutes must be above median_minutes")
        return self


class Analysis(_Section):
    # From arrival to the AI result on the worklist (transfer, assembly, inference).
    minutes: float = Field(default=2.0, ge=0.0)
    # Share of analyses that fail; such a study stays in arrival order among routine ones.
    failure_rate: Fraction = 0.0


class Finding(_Section):
    name: str
    prevalence: Fraction
    critical: bool = True
    # Of the model, at its threshold: share of studies with the finding that it flags
    # (sensitivity) and share of studies without it that it does not (specificity).
    sensitivity: Fraction
    specificity: Fraction
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)


class Goals(_Section):
    # Critical studies (ground truth): median report turnaround cut by at least this share.
    critical_median_cut: Fraction = 0.90
    # Routine studies (ground truth): worst wait at most this share above FIFO's.
    routine_worst_wait_increase: float = Field(default=0.05, ge=0.0)


class Scenario(_Section):
    name: str
    description: str = ""
    # Days measured, after warmup_days that fill the reading room's queues.
    days: int = Field(default=7, ge=1)
    warmup_days: int = Field(default=1, ge=0)
    seed: int = 0
    arrivals: Arrivals
    shifts: list[Shift] = Field(min_length=1)
    reading: Reading
    analysis: Analysis = Analysis()
    findings: list[Finding] = Field(min_length=1)
    policy: WorklistSettings = WorklistSettings()
    goals: Goals = Goals()

    @model_validator(mode="after")
    def _unique_findings(self) -> Scenario:
        names = [finding.name for finding in self.findings]
        if len(set(names)) != len(names):
            raise ValueError("finding names must be unique")
        return self

    def radiologists_per_day(self) -> float:
        """Radiologist-hours a day divided by eight: for sanity checks and descriptions."""
        hours = sum((s.end_minute - s.start_minute) / 60 * s.radiologists for s in self.shifts)
        return hours / 8

    def with_false_positive_rate(self, rate: float) -> Scenario:
        """The same scenario with every finding's specificity set to ``1 - rate``."""
        findings = [f.model_copy(update={"specificity": 1.0 - rate}) for f in self.findings]
        return self.model_copy(update={"findings": findings})


def load_scenario(path: Path | str) -> Scenario:
    """Load and validate a scenario TOML file (errors name the file, line and key)."""
    return load_toml(path, Scenario)
