"""What a chest X-ray phantom can be asked for: findings, views, modalities, photometrics.

No numpy here: the ``synth cxr`` command line checks its options against these names before
the renderer is imported.
"""

from __future__ import annotations

FINDINGS: tuple[str, ...] = (
    "pneumothorax",
    "effusion",
    "consolidation",
    "cardiomegaly",
    "edema",
    "nodule",
    "tuberculosis",
    "tube",
)
VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL")
MODALITIES: tuple[str, ...] = ("DX", "CR")
PHOTOMETRICS: tuple[str, ...] = ("MONOCHROME2", "MONOCHROME1")
