"""Run one model card on a study's images: the per-task steps from DICOM to a ModelRun.

Classification, multi-label and ensembles give per-image probabilities (and CAM heat maps);
detection gives boxes (2-D, or per slice from 2.5D stacks, merged across adjacent slices);
landmark gives points; segmentation gives per-series segments; image-to-image gives derived
images. Inference runs through the shared Runtime in batches.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset

from dicomnode.findings import (
    DerivedImage,
    Finding,
    ImageFindings,
    ModelRun,
    Segment,
    Segmentation,
)
from dicomnode.models.registry import InputSpec, ModelCard
from dicomnode.pipeline.correction import apply_correction
from dicomnode.pipeline.letterbox import Letterbox
from dicomnode.pipeline.postprocess import (
    classification_findings,
    detection_findings,
    image_correction,
    landmark_findings,
    mask_maps,
    normalise_map,
)
from dicomnode.pipeline.preprocess import Presentation, prepare_input, prepare_stack
from dicomnode.pipeline.presentation_values import presentation_pixels
from dicomnode.pipeline.series import Stack, same_orientation, stacks_in_order

if TYPE_CHECKING:
    from dicomnode.pipeline.analyse import StageTimes
    from dicomnode.pipeline.runtime import Runtime

log = logging.getLogger("dicomnode.pipeline")

# Largest batch handed to the runtime at once (bounds memory on large CT series).
MAX_BATCH = 32

# Presentation pixels kept for the other models of a study, up to this many bytes.
PRESENTATION_CACHE_BYTES = 512 * 1024 * 1024


class Presentations:
    """Presentation pixels (decoded, LUTs and window applied, 0..1) per image and window,
    computed once for all the models that analyse a study's images, with their resamplings
    to each model input size."""

    def __init__(self, max_bytes: int = PRESENTATION_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._cache: dict[tuple, Presentation] = {}
        self._kept = 0  # bytes of the pixels kept, twice: with their Pillow image

    @property
    def nbytes(self) -> int:
        """Bytes of the presentations kept (pixels and resamplings)."""
        return sum(presentation.nbytes for presentation in self._cache.values())

    def get(self, ds: Dataset, spec: InputSpec) -> Presentation:
        window = tuple(spec.window) if spec.window is not None else None
        key = (id(ds), tuple(spec.window_percentiles), window)
        presentation = self._cache.get(key)
        if presentation is None:
            presentation = Presentation(
                presentation_pixels(ds, spec.window_percentiles, spec.window)
            )
            # Kept while the pixels and their Pillow image fit (resamplings are small).
            if self._kept + 2 * presentation.pixels.nbytes <= self.max_bytes:
                self._cache[key] = presentation
                self._kept += 2 * presentation.pixels.nbytes
        return presentation


Postprocess = Callable[[ModelCard, dict[str, np.ndarray], int, Letterbox], list[Finding]]


def infer(
    card: ModelCard,
    samples: list[tuple[np.ndarray, Letterbox]],
    runtime: Runtime,
    times: StageTimes,
) -> dict[str, np.ndarray]:
    """Run prepared samples through the model in chunks of ``MAX_BATCH``, as many at once as
    the model runs batches (on the CPU a CT series' chunks then take every core, one thread
    each); outputs concatenated along N in the samples' order."""
    started = time.perf_counter()

    def run_chunk(start: int) -> dict[str, np.ndarray]:
        batch = np.stack([array for array, _ in samples[start : start + MAX_BATCH]])
        return runtime.run(card, batch)

    starts = range(0, len(samples), MAX_BATCH)
    workers = min(len(starts), runtime.in_flight(card))
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="dicomnode-chunks") as pool:
            outputs = list(pool.map(run_chunk, starts))
    else:
        outputs = [run_chunk(start) for start in starts]
    times.add("inference", started)
    if not outputs:
        return {}
    return {name: np.concatenate([out[name] for out in outputs]) for name in outputs[0]}


def _stacks(card: ModelCard, images: list[Dataset]) -> list[Stack]:
    """The images as stacks of one geometry in slice order, with a log line for each series
    that splits (a localiser beside the axial slices), each duplicate position and gap."""
    stacks, notes = stacks_in_order(images, card.select.orientation_tolerance_deg)
    for note in notes:
        log.info("%s: %s", card.model.name, note)
    return stacks


def _prepare_images(
    card: ModelCard,
    images: list[Dataset],
    stacks: list[Stack] | None,
    presentations: Presentations,
) -> list:
    spec = card.input
    if spec.slices == 1:
        return [prepare_input(ds, spec, pixels=presentations.get(ds, spec)) for ds in images]
    assert stacks is not None
    samples = []
    for stack in stacks:
        for index in range(len(stack)):
            slices = stack.neighbours(index, spec.slices)
            pixels = [presentations.get(ds, spec) for ds in slices]
            samples.append(prepare_stack(slices, spec, pixels=pixels))
    return samples


def _inferred(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    presentations: Presentations,
    stacks: list[Stack] | None = None,
) -> tuple[list[Dataset], list, dict[str, np.ndarray]]:
    """The images in the order the model saw them (those of ``stacks`` in stack and slice
    order where given or where the input is 2.5D: images left out of every stack are not
    analysed), their samples (input, letterbox geometry) and the model's outputs."""
    started = time.perf_counter()
    if stacks is None and card.input.slices > 1:
        stacks = _stacks(card, images)
    if stacks is not None:
        images = [ds for stack in stacks for ds in stack.images]
    samples = _prepare_images(card, images, stacks, presentations)
    times.add("preprocess", started)
    return images, samples, infer(card, samples, runtime, times)


def _per_image(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    postprocess: Postprocess,
    presentations: Presentations,
    stacks: list[Stack] | None = None,
) -> list[ImageFindings]:
    images, samples, outputs = _inferred(card, images, runtime, times, presentations, stacks)
    started = time.perf_counter()
    evaluations = [
        ImageFindings(ds, postprocess(card, outputs, index, geometry))
        for index, (ds, (_, geometry)) in enumerate(zip(images, samples, strict=True))
    ]
    times.add("postprocess", started)
    return evaluations


def merge_across_slices(
    evaluations: list[ImageFindings],
    max_gap: int = 1,
    places: list[tuple[int, int]] | None = None,
) -> list[ImageFindings]:
    """Keep one box per lesion seen on adjacent slices of a series: a box whose centre lies
    inside a higher-scoring box of the same concept within ``max_gap`` slices is dropped.
    ``places``: each evaluation's (stack, slot) where slots count nominal slice spacings (see
    Stack.slots: slices across a gap are not adjacent); else slices are adjacent by index
    within a series."""
    if places is None:
        series: dict[object, int] = {}
        places = [
            (series.setdefault(e.source.get("SeriesInstanceUID"), len(series)), index)
            for index, e in enumerate(evaluations)
        ]
    order = sorted(
        (
            (finding.probability, index, position)
            for index, evaluation in enumerate(evaluations)
            for position, finding in enumerate(evaluation.findings)
            if finding.box is not None
        ),
        reverse=True,
    )
    # Kept boxes by (stack, slot): a box is compared with those of the slots within max_gap
    # only (a series' detector may give thousands of low-scoring boxes).
    kept: dict[tuple[int, int], list[Finding]] = {}
    gaps = [gap for gap in range(-max_gap, max_gap + 1) if gap != 0]
    dropped: set[tuple[int, int]] = set()
    for _, index, position in order:
        finding = evaluations[index].findings[position]
        assert finding.box is not None
        col = (finding.box[0] + finding.box[2]) / 2
        row = (finding.box[1] + finding.box[3]) / 2
        stack, slot = places[index]
        inside = any(
            box[0] <= col <= box[2] and box[1] <= row <= box[3] and other.concept == finding.concept
            for gap in gaps
            for other in kept.get((stack, slot + gap), ())
            if (box := other.box) is not None
        )
        if inside:
            dropped.add((index, position))
        else:
            kept.setdefault((stack, slot), []).append(finding)
    return [
        ImageFindings(
            evaluation.source,
            [
                f
                for position, f in enumerate(evaluation.findings)
                if (index, position) not in dropped
            ],
        )
        for index, evaluation in enumerate(evaluations)
    ]


def _places(stacks: list[Stack]) -> list[tuple[int, int]]:
    """(stack, slot) of every image of ``stacks`` in order, for merge_across_slices."""
    return [(number, slot) for number, stack in enumerate(stacks) for slot in stack.slots()]


def _segmentations(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    presentations: Presentations,
) -> list[Segmentation]:
    stacks = _stacks(card, images)
    ordered, samples, outputs = _inferred(card, images, runtime, times, presentations, stacks)
    started = time.perf_counter()
    maps = {
        id(ds): mask_maps(card, outputs, index, geometry)
        for index, (ds, (_, geometry)) in enumerate(zip(ordered, samples, strict=True))
    }
    result = []
    for group in (group for stack in stacks for group in _seg_groups(stack)):
        frames = [maps[id(ds)] for ds in group]
        segments = [
            Segment(
                concept=label.concept,
                probabilities=np.stack([frame[label.index] for frame in frames]),
                threshold=label.threshold,
            )
            for label in card.labels
        ]
        result.append(Segmentation(sources=group, segments=segments))
    times.add("postprocess", started)
    return result


def _seg_groups(stack: Stack) -> list[list[Dataset]]:
    """The images of a stack that one SEG covers: the whole stack where its images lie in a
    patient coordinate system (a CT volume), else each image on its own (projection
    radiographs, e.g. a PA and its retake: a SEG of several images needs their geometry).
    A SEG has one orientation: slices whose Image Orientation (Patient) is not the first's by
    ``same_orientation`` (the stacking predicate; values that differ by rounding are one) get
    a SEG of their own."""
    if not (stack.volume and all("FrameOfReferenceUID" in ds for ds in stack.images)):
        return [[ds] for ds in stack.images]
    groups: list[list[Dataset]] = []
    for ds in stack.images:
        for group in groups:
            if same_orientation(group[0].ImageOrientationPatient, ds.ImageOrientationPatient):
                group.append(ds)
                break
        else:
            groups.append([ds])
    return groups


def _derived(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    presentations: Presentations,
) -> list[DerivedImage]:
    images, samples, outputs = _inferred(card, images, runtime, times, presentations)
    started = time.perf_counter()
    derived = [
        DerivedImage(
            source=ds,
            pixels=apply_correction(
                ds, image_correction(card, outputs, index, geometry, sample), card.input
            ),
            derivation=card.model.description.split(".")[0] or card.model.name,
        )
        for index, (ds, (sample, geometry)) in enumerate(zip(images, samples, strict=True))
    ]
    times.add("postprocess", started)
    return derived


def _mean_heatmap(findings: list[Finding]) -> np.ndarray:
    """The ensemble's heat map: the mean of its members' maps, normalised again."""
    for finding in findings:
        finding.resolve_heatmap()
    # Summed in place: the mean of a list stacks the (source-sized) maps into a new array.
    total = np.array(findings[0].heatmap, dtype=np.float32)
    for finding in findings[1:]:
        total += finding.heatmap
    return normalise_map(total)


def _ensemble(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    members: dict[str, ModelCard],
    presentations: Presentations,
) -> list[ImageFindings]:
    assert card.ensemble is not None
    missing = [name for name in card.ensemble.members if name not in members]
    if missing:
        raise ValueError(f"{card.model.name}: ensemble members without a card: {missing}")
    # By source: a member with 2.5D input sees the images in slice order, without any left
    # out of its stacks.
    runs = [
        {
            id(evaluation.source): evaluation
            for evaluation in _per_image(
                members[name], images, runtime, times, classification_findings, presentations
            )
        }
        for name in card.ensemble.members
    ]
    evaluations = []
    for ds in images:
        if not all(id(ds) in run for run in runs):
            continue
        findings = []
        for label in card.labels:
            member_findings = [
                next(f for f in run[id(ds)].findings if f.concept.value == label.code_value)
                for run in runs
            ]
            mapped = all(
                f.heatmap is not None or f.deferred_heatmap is not None for f in member_findings
            )
            findings.append(
                Finding(
                    concept=label.concept,
                    probability=float(np.mean([f.probability for f in member_findings])),
                    threshold=label.threshold,
                    critical=label.critical,
                    deferred_heatmap=(
                        functools.partial(_mean_heatmap, member_findings) if mapped else None
                    ),
                )
            )
        evaluations.append(ImageFindings(ds, findings))
    return evaluations


def run_model(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    members: dict[str, ModelCard] | None = None,
    presentations: Presentations | None = None,
    defer_heatmaps: bool = False,
) -> ModelRun:
    """Everything ``card`` finds on ``images`` (the study's images its rules selected).
    ``members``: cards by model name (ensembles); ``presentations``: shared by the models of a
    study so that each image is windowed once per window setting; ``defer_heatmaps``: leave
    the heat maps' resampling to the source until :meth:`ModelRun.resolve_heatmaps` (the
    result objects call it)."""
    run = ModelRun(card.algorithm)
    task = card.model.task
    shared = presentations if presentations is not None else Presentations()
    if task in ("classification", "multi-label"):
        run.images = _per_image(card, images, runtime, times, classification_findings, shared)
    elif task == "ensemble":
        run.images = _ensemble(card, images, runtime, times, members or {}, shared)
    elif task == "detection" and card.input.slices > 1:
        stacks = _stacks(card, images)
        run.images = _per_image(card, images, runtime, times, detection_findings, shared, stacks)
        run.images = merge_across_slices(run.images, places=_places(stacks))
    elif task == "detection":
        run.images = _per_image(card, images, runtime, times, detection_findings, shared)
    elif task == "landmark":
        run.images = _per_image(card, images, runtime, times, landmark_findings, shared)
    elif task == "segmentation":
        run.segmentations = _segmentations(card, images, runtime, times, shared)
    elif task == "image-to-image":
        run.derived = _derived(card, images, runtime, times, shared)
    else:  # pragma: no cover - the card schema admits no other task
        raise ValueError(f"{card.model.name}: unknown task {task}")
    if not defer_heatmaps:
        started = time.perf_counter()
        run.resolve_heatmaps()
        times.add("postprocess", started)
    return run
