"""Typed values passed between the pipeline, the result writers and the worklist."""

from __future__ import annotations

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

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass
class ImageFindings:
    """The findings of one model on one source image (a pydicom Dataset)."""

    source: object  # pydicom.Dataset; typed loosely to keep this module free of I/O imports
    findings: list[Finding]
