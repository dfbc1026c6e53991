"""Synthetic chest radiographs (phantoms) with known findings, as DX or CR DICOM.

``make_cxr`` renders one phantom in memory (for in-process training); ``write_dataset`` writes a
folder of them with ground truth beside (see ``dicomnode.synth.truth`` for the file schema).

Views: PA, AP (magnified heart, higher domes, scapulae over the lungs, ECG electrodes) and LATERAL
(sternum in front, spine behind, heart, both domes). Findings: ``FINDINGS``. Rendering is numpy
only and deterministic per seed. A plain PA DX 12-bit phantom without other findings is
byte-identical to the original renderer for a seed (the committed pneumothorax model was trained
on it); everything newer draws from separate random streams.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.synth import cxr_findings
from dicomnode.synth.cxr_anatomy import (
    Collapse,
    Scene,
    Thorax,
    render_frontal,
    render_lateral,
)
from dicomnode.synth.cxr_dicom import (
    CR_IMAGE,
    DETECTOR_MM,
    DX_FOR_PRESENTATION,
    TRANSFER_SYNTAXES,
    check_encoding,
    chest_dataset,
    encode,
    pixel_pitch,
    uid,
)
from dicomnode.synth.cxr_names import FINDINGS, MODALITIES, PHOTOMETRICS, VIEWS
from dicomnode.synth.cxr_raster import box_of, smooth_field
from dicomnode.synth.header import MANUFACTURER

__all__ = [
    "CR_IMAGE",
    "DETECTOR_MM",
    "DX_FOR_PRESENTATION",
    "FINDINGS",
    "MANUFACTURER",
    "TRANSFER_SYNTAXES",
    "VIEWS",
    "CxrTruth",
    "make_cxr",
    "random_findings",
    "write_dataset",
]

BITS_STORED = 12
MAX_VALUE = 2**BITS_STORED - 1


@dataclass(frozen=True)
class CxrTruth:
    """Ground truth of one phantom, independent of the DICOM file.

    ``side`` is the pneumothorax's patient side ('R' is image left on a frontal view). Boxes are
    (row0, col0, row1, col1) in source pixels, half-open (row1/col1 exclusive); ``box`` is the
    pneumothorax's. ``labels`` has every name of ``FINDINGS``. ``masks`` are boolean on the
    source pixel grid: "lung" (both lungs: the aerated lung fields within the pleura, pleural
    fluid excluded), "heart", and one per present finding region. ``landmarks`` are (row, col)
    source pixels ("tube_tip" when a tube is present). ``soft_tissue`` is the same image without
    bones (ribs, clavicles, scapulae, spine, sternum) in the stored-value scale and photometric of
    the DICOM pixels (the bone-suppression target).
    """

    pneumothorax: bool
    side: str | None = None
    box: tuple[int, int, int, int] | None = None
    lung_mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    labels: dict[str, bool] = field(default_factory=dict)
    view: str = "PA"
    masks: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    boxes: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    landmarks: dict[str, tuple[float, float]] = field(default_factory=dict)
    soft_tissue: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.labels:
            labels = dict.fromkeys(FINDINGS, False)
            labels["pneumothorax"] = self.pneumothorax
            object.__setattr__(self, "labels", labels)


def random_findings(rng: np.random.Generator, prevalence: float | Mapping[str, float]) -> set[str]:
    """Findings drawn independently: each of ``FINDINGS`` with its prevalence (0..1).

    ``prevalence`` is one number for all findings or a mapping (missing findings: 0).
    """
    chosen = set()
    for finding in FINDINGS:
        p = prevalence if isinstance(prevalence, int | float) else prevalence.get(finding, 0.0)
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"prevalence of {finding} must be in 0..1, got {p}")
        if rng.random() < float(p):
            chosen.add(finding)
    return chosen


@dataclass(frozen=True)
class _Exposure:
    """Exposure, detector noise and quantisation drawn once, applied to any attenuation image."""

    bias: np.ndarray
    noise: np.ndarray
    low: float
    high: float
    gamma: float
    percentiles: tuple[float, float]

    @classmethod
    def draw(cls, rng: np.random.Generator, shape: tuple[int, int]) -> _Exposure:
        bias = rng.uniform(0.0, 0.06) * smooth_field(rng, shape, 3)
        gradient_cols = np.linspace(-1, 1, shape[1], dtype=np.float32)
        gradient_rows = np.linspace(-1, 1, shape[0], dtype=np.float32)
        bias += (
            rng.uniform(-0.04, 0.04) * gradient_cols[None, :]
            + rng.uniform(-0.04, 0.04) * gradient_rows[:, None]
        )
        noise = rng.uniform(0.006, 0.02) * rng.standard_normal(shape).astype(np.float32)
        low, high = rng.uniform(0.03, 0.2), rng.uniform(0.72, 0.98)
        gamma = rng.uniform(0.8, 1.25)
        percentiles = (rng.uniform(0.5, 3.0), rng.uniform(97.0, 99.8))
        return cls(bias, noise, low, high, gamma, percentiles)

    def stored(self, attenuation: np.ndarray, max_value: int) -> np.ndarray:
        """MONOCHROME2 stored values (uint16) of ``attenuation``."""
        signal = np.clip((attenuation + self.bias + self.noise + 0.12) / 0.95, 0.0, 1.0)
        scaled = (self.low + (self.high - self.low) * signal**self.gamma) * max_value
        return np.round(scaled).astype(np.uint16)

    def window(self, pixels: np.ndarray, max_value: int) -> tuple[float, float]:
        """Window centre and width around the drawn percentiles of ``pixels``."""
        p_low, p_high = np.percentile(pixels, list(self.percentiles))
        width = max(float(p_high - p_low), 64.0 * max_value / MAX_VALUE)
        return float((p_low + p_high) / 2.0), width


def _check(view: str, modality: str, bits: int, photometric: str, transfer_syntax: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, not {view!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    check_encoding(bits, transfer_syntax)


def _render(
    seed: int, chosen: set[str], view: str, shape: tuple[int, int]
) -> tuple[Scene, str | None, np.random.Generator]:
    """The scene of one phantom, the pneumothorax side ('R' or 'L') and the anatomy's stream.

    The exposure continues the anatomy's random stream, as in the original renderer.
    """
    rng = np.random.default_rng([seed, 1])
    # Newer randomness has its own streams, so that adding a finding changes only that finding.
    view_rng = np.random.default_rng([seed, 2])
    findings_rng = np.random.default_rng([seed, 3])
    heart_rng = np.random.default_rng([seed, 4]) if "cardiomegaly" in chosen else None
    side = None
    collapse = None
    if "pneumothorax" in chosen:
        # Skewed towards small (apical) pneumothoraces, the ones that are easy to miss.
        extent = rng.uniform(0.0, 1.0) ** 2
        side_index = int(rng.integers(0, 2))
        side = "R" if side_index == 0 else "L"
        collapse = Collapse(
            side=side_index,
            scale_y=1.0 - (0.035 + 0.33 * extent) * rng.uniform(0.85, 1.15),
            scale_x=1.0 - (0.015 + 0.4 * extent) * rng.uniform(0.8, 1.2),
        )
    painted = chosen & set(cxr_findings.PAINTED)
    painter = None
    if painted:
        pitch = pixel_pitch(shape)

        def painter(thorax: Thorax) -> cxr_findings.Layers:
            return cxr_findings.paint(findings_rng, painted, thorax, pitch)

    if view == "LATERAL":
        scene = render_lateral(
            rng,
            shape,
            cardiomegaly="cardiomegaly" in chosen,
            pneumothorax_side=None if collapse is None else collapse.side,
            painter=painter,
        )
    else:
        scene = render_frontal(
            rng,
            shape,
            collapse,
            view=view,
            extra_rng=view_rng,
            cardiomegaly=heart_rng,
            painter=painter,
        )
    return scene, side, rng


def make_cxr(
    seed: int,
    *,
    pneumothorax: bool = False,
    findings: Collection[str] = (),
    view: str = "PA",
    modality: str = "DX",
    bits: int = BITS_STORED,
    size: int = 512,
    columns: int | None = None,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = "explicit",
    patient_id: str | None = None,
    accession_number: str | None = None,
    study_instance_uid: str | None = None,
) -> tuple[pydicom.Dataset, CxrTruth]:
    """A synthetic chest radiograph and its ground truth.

    ``size`` is the number of rows, ``columns`` the number of columns (default: square).
    ``pneumothorax=True`` is the same as "pneumothorax" in ``findings``.
    """
    rows = size
    cols = size if columns is None else columns
    if min(rows, cols) < 64:
        raise ValueError(f"phantom size must be at least 64 pixels, got {rows} x {cols}")
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; known: {', '.join(FINDINGS)}")
    _check(view, modality, bits, photometric, transfer_syntax)
    chosen = set(findings) | ({"pneumothorax"} if pneumothorax else set())
    shape = (rows, cols)
    scene, side, rng = _render(seed, chosen, view, shape)
    max_value = 2**bits - 1
    exposure = _Exposure.draw(rng, shape)
    pixels = exposure.stored(scene.attenuation, max_value)
    centre, width = exposure.window(pixels, max_value)
    soft = exposure.stored(scene.attenuation - scene.bones, max_value)
    if photometric == "MONOCHROME1":
        soft = (max_value - soft.astype(np.int64)).astype(np.uint16)
    study_uid = study_instance_uid or uid(str(seed), "study")
    ds = chest_dataset(
        seed,
        pixels,
        centre,
        width,
        bits=bits,
        photometric=photometric,
        modality=modality,
        view=view,
        patient_id=patient_id or f"PH{seed:08d}",
        accession_number=accession_number or f"ACC{seed:08d}",
        study_instance_uid=study_uid,
    )
    encode(ds, transfer_syntax)
    return ds, _truth(scene, chosen, side, view, soft)


def _truth(
    scene: Scene, chosen: set[str], side: str | None, view: str, soft: np.ndarray
) -> CxrTruth:
    layers = scene.layers
    lung = scene.lung > 0.5
    masks: dict[str, np.ndarray] = {}
    for name, region in layers.masks.items():
        masks[name] = region > 0.5
    if "effusion" in masks:
        lung = lung & ~masks["effusion"]
    heart = scene.heart > 0.5
    masks["lung"] = lung
    masks["heart"] = heart
    if "cardiomegaly" in chosen:
        masks["cardiomegaly"] = heart
    ptx_box = None
    boxes: list[tuple[str, tuple[int, int, int, int]]] = []
    if scene.pneumothorax is not None:
        ptx = scene.pneumothorax > 0.5
        masks["pneumothorax"] = ptx
        ptx_box = box_of(ptx)
        if ptx_box is not None:
            boxes.append(("pneumothorax", ptx_box))
    for name, region in layers.boxes:
        box = box_of(region)
        if box is not None:
            boxes.append((name, box))
    labels = {finding: finding in chosen for finding in FINDINGS}
    return CxrTruth(
        pneumothorax="pneumothorax" in chosen,
        side=side,
        box=ptx_box,
        lung_mask=scene.lung > 0.5,
        labels=labels,
        view=view,
        masks=masks,
        boxes=boxes,
        landmarks=dict(layers.landmarks),
        soft_tissue=soft,
    )


def write_dataset(
    out: Path,
    n: int,
    seed: int,
    pneumothorax_fraction: float = 0.5,
    size: int = 512,
    progress: bool = False,
    **options: object,
) -> Path:
    """Write ``n`` phantoms (seeds ``seed``..``seed+n-1``) with ground truth; return the CSV.

    See ``dicomnode.synth.truth.write_dataset`` for the options.
    """
    from dicomnode.synth.truth import write_dataset as write

    return write(
        Path(out),
        n=n,
        seed=seed,
        pneumothorax_fraction=pneumothorax_fraction,
        size=size,
        progress=progress,
        **options,  # type: ignore[arg-type]
    )
