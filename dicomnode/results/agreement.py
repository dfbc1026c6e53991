"""Whether the triage models a results job runs again agree with the findings the study shows,
and the study analysed again when they do not.

The analyse job commits a study's findings and priority; its results job writes the result
objects (an SR per model saying each finding present or absent, with its probability and the
model's version). With the analysis in memory (:mod:`dicomnode.pipeline.handover`) both come
from one run. Without it (another worker, a restart, a retry, an entry left out for memory)
the results job runs the triage models again, with the cards the worker has now: after an
upgrade or a reload (SIGHUP) those may be other versions than the analysis ran, and an SR of
1.1.0 would then call a finding present that the worklist's 1.0.0 priority says is absent.

So a results job that ran them again compares (:func:`compare`) what it got with the study's
finding rows: a finding model of another version (or card), one the study has no findings of,
or a label whose call (present or absent) differs, means its objects would not say what the
worklist says. None of them is written; the study is analysed again (:func:`analyse_again`:
an ``analyse`` job, as the assembly queues one), whose own results job then writes objects
from the same run as the priority. Probabilities that differ beyond
:data:`PROBABILITY_TOLERANCE` with the same call are logged at WARNING (the same model on the
same images should give the same numbers) and the objects are written.

An analysis handed over in memory that was made with cards since replaced by a reload
(:func:`replaced_cards`) is not used: its results job runs the models again, as above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.db.models import FindingRow, Job, Study
from dicomnode.findings import ModelRun
from dicomnode.jobs.queue import enqueue
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.analyse import Triaged, label_probabilities

log = logging.getLogger("dicomnode.pipeline")

# Probabilities of the same model on the same images that differ by more than this are
# logged (inference on another device or batch size differs in the last digits, not here).
PROBABILITY_TOLERANCE = 1e-3
# Analyses in a row that a study's results jobs queue because the models disagree: after
# these the results job writes the objects of the models that agree and names the others as
# not written (workers on one database with different model cards would otherwise analyse
# the study again and again).
MAX_ANALYSES_AGAIN = 2
# The analyse job's payload key: how many analyses in a row results jobs have queued.
AGAIN_KEY = "models_disagreed"


@dataclass(frozen=True)
class Shown:
    """A finding row of the study: one label of one model, as the worklist shows it."""

    model_name: str
    model_version: str
    code_value: str
    code_scheme: str
    probability: float
    threshold: float
    critical: bool


def shown_findings(session: Session, study_id: int) -> list[Shown]:
    """The study's finding rows (in the caller's transaction)."""
    rows = session.scalars(select(FindingRow).where(FindingRow.study_id == study_id))
    return [
        Shown(
            row.model_name,
            row.model_version,
            row.code_value,
            row.code_scheme,
            row.probability,
            row.threshold,
            row.critical,
        )
        for row in rows
    ]


@dataclass
class Comparison:
    """How the triage models run again differ from the study's findings."""

    # Model name -> how it differs ("1.0.0 on the worklist, 1.1.0 now"): its objects would
    # not say what the worklist says.
    disagreeing: dict[str, str] = field(default_factory=dict)
    # Probabilities beyond the tolerance with the same call, one line each.
    drifted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "; ".join(f"{name} {how}" for name, how in sorted(self.disagreeing.items()))


def compare(shown: Sequence[Shown], runs: Sequence[tuple[ModelCard, ModelRun]]) -> Comparison:
    """Compare the finding models' ``runs`` (run again by a results job) with the study's
    finding rows ``shown``. A model the study has findings of that did not run again (left out:
    its file cannot be loaded) is not compared: the results job names it as not written."""
    comparison = Comparison()
    by_model: dict[str, list[Shown]] = {}
    for row in shown:
        by_model.setdefault(row.model_name, []).append(row)
    for card, run in runs:
        values = label_probabilities(card, run)
        if not values:
            continue
        name, version = card.model.name, card.model.version
        rows = by_model.get(name, [])
        if not rows:
            comparison.disagreeing[name] = f"{version}: the study has no findings of it"
            continue
        versions = sorted({row.model_version for row in rows})
        if versions != [version]:
            comparison.disagreeing[name] = (
                f"{', '.join(versions)} on the worklist, {version} in this worker"
            )
            continue
        labels = {(row.code_value, row.code_scheme): row for row in rows}
        for label, probability in values:
            row = labels.get((label.code_value, label.code_scheme))
            if row is None or (row.threshold, row.critical) != (label.threshold, label.critical):
                comparison.disagreeing[name] = (
                    f"{version}: its card's labels or thresholds changed since the analysis"
                )
                break
            if (probability >= row.threshold) != (row.probability >= row.threshold):
                comparison.disagreeing[name] = (
                    f"{version}: {label.code_meaning} p={probability:.5f} now, "
                    f"p={row.probability:.5f} on the worklist (threshold {row.threshold:g})"
                )
                break
            if abs(probability - row.probability) > PROBABILITY_TOLERANCE:
                comparison.drifted.append(
                    f"{name} {version} {label.code_meaning}: p={probability:.5f} now, "
                    f"p={row.probability:.5f} on the worklist"
                )
    return comparison


def replaced_cards(
    triaged: Triaged,
    configured: Sequence[ModelCard],
    identity: Callable[[ModelCard], str] = ModelCard.onnx_identity,
) -> list[str]:
    """The models of an analysis handed over in memory whose cards the worker no longer has as
    they were (a reload replaced or removed them), or whose ONNX file ``identity`` (what the
    runtime runs now, :meth:`Runtime.onnx_identity`) is not the one the analysis ran with (a
    file replaced under the same card and reloaded), as "name version"."""
    current = {card.model.name: card for card in configured}
    used = [card for card, _ in [*triaged.runs, *triaged.later]]
    # An ensemble's members ran as part of it.
    used += [
        triaged.models.members[name]
        for card in list(used)
        if card.ensemble is not None
        for name in card.ensemble.members
        if name in triaged.models.members
    ]
    replaced = {
        f"{card.model.name} {card.model.version}"
        for card in used
        if current.get(card.model.name) != card
        or triaged.identities.get(card.model.name, identity(card)) != identity(card)
    }
    return sorted(replaced)


def analyse_again(
    session: Session, study_id: int, job_id: int, comparison: Comparison
) -> str | None:
    """Queue the study's analysis again instead of writing results job ``job_id``'s objects,
    which would disagree with its findings (``comparison``); commits. Returns what was done,
    for the job's note and log line, or None when :data:`MAX_ANALYSES_AGAIN` analyses in a row
    were queued so already (the caller writes the models that agree)."""
    # The study's row first, then the jobs: an assembly or an admin's retry queuing an
    # analysis meanwhile takes turns with this (on PostgreSQL; SQLite serialises writers).
    study = session.scalars(
        select(Study)
        .where(Study.id == study_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    job = session.get(Job, job_id)
    if study is None or job is None:
        session.rollback()
        return "study no longer exists; no result object written"
    newer = session.scalar(
        select(func.min(Job.id)).where(
            Job.study_id == study_id, Job.kind == "results", Job.id > job_id
        )
    )
    analysis = session.scalar(
        select(Job)
        .where(Job.study_id == study_id, Job.kind == "analyse", Job.id < job_id)
        .order_by(Job.id.desc())
        .limit(1)
    )
    again = int(((analysis.payload if analysis else None) or {}).get(AGAIN_KEY, 0))
    if newer is not None:
        note = f"superseded by results job {newer} of a newer analysis"
    elif study.analysis_status not in ("analysed", "failed"):
        note = "a newer analysis of the study is pending; its results job writes the objects"
    elif again >= MAX_ANALYSES_AGAIN:
        session.rollback()
        return None
    else:
        study.analysis_status = "queued"
        queued = enqueue(
            session,
            "analyse",
            study_id,
            {"generation": study.queued_generation, AGAIN_KEY: again + 1},
        )
        session.flush()
        note = f"study analysed again (analyse job {queued.id})"
    note = (
        f"no result object written: the triage models run again differ from the study's "
        f"findings ({comparison.summary()}); {note}"
    )
    job.payload = {**(job.payload or {}), "note": note[:2000]}
    session.commit()
    log.info("results job %d study_id=%d: %s", job_id, study_id, note)
    return note
