"""Simulation results: per-group turnaround and wait, the goals, a table and a PNG chart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicomnode.simulate.engine import Run
from dicomnode.simulate.scenario import Scenario

# Ground-truth tiers first, then what the model said.
GROUPS = ("stat", "critical", "urgent", "routine", "flagged", "not flagged")


@dataclass(frozen=True)
class GroupStats:
    count: int
    median_turnaround: float  # minutes from arrival to report done
    p95_turnaround: float
    worst_wait: float  # longest minutes from arrival to the start of reading


@dataclass(frozen=True)
class GoalCheck:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    # group -> ordering ("fifo", "policy") -> statistics; groups without studies left out
    stats: dict[str, dict[str, GroupStats]]
    goals: list[GoalCheck]

    @property
    def passed(self) -> bool:
        return all(goal.passed for goal in self.goals)


def group_stats(scenario: Scenario, runs: list[Run]) -> dict[str, dict[str, GroupStats]]:
    """Statistics of the measured studies per group and ordering."""
    critical_names = {f.name for f in scenario.findings if f.critical}
    stats: dict[str, dict[str, GroupStats]] = {}
    for run in runs:
        waits: dict[str, list[float]] = {}
        turnarounds: dict[str, list[float]] = {}
        for outcome in run.outcomes:
            if not outcome.study.measured:
                continue
            for group in outcome.study.groups(critical_names):
                waits.setdefault(group, []).append(outcome.wait)
                turnarounds.setdefault(group, []).append(outcome.turnaround)
        for group in GROUPS:
            if group not in waits:
                continue
            times = np.asarray(turnarounds[group])
            stats.setdefault(group, {})[run.ordering] = GroupStats(
                count=len(times),
                median_turnaround=float(np.median(times)),
                p95_turnaround=float(np.percentile(times, 95)),
                worst_wait=float(max(waits[group])),
            )
    return stats


def check_goals(scenario: Scenario, stats: dict[str, dict[str, GroupStats]]) -> list[GoalCheck]:
    """The scenario's goals: critical median turnaround cut, routine worst wait held."""
    goals = scenario.goals
    checks = []
    if "critical" in stats:
        fifo, policy = stats["critical"]["fifo"], stats["critical"]["policy"]
        cut = 1 - policy.median_turnaround / fifo.median_turnaround
        checks.append(
            GoalCheck(
                "critical median turnaround",
                cut >= goals.critical_median_cut,
                f"{fifo.median_turnaround:.0f} -> {policy.median_turnaround:.0f} min, "
                f"cut {cut:.0%} (goal >= {goals.critical_median_cut:.0%})",
            )
        )
    else:
        checks.append(GoalCheck("critical median turnaround", False, "no critical study"))
    if "routine" in stats:
        fifo, policy = stats["routine"]["fifo"], stats["routine"]["policy"]
        rise = policy.worst_wait / fifo.worst_wait - 1
        checks.append(
            GoalCheck(
                "routine worst wait",
                rise <= goals.routine_worst_wait_increase,
                f"{fifo.worst_wait:.0f} -> {policy.worst_wait:.0f} min, {rise:+.1%} "
                f"(goal <= {goals.routine_worst_wait_increase:+.0%})",
            )
        )
    return checks


def evaluate(scenario: Scenario, runs: list[Run]) -> ScenarioResult:
    """Statistics and goal checks of one scenario's FIFO and policy runs."""
    stats = group_stats(scenario, runs)
    return ScenarioResult(scenario, stats, check_goals(scenario, stats))


def format_table(result: ScenarioResult) -> str:
    """Plain-text table: per group, FIFO and policy turnaround and worst wait (minutes)."""
    lines = [
        f"{'group':<12} {'n':>6}  {'median TAT':>17}  {'p95 TAT':>17}  {'worst wait':>17}",
        f"{'':<12} {'':>6}  {'FIFO':>8} {'policy':>8}  {'FIFO':>8} {'policy':>8}  "
        f"{'FIFO':>8} {'policy':>8}",
    ]
    for group, by_ordering in result.stats.items():
        fifo, policy = by_ordering["fifo"], by_ordering["policy"]
        lines.append(
            f"{group:<12} {fifo.count:>6}  {fifo.median_turnaround:>8.0f} "
            f"{policy.median_turnaround:>8.0f}  {fifo.p95_turnaround:>8.0f} "
            f"{policy.p95_turnaround:>8.0f}  {fifo.worst_wait:>8.0f} {policy.worst_wait:>8.0f}"
        )
    for goal in result.goals:
        lines.append(f"{'PASS' if goal.passed else 'FAIL'}  {goal.name}: {goal.detail}")
    return "\n".join(lines)


def describe(scenario: Scenario, days: int, seed: int) -> str:
    """Two header lines: the scenario and the settings it ran with."""
    specificity = ", ".join(
        f"{f.name} {f.prevalence:.1%} (sens {f.sensitivity:.0%}, spec {f.specificity:.0%})"
        for f in scenario.findings
    )
    waits = scenario.policy.max_wait_minutes
    return (
        f"== {scenario.name}: {scenario.description}\n"
        f"   {days} days after {scenario.warmup_days} warm-up, seed {seed}; "
        f"{scenario.arrivals.studies_per_day:g} studies/day; {specificity}\n"
        f"   policy max waits (min): stat {waits.stat:g}, critical {waits.critical:g}, "
        f"urgent {waits.urgent:g}, routine {waits.routine:g}; full head start at "
        f"p >= {scenario.policy.full_head_start_probability:g}, "
        f"{scenario.policy.min_head_start_share:.0%} at the threshold\n"
        "   minutes; TAT = arrival to report done; wait = arrival to start of reading"
    )


# Chart ------------------------------------------------------------------------------------

FIFO_COLOUR = (150, 150, 150)
POLICY_COLOUR = (200, 40, 40)
PANEL_WIDTH, PANEL_HEIGHT, MARGIN = 900, 260, 60
METRICS = (("median_turnaround", "median TAT"), ("worst_wait", "worst wait"))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _panel(draw: ImageDraw.ImageDraw, top: int, result: ScenarioResult) -> None:
    groups = [g for g in ("critical", "urgent", "routine", "stat") if g in result.stats]
    bars = [(g, metric, label) for g in groups for metric, label in METRICS]
    values = [
        getattr(result.stats[g][ordering], metric)
        for g, metric, _ in bars
        for ordering in ("fifo", "policy")
    ]
    scale = max([*values, 1.0])
    verdict = "PASS" if result.passed else "FAIL"
    draw.text(
        (MARGIN, top + 6), f"{result.scenario.name} [{verdict}]", fill="black", font=_font(16)
    )
    base = top + PANEL_HEIGHT - 40
    height = PANEL_HEIGHT - 90
    slot = (PANEL_WIDTH - 2 * MARGIN) / max(len(bars), 1)
    draw.line((MARGIN, base, PANEL_WIDTH - MARGIN, base), fill="black")
    for index, (group, metric, label) in enumerate(bars):
        left = MARGIN + index * slot + slot * 0.15
        width = slot * 0.33
        for offset, ordering, colour in ((0, "fifo", FIFO_COLOUR), (1, "policy", POLICY_COLOUR)):
            value = getattr(result.stats[group][ordering], metric)
            x0 = left + offset * width
            y0 = base - height * value / scale
            draw.rectangle((x0, y0, x0 + width - 2, base), fill=colour)
            draw.text((x0, y0 - 14), f"{value:.0f}", fill="black", font=_font(11))
        draw.text((left, base + 4), f"{group}", fill="black", font=_font(12))
        draw.text((left, base + 18), label, fill="black", font=_font(11))


def write_plot(results: list[ScenarioResult], path: Path) -> None:
    """Bar chart (PNG) per scenario: FIFO (grey) and policy (red), in minutes."""
    image = Image.new("RGB", (PANEL_WIDTH, PANEL_HEIGHT * len(results) + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (MARGIN, 10),
        "Report turnaround and worst wait, minutes: FIFO (grey) vs policy (red)",
        fill="black",
        font=_font(14),
    )
    for index, result in enumerate(results):
        _panel(draw, 40 + index * PANEL_HEIGHT, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
