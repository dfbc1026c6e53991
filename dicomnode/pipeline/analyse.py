"""Analyse one assembled study: select models, infer, record findings and re-prioritise.

The I/O shell around the pure steps (select, preprocess, postprocess, policy): the
``analyse`` job (:func:`analyse_study`) runs the models whose findings set the priority,
commits the findings and the worklist priority and queues the study's ``results`` job
(:func:`dicomnode.results.job.write_results`), which runs the other models and writes the
result objects after any analysis waiting in the queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import pydicom
from pydicom import Dataset
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from dicomnode import made_by_this_node
from dicomnode.config import Settings, WorklistSettings
from dicomnode.db.models import FindingRow, Instance, Job, Series, Study
from dicomnode.db.session import utcnow
from dicomnode.findings import ModelRun
from dicomnode.jobs.queue import enqueue
from dicomnode.models.registry import Label, ModelCard
from dicomnode.notify import becomes_critical, enqueue_notifications
from dicomnode.pipeline.decode import DecodeError, first_frame
from dicomnode.pipeline.handover import Handover, array_bytes
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.select import (
    image_facts,
    lossy_lineage,
    routed_view,
    rules_match,
    select_models,
    with_view,
)
from dicomnode.pipeline.tasks import Presentations, run_model
from dicomnode.worklist.policy import DEFAULT_SETTINGS, UNREADABLE_ERROR
from dicomnode.worklist.service import reprioritise

log = logging.getLogger("dicomnode.pipeline")

# Tasks whose labels become worklist findings (probabilities). Segmentation and image-to-image
# results are objects only; a landmark (e.g. where a tube's tip is) is a position to check, not
# a finding that should move a study up the worklist, so it is reported in the SR/GSPS only.
FINDING_TASKS = ("classification", "multi-label", "ensemble", "detection")


@dataclass
class StageTimes:
    """Seconds spent per stage, for the job's log line and benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)
    # What the job did besides its stages, for its log line (e.g. "14 result objects").
    note: str = ""

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def __str__(self) -> str:
        stages = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.seconds.items())
        return f"{stages} {self.note}".strip()


def load_images(
    session: Session, study: Study, up_to: int | None = None
) -> tuple[list[Dataset], list[str], int]:
    """The study's images, decoded (pydicom keeps the pixels for every model and writer), the
    reasons for the images that cannot be decoded (those are left out), and the highest
    instance id read. ``up_to``: only the instances with ids up to it (those an earlier
    analysis read; instances indexed since have higher ids). A lossy-compressed copy of an
    image the study holds (its uncompressed predecessor) is left out where that image
    decodes (the same picture analysed twice gave two sets of findings and objects), else
    analysed in its place, the original then not counted among those that cannot be."""
    query = select(Instance.id, Instance.path).join(Series).where(Series.study_id == study.id)
    if up_to is not None:
        query = query.where(Instance.id <= up_to)
    rows = session.execute(
        query.order_by(Instance.series_id, Instance.instance_number, Instance.id)
    ).all()
    highest = max((row.id for row in rows), default=0)
    paths = [row.path for row in rows]
    # End the read transaction before decoding and the models: on SQLite every transaction
    # holds the write lock, which ingest needs for its rows meanwhile.
    session.commit()
    candidates = []
    for path in paths:
        ds = pydicom.dcmread(path)
        # No pixels to analyse, or the node's own result routed back by a PACS (never
        # selected: not decoded either).
        if "PixelData" in ds and not made_by_this_node(ds.get("Manufacturer")):
            candidates.append(ds)
    lineage = lossy_lineage(candidates)
    images: list[Dataset] = []
    failed: dict[str, str] = {}
    decoded: set[str] = set()
    # Originals first, then copies, copies of copies: a copy is decoded only where no image
    # it was made from decoded, and then stands in for them (they count as analysed).
    for ds in sorted(candidates, key=lambda ds: len(lineage[str(ds.SOPInstanceUID)])):
        uid = str(ds.SOPInstanceUID)
        if lineage[uid] & decoded:
            log.info("study_id=%d: a lossy-compressed copy of an image it holds left out", study.id)
            continue
        try:
            first_frame(ds)
        except DecodeError as error:
            log.warning("study_id=%d: image left out: %s", study.id, error)
            failed[uid] = str(error)
            continue
        decoded.add(uid)
        images.append(ds)
        for ancestor in lineage[uid]:
            failed.pop(ancestor, None)
    order = {id(ds): index for index, ds in enumerate(candidates)}
    images.sort(key=lambda ds: order[id(ds)])
    return images, list(failed.values()), highest


class Models:
    """Which models run on which of a study's images, sharing presentations and members."""

    def __init__(self, cards: list[ModelCard], images: list[Dataset]):
        self.cards = cards
        self.images = images
        self.members = {card.model.name: card for card in cards}
        self.presentations = Presentations()
        self.facts = {id(ds): image_facts(ds) for ds in images}

    def run(
        self, card: ModelCard, images: list[Dataset], runtime: Runtime, times: StageTimes
    ) -> ModelRun:
        # Heat maps are resampled when the result objects are built, after the triage commit.
        return run_model(
            card, images, runtime, times, self.members, self.presentations, defer_heatmaps=True
        )

    def route(self, runtime: Runtime, times: StageTimes) -> list[tuple[ModelCard, ModelRun]]:
        """Run the view routers; their view replaces the header's for selection."""
        runs = []
        for router in (c for c in self.cards if c.model.standalone and c.model.sets == "view"):
            selected = [ds for ds in self.images if rules_match(router.select, self.facts[id(ds)])]
            if not selected:
                continue
            run = self.run(router, selected, runtime, times)
            for evaluation in run.images:
                view = routed_view(router, evaluation.findings)
                before = self.facts[id(evaluation.source)].view
                if view is not None:
                    self.facts[id(evaluation.source)] = with_view(
                        self.facts[id(evaluation.source)], view
                    )
                    if before and before != view:
                        log.info(
                            "router %s: view %s (header says %s)", router.model.name, view, before
                        )
            runs.append((router, run))
        return runs

    def selected(self) -> list[tuple[ModelCard, list[Dataset]]]:
        """Every standalone model with the images its rules admit (after routing)."""
        by_model: dict[str, tuple[ModelCard, list[Dataset]]] = {}
        for ds in self.images:
            for card in select_models(self.cards, self.facts[id(ds)]):
                if card.model.standalone and not card.model.sets:
                    by_model.setdefault(card.model.name, (card, []))[1].append(ds)
        return list(by_model.values())


def label_probabilities(card: ModelCard, run: ModelRun) -> list[tuple[Label, float]]:
    """What a model's run gives the worklist: each label with its highest probability on the
    study's images; none for a router or a model whose task sets no findings."""
    if card.model.sets or card.model.task not in FINDING_TASKS:
        return []
    return [
        (
            label,
            max(
                (
                    f.probability
                    for e in run.images
                    for f in e.findings
                    if f.concept == label.concept
                ),
                default=0.0,
            ),
        )
        for label in card.labels
    ]


def _record_findings(session: Session, study: Study, card: ModelCard, run: ModelRun) -> None:
    """One worklist finding row per label: the label's highest probability on the study."""
    session.execute(
        delete(FindingRow).where(
            FindingRow.study_id == study.id, FindingRow.model_name == card.model.name
        )
    )
    for label, best in label_probabilities(card, run):
        session.add(
            FindingRow(
                study_id=study.id,
                model_name=card.model.name,
                model_version=card.model.version,
                code_value=label.code_value,
                code_scheme=label.code_scheme,
                code_meaning=label.code_meaning,
                probability=best,
                threshold=label.threshold,
                critical=label.critical,
            )
        )


@dataclass
class Triaged:
    """What an analysis leaves for its results job: the study's decoded images (with their
    shared presentations), the runs of the models that set the priority (heat maps not yet
    resampled) and the models still to run on which images."""

    models: Models
    runs: list[tuple[ModelCard, ModelRun]]
    later: list[tuple[ModelCard, list[Dataset]]]
    # Model name -> the identity of its ONNX file (Runtime.onnx_identity) when the triage ran:
    # a results job whose runtime has loaded another file since runs the models again.
    identities: dict[str, str] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Estimated memory held (decoded and presentation pixels, model outputs)."""
        seen: set[int] = set()
        return (
            array_bytes(self.models.images, seen)
            + array_bytes([run for _, run in self.runs], seen)
            + self.models.presentations.nbytes
        )


def triage_models(models: Models, runtime: Runtime, times: StageTimes) -> Triaged:
    """Run the view routers and the models whose findings set the priority; the others are
    left for the results job."""
    runs = models.route(runtime, times)
    later = []
    for card, selected in models.selected():
        if card.model.task in FINDING_TASKS:
            runs.append((card, models.run(card, selected, runtime, times)))
        else:
            later.append((card, selected))
    identities = {card.model.name: runtime.onnx_identity(card) for card in models.cards}
    return Triaged(models, runs, later, identities)


def not_run(models: Models, left_out: Sequence[tuple[ModelCard, str]]) -> list[str]:
    """The names of the finding models among ``left_out`` (cannot be loaded) that would have
    read one of the study's images (after view routing): their silence is no negative
    result."""
    return [
        card.model.name
        for card, _ in left_out
        if card.model.standalone
        and not card.model.sets
        and card.model.task in FINDING_TASKS
        and any(rules_match(card.select, models.facts[id(ds)]) for ds in models.images)
    ]


def analyse_study(
    session: Session,
    settings: Settings,
    cards: list[ModelCard],
    runtime: Runtime,
    study_id: int,
    handover: Handover | None = None,
    left_out: Sequence[tuple[ModelCard, str]] = (),
) -> StageTimes:
    """Run the models that set the study's priority, record findings and priority, and queue
    (in the same transaction) a ``results`` job for the other models and the result objects
    (:func:`dicomnode.results.job.write_results`). ``handover``: where the analysis is kept
    for that job (same process). ``left_out``: the worker's cards that cannot be loaded; a
    finding model among them whose rules admit an image of the study is named in the
    priority's reason as not run. ``times.seconds["triaged"]``: seconds from the start to the
    committed priority."""
    begun = time.perf_counter()
    times = StageTimes()
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study id {study_id} no longer exists")
    study.analysis_status = "analysing"
    session.commit()

    started = time.perf_counter()
    images, undecodable, read_up_to = load_images(session, study)
    times.add("decode", started)
    # Kept on the study so that every re-prioritisation (an override) says how many images the
    # AI could not read.
    study.image_count = len(images) + len(undecodable)
    study.unreadable_image_count = len(undecodable)
    if undecodable and not images:
        # A file that cannot be decoded stays so: fail the study now instead of retrying.
        mark_failed(session, study.id, "; ".join(undecodable), settings.worklist, unreadable=True)
        return times

    # Triage first: the models whose findings set the priority, then the priority is committed
    # (the radiologist's worklist moves now); segmentation, image-to-image and landmark models
    # and every result object are the results job's, which the worker runs after any waiting
    # analysis.
    triaged = triage_models(Models(cards, images), runtime, times)
    for card, run in triaged.runs:
        _record_findings(session, study, card, run)
    study.analysis_status = "analysed"
    # Images left out are named (the study is analysed on the others).
    study.analysis_error = "; ".join(undecodable)[:2000]
    study.models_not_run = ", ".join(not_run(triaged.models, left_out))
    session.flush()
    session.refresh(study, ["findings"])
    tier_before = study.tier
    reprioritise(session, study, utcnow(), settings.worklist)
    if becomes_critical(tier_before, study.tier):
        enqueue_notifications(session, study, settings.notify)
    job = None
    if triaged.runs or triaged.later:
        # Queued with the priority: if the worker dies after this commit, the results are
        # still written (by whichever worker claims the job), from the instances read here
        # (a recomputation leaves out any indexed since).
        job = enqueue(session, "results", study.id, {"instances_up_to": read_up_to})
        session.flush()
        if handover is not None:
            handover.put(job.id, triaged, triaged.nbytes(), _still_queued(session))
    try:
        session.commit()
    except BaseException:
        if handover is not None and job is not None:
            handover.discard(job.id)
        raise
    times.seconds["triaged"] = time.perf_counter() - begun
    return times


def _still_queued(session: Session) -> Callable[[Iterable[int]], set[int]]:
    """Which of some results jobs still wait in the queue (the others' analyses are stale)."""

    def still_queued(job_ids: Iterable[int]) -> set[int]:
        return set(
            session.scalars(select(Job.id).where(Job.id.in_(list(job_ids)), Job.state == "queued"))
        )

    return still_queued


def mark_failed(
    session: Session,
    study_id: int,
    reason: str,
    worklist: WorklistSettings = DEFAULT_SETTINGS,
    *,
    unreadable: bool = False,
) -> None:
    """Record a failed analysis; the study keeps (never loses) its place in the worklist.
    ``unreadable``: none of its images can be read (the AI never looked), which the worklist
    row says instead of "failed" (policy.UNREADABLE, kept as the error's first words)."""
    study = session.get(Study, study_id)
    if study is None:
        return
    study.analysis_status = "failed"
    study.analysis_error = ((UNREADABLE_ERROR if unreadable else "") + reason)[:2000]
    reprioritise(session, study, utcnow(), worklist)
    session.commit()
