"""Typed values passed between the pipeline, the result writers and the worklist."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CodedConcept:
    """A coded finding, e.g. SNOMED CT 36118008 "Pneumothorax"."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Algorithm:
    """The model that produced a result; becomes the SR device observer and SEG algorithm."""

    name: str
    version: str
    manufacturer: str = "dicomnode"
    research_demo: bool = True


@dataclass
class Finding:
    """One label of one model on one image: probability, decision and where it is."""

    concept: CodedConcept
    probability: float
    threshold: float
    critical: bool
    # Peak of the class-activation map in source-image pixel coordinates (column, row), as
    # array indexes (the pixel's centre); SCOORD adds 0.5 since its top-left centre is 0.5.
    peak: tuple[float, float] | None = None
    # Class-activation heat map resampled to the source image (rows x columns, 0..1).
    heatmap: np.ndarray | None = field(default=None, repr=False)
    # Detection: (col0, row0, col1, row1) in source pixels, half-open (col1/row1 exclusive).
    box: tuple[float, float, float, float] | None = None
    # Landmark (e.g. tube tip): (column, row) in source pixels, array-index convention.
    point: tuple[float, float] | None = None
    # Computes ``heatmap`` (and sets ``peak``) when :meth:`resolve_heatmap` is called: the
    # resampling to the source (~25 ms per label at 2048 px) is left until the result objects
    # need it, after the priority is committed.
    deferred_heatmap: Callable[[], np.ndarray] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold

    def resolve_heatmap(self) -> None:
        """Compute a deferred heat map now, and its peak (the first maximum)."""
        if self.deferred_heatmap is None:
            return
        heatmap = self.deferred_heatmap()
        self.deferred_heatmap = None
        self.heatmap = heatmap
        row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        self.peak = (float(col), float(row))


@dataclass
class ImageFindings:
    """The findings of one model on one source image (a pydicom Dataset)."""

    source: object  # pydicom.Dataset; typed loosely to keep this module free of I/O imports
    findings: list[Finding]


@dataclass
class Segment:
    """One segment of a segmentation: probabilities 0..1 over the source frames."""

    concept: CodedConcept
    # (frames, rows, columns), one frame per source image in ``Segmentation.sources`` order.
    probabilities: np.ndarray = field(repr=False)
    threshold: float = 0.5

    @property
    def mask(self) -> np.ndarray:
        return self.probabilities >= self.threshold


@dataclass
class Segmentation:
    """The segments of one model on one series (one 2-D image or the slices of a CT)."""

    sources: list  # pydicom Datasets, in frame order (slice position for CT)
    segments: list[Segment]


@dataclass
class DerivedImage:
    """An image-to-image model's output for one source image (e.g. bone suppression)."""

    source: object  # pydicom.Dataset
    # Rows x columns in the source's stored-value range (same Bits Stored, photometric).
    pixels: np.ndarray = field(repr=False)
    # Short description of the derivation, e.g. "bone suppression".
    derivation: str = ""


@dataclass
class ModelRun:
    """Everything one model produced on one study, ready for the result writers."""

    algorithm: Algorithm
    images: list[ImageFindings] = field(default_factory=list)
    segmentations: list[Segmentation] = field(default_factory=list)
    derived: list[DerivedImage] = field(default_factory=list)

    def resolve_heatmaps(self, present_only: bool = False) -> None:
        """Compute the deferred heat maps of the run's findings (``present_only``: of its
        present findings, the only ones the result objects localise)."""
        for evaluation in self.images:
            for finding in evaluation.findings:
                if finding.present or not present_only:
                    finding.resolve_heatmap()


def probability_text(probability: float) -> str:
    """A model's probability as people read it: a whole percentage, but "<1%" and ">99%" near
    the ends, so that no model output reads as certain (0% or 100%) unless it is exactly that.
    The worklist's reasons, the study page, the worklist page (its script mirrors this) and the
    text in overlays and presentation states use it; the API keeps the raw number."""
    if 0.0 < probability < 0.01:
        return "<1%"
    if 0.99 < probability < 1.0:
        return ">99%"
    return f"{probability:.0%}"
