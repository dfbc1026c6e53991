"""Which DICOM result objects a model run becomes (per the card's [results] produce).

Pure apart from the result builders: ModelRun in, (kind, Dataset) pairs out; a builder that
raises leaves out its object only, when the caller says what to do with the error.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from pydicom import Dataset

from dicomnode.findings import Finding, ImageFindings, ModelRun
from dicomnode.models.registry import ModelCard


def _reported(run: ModelRun, card: ModelCard) -> list[ImageFindings]:
    """The image evaluations an SR reports: every image for classification-type tasks; for
    detection and landmarks the images with something found, else one absent finding per label
    (its highest score, on the first image) so that "nothing found" is reported too."""
    if card.model.task not in ("detection", "landmark"):
        return run.images
    found = _drawn(run, card)
    if found or not run.images:
        return found
    absent = [
        Finding(
            concept=label.concept,
            probability=max(
                (
                    f.probability
                    for e in run.images
                    for f in e.findings
                    if f.concept == label.concept
                ),
                default=0.0,
            ),
            threshold=label.threshold,
            critical=label.critical,
        )
        for label in card.labels
    ]
    return [ImageFindings(run.images[0].source, absent)]


def _drawn(run: ModelRun, card: ModelCard) -> list[ImageFindings]:
    """Images that get an overlay: all for classification-type tasks (their heat maps and
    legend), otherwise those with a present box or point."""
    if card.model.task not in ("detection", "landmark"):
        return run.images
    return [
        ImageFindings(e.source, [f for f in e.findings if f.present])
        for e in run.images
        if any(f.present for f in e.findings)
    ]


def critical_sources(run: ModelRun) -> list[Dataset]:
    """Source images with a present critical finding (for the Key Object Selection)."""
    return [e.source for e in run.images if any(f.present and f.critical for f in e.findings)]


def result_objects(
    run: ModelRun, card: ModelCard, failed: Callable[[str, Exception], None] | None = None
) -> list[tuple[str, Dataset]]:
    """The result objects of ``run`` the card asks for, KOS last (it references the others).

    ``failed``: called with the kind and the error of each object whose builder raises, and
    that object is left out (the KOS then references the others); it may raise itself to end
    the building. Without it the first builder that raises ends the building.
    """
    from dicomnode.results import derived, gsps, kos, overlay, seg, sr

    def build(kind: str, builder: Callable[[], Dataset]) -> None:
        if failed is None:
            objects.append((kind, builder()))
            return
        try:
            objects.append((kind, builder()))
        except Exception as error:
            failed(kind, error)

    # Only present findings are localised (heat map on the overlay, CAM peak in the SR): an
    # absent finding's map would mislead, and is not resampled at all.
    run.resolve_heatmaps(present_only=True)
    produces = set(card.produces)
    objects: list[tuple[str, Dataset]] = []
    reported = _reported(run, card)
    if "sr" in produces and reported and any(e.findings for e in reported):
        build("sr", lambda: sr.build_sr(reported, run.algorithm))
    if "overlay" in produces:
        for evaluation in _drawn(run, card):
            build(
                "overlay",
                partial(overlay.build_overlay, evaluation, run.algorithm, window=card.input.window),
            )
        for segmentation in run.segmentations:
            if len(segmentation.sources) == 1:  # a radiograph: outlines on a copy of it
                masks = {s.concept.meaning: s.mask[0] for s in segmentation.segments}
                empty = ImageFindings(segmentation.sources[0], [])
                build(
                    "overlay",
                    partial(
                        overlay.build_overlay,
                        empty,
                        run.algorithm,
                        masks,
                        window=card.input.window,
                    ),
                )
    if "gsps" in produces:
        for evaluation in _drawn(run, card):
            # A presentation state applies to a greyscale image only.
            greyscale = int(evaluation.source.get("SamplesPerPixel", 1) or 1) == 1
            if greyscale and any(
                f.box is not None or f.point is not None for f in evaluation.findings
            ):
                build(
                    "gsps",
                    partial(gsps.build_gsps, evaluation, run.algorithm, window=card.input.window),
                )
    if "seg" in produces:
        for number, segmentation in enumerate(run.segmentations, start=1):
            build(
                "seg",
                partial(
                    seg.build_seg,
                    segmentation,
                    run.algorithm,
                    fractional=card.results.fractional,
                    instance_number=number,
                ),
            )
    if "derived" in produces:
        for image in run.derived:
            build("derived", partial(derived.build_derived, image, run.algorithm))
    critical = critical_sources(run)
    if "kos" in produces and critical:
        others = [ds for _, ds in objects]
        build("kos", lambda: kos.build_kos(critical, run.algorithm, others))
    return objects
