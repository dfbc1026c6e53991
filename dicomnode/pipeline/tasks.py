"""Run one model card on a study's images: the per-task steps from DICOM to a ModelRun.

Classification, multi-label and ensembles give per-image probabilities (and CAM heat maps);
detection gives boxes (2-D, or per slice from 2.5D stacks, merged across adjacent slices);
landmark gives points; segmentation gives per-series segments; image-to-image gives derived
images. Inference runs through the shared Runtime in batches.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
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
from dicomnode.pipeline.postprocess import (
    classification_findings,
    detection_findings,
    image_correction,
    landmark_findings,
    mask_maps,
    normalise_map,
)
from dicomnode.pipeline.preprocess import (
    Letterbox,
    Presentation,
    apply_correction,
    prepare_input,
    prepare_stack,
    presentation_pixels,
)
from dicomnode.pipeline.series import neighbours, series_in_order

if TYPE_CHECKING:
    from dicomnode.pipeline.analyse import StageTimes
    from dicomnode.pipeline.runtime import Runtime

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
    """Run prepared samples through the model in batches; outputs concatenated along N."""
    started = time.perf_counter()
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(samples), MAX_BATCH):
        batch = np.stack([array for array, _ in samples[start : start + MAX_BATCH]])
        for name, value in runtime.run(card, batch).items():
            chunks.setdefault(name, []).append(value)
    times.add("inference", started)
    return {name: np.concatenate(values) for name, values in chunks.items()}


def _prepare_images(
    card: ModelCard, images: list[Dataset], times: StageTimes, presentations: Presentations
) -> list:
    started = time.perf_counter()
    spec = card.input
    if spec.slices == 1:
        samples = [prepare_input(ds, spec, pixels=presentations.get(ds, spec)) for ds in images]
    else:
        samples = []
        for series in series_in_order(images):
            for index in range(len(series)):
                stack = neighbours(series, index, spec.slices)
                pixels = [presentations.get(ds, spec) for ds in stack]
                samples.append(prepare_stack(stack, spec, pixels=pixels))
        images[:] = [ds for series in series_in_order(images) for ds in series]
    times.add("preprocess", started)
    return samples


def _inferred(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    presentations: Presentations,
) -> tuple[list[Dataset], list, dict[str, np.ndarray]]:
    """The images in the order the model saw them (series and slice order for 2.5D), their
    samples (input, letterbox geometry) and the model's outputs."""
    images = list(images)
    samples = _prepare_images(card, images, times, presentations)
    return images, samples, infer(card, samples, runtime, times)


def _per_image(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    postprocess: Postprocess,
    presentations: Presentations,
) -> list[ImageFindings]:
    images, samples, outputs = _inferred(card, images, runtime, times, presentations)
    started = time.perf_counter()
    evaluations = [
        ImageFindings(ds, postprocess(card, outputs, index, geometry))
        for index, (ds, (_, geometry)) in enumerate(zip(images, samples, strict=True))
    ]
    times.add("postprocess", started)
    return evaluations


def merge_across_slices(evaluations: list[ImageFindings], max_gap: int = 1) -> list[ImageFindings]:
    """Keep one box per lesion seen on adjacent slices of a series: a box whose centre lies
    inside a higher-scoring box of the same concept within ``max_gap`` slices is dropped."""
    order = sorted(
        (
            (finding.probability, index, position)
            for index, evaluation in enumerate(evaluations)
            for position, finding in enumerate(evaluation.findings)
            if finding.box is not None
        ),
        reverse=True,
    )
    kept: list[tuple[int, Finding]] = []
    dropped: set[tuple[int, int]] = set()
    for _, index, position in order:
        finding = evaluations[index].findings[position]
        assert finding.box is not None
        col = (finding.box[0] + finding.box[2]) / 2
        row = (finding.box[1] + finding.box[3]) / 2
        for other_index, other in kept:
            box = other.box
            assert box is not None
            if (
                other.concept == finding.concept
                and 0 < abs(other_index - index) <= max_gap
                and box[0] <= col <= box[2]
                and box[1] <= row <= box[3]
                and _same_series(evaluations[index], evaluations[other_index])
            ):
                dropped.add((index, position))
                break
        else:
            kept.append((index, finding))
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


def _same_series(a: ImageFindings, b: ImageFindings) -> bool:
    return a.source.get("SeriesInstanceUID") == b.source.get("SeriesInstanceUID")


def _segmentations(
    card: ModelCard,
    images: list[Dataset],
    runtime: Runtime,
    times: StageTimes,
    presentations: Presentations,
) -> list[Segmentation]:
    ordered = [ds for series in series_in_order(images) for ds in series]
    ordered, samples, outputs = _inferred(card, ordered, runtime, times, presentations)
    started = time.perf_counter()
    maps = [
        mask_maps(card, outputs, index, geometry) for index, (_, geometry) in enumerate(samples)
    ]
    result = []
    offset = 0
    for group in (group for series in series_in_order(ordered) for group in _seg_groups(series)):
        frames = maps[offset : offset + len(group)]
        offset += len(group)
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


def _seg_groups(series: list[Dataset]) -> list[list[Dataset]]:
    """The images of a series that one SEG covers: the whole series where its images lie in
    a patient coordinate system (a CT volume), else each image on its own (projection
    radiographs, e.g. a PA and its retake: a SEG of several images needs their geometry)."""
    if all("FrameOfReferenceUID" in ds and "ImagePositionPatient" in ds for ds in series):
        return [list(series)]
    return [[ds] for ds in series]


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
    runs = [
        _per_image(members[name], images, runtime, times, classification_findings, presentations)
        for name in card.ensemble.members
    ]
    evaluations = []
    for index, ds in enumerate(images):
        findings = []
        for label in card.labels:
            member_findings = [
                next(f for f in run[index].findings if f.concept.value == label.code_value)
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
    elif task == "detection":
        run.images = _per_image(card, images, runtime, times, detection_findings, shared)
        if card.input.slices > 1:
            run.images = merge_across_slices(run.images)
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
