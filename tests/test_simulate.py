"""The reading-room simulation: it orders by the live policy function, is deterministic,
models the AI at the scenario's sensitivity and specificity, and every shipped scenario
meets the goals (critical median turnaround cut >= 90 %, routine worst wait within +5 %
of FIFO's), also when the model flags 10 % false positives."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

import dicomnode.simulate.engine as engine
from dicomnode.cli.main import main
from dicomnode.simulate.engine import Unstable, generate_studies, run, simulate
from dicomnode.simulate.report import evaluate
from dicomnode.simulate.scenario import Scenario, load_scenario
from dicomnode.tomlfile import ConfigError
from dicomnode.worklist import policy

SHIPPED = sorted((REPO / "conf" / "scenarios").glob("*.toml"))

SMALL = Scenario.model_validate(
    {
        "name": "small",
        "days": 2,
        "warmup_days": 0,
        "arrivals": {"studies_per_day": 150},
        "shifts": [{"start": "08:00", "end": "18:00", "radiologists": 1}],
        "reading": {"median_minutes": 3, "p90_minutes": 6},
        "findings": [
            {"name": "Pneumothorax", "prevalence": 0.05, "sensitivity": 0.9, "specificity": 0.9}
        ],
    }
)


def test_three_or_more_scenarios_are_shipped() -> None:
    names = {path.stem for path in SHIPPED}
    assert {"day-shift-cxr", "emergency-24h", "overnight-backlog"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
@pytest.mark.parametrize("false_positive_rate", [None, 0.1], ids=["nominal", "fp10"])
def test_shipped_scenario_meets_the_goals(path: Path, false_positive_rate: float | None) -> None:
    scenario = load_scenario(path)
    if false_positive_rate is not None:
        scenario = scenario.with_false_positive_rate(false_positive_rate)
    result = evaluate(scenario, simulate(scenario))
    assert [goal.name for goal in result.goals] == [
        "critical median turnaround",
        "routine worst wait",
    ]
    assert result.passed, [goal.detail for goal in result.goals]


def test_busy_day_shift_reads_over_100_cxr_per_radiologist_at_about_2_percent_critical() -> None:
    scenario = load_scenario(REPO / "conf" / "scenarios" / "day-shift-cxr.toml")
    radiologists = sum(shift.radiologists for shift in scenario.shifts)
    assert scenario.arrivals.studies_per_day / radiologists > 100
    critical = sum(f.prevalence for f in scenario.findings if f.critical)
    assert 0.015 <= critical <= 0.025


def test_policy_ordering_calls_the_live_policy_function(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine.prioritise is policy.prioritise
    calls: list[str] = []

    def spy(study, findings, now, settings):
        calls.append(study.analysis_status)
        return policy.prioritise(study, findings, now, settings)

    monkeypatch.setattr(engine, "prioritise", spy)
    studies = generate_studies(SMALL, SMALL.days, seed=3)
    run(SMALL, studies, "fifo", seed=3)
    assert calls == []
    run(SMALL, studies, "policy", seed=3)
    counts = Counter(calls)
    # Every study on arrival, and again when its AI result lands if still unread.
    assert counts["queued"] == len(studies)
    assert 0 < counts["analysed"] <= len(studies)


def test_same_seed_same_result_and_another_seed_differs() -> None:
    def summary(seed: int) -> list[tuple[int, float, float]]:
        return [
            (o.study.id, o.start, o.end) for r in simulate(SMALL, seed=seed) for o in r.outcomes
        ]

    assert summary(5) == summary(5)
    assert summary(5) != summary(6)


def test_model_output_matches_the_scenario_sensitivity_and_specificity() -> None:
    scenario = SMALL.model_copy(
        update={"arrivals": SMALL.arrivals.model_copy(update={"studies_per_day": 20000})}
    )
    studies = generate_studies(scenario, 2, seed=1)
    positives = [s for s in studies if s.truth["Pneumothorax"]]
    negatives = [s for s in studies if not s.truth["Pneumothorax"]]
    assert len(positives) / len(studies) == pytest.approx(0.05, abs=0.005)
    assert sum(s.flagged for s in positives) / len(positives) == pytest.approx(0.9, abs=0.03)
    assert sum(not s.flagged for s in negatives) / len(negatives) == pytest.approx(0.9, abs=0.01)
    # Confident calls are mostly true ones: false positives crowd the threshold.
    flagged = [s for s in studies if s.flagged]
    confident = [s for s in flagged if s.findings[0].probability >= 0.95]
    assert sum(s.truth["Pneumothorax"] for s in confident) / len(confident) > 0.5
    assert sum(s.truth["Pneumothorax"] for s in flagged) / len(flagged) < 0.5


def test_fifo_reads_in_arrival_order_and_both_orderings_share_the_reading_slots() -> None:
    studies = generate_studies(SMALL, SMALL.days, seed=2)
    fifo, by_policy = run(SMALL, studies, "fifo", 2), run(SMALL, studies, "policy", 2)
    arrivals = [o.study.arrival for o in sorted(fifo.outcomes, key=lambda o: o.start)]
    assert arrivals == sorted(arrivals)
    assert len(fifo.outcomes) == len(by_policy.outcomes) == len(studies)
    assert sorted(o.start for o in fifo.outcomes) == sorted(o.start for o in by_policy.outcomes)
    # Nobody reads outside a shift (08:00-18:00).
    assert all(480 <= o.start % 1440 < 1080 for o in fifo.outcomes)


def test_policy_keeps_every_due_time_when_the_room_can() -> None:
    light = SMALL.model_copy(
        update={
            "arrivals": SMALL.arrivals.model_copy(
                update={"studies_per_day": 60, "hourly_weights": [0] * 8 + [1] * 10 + [0] * 6}
            )
        }
    )
    studies = generate_studies(light, light.days, seed=4)
    key = engine.policy_key(light)
    outcomes = run(light, studies, "policy", 4).outcomes
    assert all(o.start <= key(o.study, analysed=True)[0] for o in outcomes)
    stats = evaluate(light, simulate(light, seed=4)).stats
    assert stats["flagged"]["policy"].worst_wait <= stats["flagged"]["fifo"].worst_wait


def test_more_studies_than_the_shifts_can_read_is_reported() -> None:
    overloaded = SMALL.model_copy(
        update={"arrivals": SMALL.arrivals.model_copy(update={"studies_per_day": 4000})}
    )
    with pytest.raises(Unstable, match="cannot keep up"):
        simulate(overloaded)


def test_scenario_errors_name_file_line_and_key(tmp_path: Path) -> None:
    text = (REPO / "conf" / "scenarios" / "day-shift-cxr.toml").read_text(encoding="utf-8")
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace('end = "18:00"', 'end = "18h"'), encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_scenario(broken)
    assert error.value.key == "shifts.0.end"
    assert error.value.line is not None
    assert broken.read_text().splitlines()[error.value.line - 1].startswith("end")
    broken.write_text(text.replace("hourly_weights = [", "hourly_weights = [0, "), encoding="utf-8")
    with pytest.raises(ConfigError, match="24 weights"):
        load_scenario(broken)


def test_cli_prints_goals_and_writes_the_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "chart.png"
    scenario = REPO / "conf" / "scenarios" / "emergency-24h.toml"
    code = main(
        [
            "simulate",
            "--scenario",
            str(scenario),
            "--days",
            "2",
            "--seed",
            "7",
            "--false-positive-rate",
            "0.1",
            "--plot",
            str(chart),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "emergency-24h" in out and "seed 7" in out and "spec 90%" in out
    assert out.count("PASS") + out.count("FAIL") == 2
    for group in ("critical", "routine", "flagged", "not flagged"):
        assert f"\n{group} " in out
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width >= 600
