"""Synthetic PA chest radiographs (phantoms) with or without a pneumothorax, as DX DICOM.

The phantom is built in a normalised patient frame (x, y in about -1..1; y grows towards the
feet; image left is the patient's right, as a PA chest is read) and rendered with numpy only.
A pneumothorax is drawn the way a radiologist recognises it: a rim of pleural air at the apex
and the lateral chest wall with no lung markings, bounded by a thin visceral pleural line, and
the lung with its markings collapsed towards the hilum.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MANUFACTURER = "dicomnode synth"
BITS_STORED = 12
MAX_VALUE = 2**BITS_STORED - 1
# Detector pixel pitch in mm for a 512 px image of a 43 cm detector; scaled with ``size``.
DETECTOR_MM = 430.0

_UID_NAMESPACE = "dicomnode/synth/cxr/v1"


@dataclass(frozen=True)
class CxrTruth:
    """Ground truth of one phantom, independent of the DICOM file.

    ``side`` is the patient's side ('R' is image left on a PA view). ``box`` is
    (row0, col0, row1, col1) in pixels, half-open (row1/col1 exclusive).
    """

    pneumothorax: bool
    side: str | None = None
    box: tuple[int, int, int, int] | None = None
    lung_mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _Anatomy:
    """Random per-patient anatomy in the normalised frame."""

    lung_width: float
    apex_y: float
    dome_y: tuple[float, float]  # patient right (image left), patient left
    costophrenic_drop: float
    mediastinum: float
    heart: tuple[float, float, float, float]  # centre x, centre y, radius x, radius y
    body_width: float
    rib_origin: float
    rib_spacing: float
    clavicle_y: float


def _uid(*parts: str) -> str:
    # JSON keeps part boundaries so that ("1", "23") and ("12", "3") differ.
    return str(generate_uid(entropy_srcs=[json.dumps([_UID_NAMESPACE, *parts])]))


def _ramp(value: np.ndarray, width: float) -> np.ndarray:
    """Soft 0..1 step of a signed margin (positive inside) over ``width``."""
    return np.clip(value / width + 0.5, 0.0, 1.0)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur by shifted sums (small sigmas only; edges replicated)."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = image
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        length = out.shape[axis]
        acc = np.zeros_like(out)
        for k, weight in enumerate(taps):
            acc += weight * (padded[k : k + length] if axis == 0 else padded[:, k : k + length])
        out = acc
    return out


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency random field in -1..1: a coarse grid upsampled bilinearly."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    pos = np.linspace(0.0, cells, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(int), cells - 1)
    frac = pos - i0
    rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def _sample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear sample of ``image`` at float pixel coordinates (clamped at the border)."""
    h, w = image.shape
    rows = np.clip(rows, 0, h - 1.001)
    cols = np.clip(cols, 0, w - 1.001)
    r0 = rows.astype(np.int32)
    c0 = cols.astype(np.int32)
    fr = rows - r0
    fc = cols - c0
    top = image[r0, c0] * (1 - fc) + image[r0, c0 + 1] * fc
    bottom = image[r0 + 1, c0] * (1 - fc) + image[r0 + 1, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def _splat(size: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Accumulate weighted points into an image with bilinear weights."""
    keep = (rows >= 0) & (rows < size - 1) & (cols >= 0) & (cols < size - 1)
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    r0 = rows.astype(np.int64)
    c0 = cols.astype(np.int64)
    fr = rows - r0
    fc = cols - c0
    flat = np.zeros(size * size, dtype=np.float64)
    for dr, dc, wgt in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        flat += np.bincount((r0 + dr) * size + c0 + dc, weights * wgt, minlength=size * size)
    return flat.reshape(size, size).astype(np.float32)


class _Frame:
    """Affine map between pixel coordinates and the normalised patient frame."""

    def __init__(self, size: int, scale: float, angle: float, shift: tuple[float, float]):
        self.size = size
        self.half = size / 2.0
        self.centre = (size - 1) / 2.0
        self.scale = scale
        self.cos = math.cos(angle)
        self.sin = math.sin(angle)
        self.shift = shift

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (x, y) of every pixel centre."""
        axis = (np.arange(self.size, dtype=np.float32) - self.centre) / self.half
        px = axis[None, :] - self.shift[0]
        py = axis[:, None] - self.shift[1]
        x = (self.cos * px + self.sin * py) / self.scale
        y = (-self.sin * px + self.cos * py) / self.scale
        return x.astype(np.float32), y.astype(np.float32)

    def to_pixel(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (row, col) of normalised points."""
        sx, sy = x * self.scale, y * self.scale
        px = self.cos * sx - self.sin * sy + self.shift[0]
        py = self.sin * sx + self.cos * sy + self.shift[1]
        return py * self.half + self.centre, px * self.half + self.centre


def _random_anatomy(rng: np.random.Generator) -> _Anatomy:
    dome_right = rng.uniform(0.20, 0.34)
    return _Anatomy(
        lung_width=rng.uniform(0.70, 0.80),
        apex_y=rng.uniform(-0.80, -0.68),
        dome_y=(dome_right, dome_right + rng.uniform(0.02, 0.09)),
        costophrenic_drop=rng.uniform(0.16, 0.26),
        mediastinum=rng.uniform(0.08, 0.12),
        heart=(
            rng.uniform(0.09, 0.16),
            rng.uniform(0.17, 0.27),
            rng.uniform(0.23, 0.33),
            rng.uniform(0.19, 0.26),
        ),
        body_width=rng.uniform(0.86, 0.95),
        rib_origin=rng.uniform(-0.86, -0.78),
        rib_spacing=rng.uniform(0.105, 0.13),
        clavicle_y=rng.uniform(-0.72, -0.62),
    )


def _lung_margins(a: _Anatomy, side: int, u: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    """Signed margins (about a distance, positive inside) of each lung boundary.

    ``side`` 0 is the patient's right lung (image left), 1 the left; ``u`` is the lateral
    distance from the midline on that side.
    """
    dome = a.dome_y[side]
    widest = dome + 0.08
    lateral_curve = (a.lung_width - 0.36) / (widest - a.apex_y) ** 2
    u_out = a.lung_width - lateral_curve * np.maximum(widest - y, 0.0) ** 2
    curvature = a.costophrenic_drop / (a.lung_width - 0.34) ** 2
    hx, hy, rx, ry = a.heart
    heart = np.sqrt(((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2)
    return {
        "lateral": u_out - u,
        "apex": y - (a.apex_y + 3.2 * (u - 0.32) ** 2),
        "medial": u - (a.mediastinum + 0.02 * np.clip(-y - 0.3, 0.0, 1.0)),
        "dome": dome + curvature * (u - 0.34) ** 2 - y,
        "heart": (heart - 1.0) * min(rx, ry),
    }


def _vessel_trees(
    rng: np.random.Generator, a: _Anatomy, frame: _Frame
) -> tuple[np.ndarray, np.ndarray]:
    """Branching pulmonary vessels from both hila, rasterised (thick, thin) in pixel space."""
    size = frame.size
    rows_all, cols_all, weights_all, thick_all = [], [], [], []
    for side in (0, 1):
        sign = -1.0 if side == 0 else 1.0
        n_main = int(rng.integers(10, 14))
        hilum_u = a.mediastinum + rng.uniform(0.06, 0.1)
        hilum_y = rng.uniform(-0.12, 0.05)
        angles = np.linspace(-1.8, 1.5, n_main) + rng.normal(0, 0.1, n_main)
        # Trees start spread over the hilum, not at one point.
        starts_u = hilum_u + 0.04 * np.abs(np.cos(angles)) + rng.normal(0, 0.01, n_main)
        starts_y = hilum_y + 0.07 * np.sin(angles) + rng.normal(0, 0.02, n_main)
        lengths = rng.uniform(0.08, 0.14, n_main)
        thickness = rng.uniform(0.85, 1.15, n_main)
        for _level in range(8):
            ends_u = starts_u + lengths * np.cos(angles)
            ends_y = starts_y + lengths * np.sin(angles)
            margins = _lung_margins(a, side, ends_u, sign * ends_u, ends_y)
            inside = np.minimum.reduce(list(margins.values())) > -0.01
            steps = np.linspace(0.0, 1.0, 12, dtype=np.float32)
            pu = starts_u[:, None] + (ends_u - starts_u)[:, None] * steps
            py = starts_y[:, None] + (ends_y - starts_y)[:, None] * steps
            row, col = frame.to_pixel(sign * pu, py)
            seg_px = lengths * frame.half * frame.scale
            density = (seg_px / 11.0)[:, None] * np.ones_like(steps)
            rows_all.append(row.ravel())
            cols_all.append(col.ravel())
            weights_all.append((thickness[:, None] * density).ravel())
            thick_all.append(np.repeat(thickness, steps.size))
            keep = inside & (thickness > 0.1)
            n = int(keep.sum())
            if n == 0:
                break
            spread = rng.uniform(0.25, 0.6, (n, 2))
            starts_u = np.repeat(ends_u[keep], 2)
            starts_y = np.repeat(ends_y[keep], 2)
            angles = np.repeat(angles[keep], 2) + (spread * [-1.0, 1.0]).ravel()
            angles += rng.normal(0, 0.08, angles.size)
            lengths = np.repeat(lengths[keep], 2) * rng.uniform(0.68, 0.86, 2 * n)
            thickness = np.repeat(thickness[keep], 2) * rng.uniform(0.62, 0.78, 2 * n)
    rows = np.concatenate(rows_all)
    cols = np.concatenate(cols_all)
    weights = np.concatenate(weights_all)
    thick = np.concatenate(thick_all)
    px = size / 512.0
    big = thick > 0.4
    thick_img = _splat(size, rows[big], cols[big], weights[big])
    thin_img = _splat(size, rows[~big], cols[~big], weights[~big])
    thick_img = _gaussian_blur(thick_img, 1.8 * px) * (4.0 * px)
    thin_img = _gaussian_blur(thin_img, max(0.6, 0.9 * px)) * (2.2 * px)
    return thick_img, thin_img


def _bands(phase: np.ndarray, width: float) -> np.ndarray:
    """Bone bands with brighter cortical edges at the integer steps of ``phase``."""
    t = phase - np.floor(phase)
    inside = _ramp(np.minimum(t, width - t), 0.06)
    edge = np.exp(-(((np.minimum(t, np.abs(width - t))) / 0.06) ** 2))
    return inside * 0.75 + 0.35 * edge * inside


def _ribs(a: _Anatomy, side: int, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Posterior and anterior rib arcs of one side (lateral coordinate ``u``)."""
    # Posterior ribs rise slightly from the spine, then turn down along the chest wall.
    posterior_curve = y - (a.rib_origin - 0.12 * u + 0.85 * u**2)
    phase = posterior_curve / a.rib_spacing
    posterior = _bands(phase, 0.36) * (phase > 0) * (phase < 10.4)
    posterior *= _ramp(u - 0.06, 0.03) * _ramp(a.lung_width + 0.08 - u, 0.06)
    # Anterior ribs run down and medially from the chest wall; their cartilage is invisible.
    anterior_curve = y - (a.rib_origin + 0.12 + 0.45 * (a.lung_width + 0.05 - u))
    phase_a = anterior_curve / (1.3 * a.rib_spacing)
    anterior = _bands(phase_a, 0.3) * (phase_a > 0) * (phase_a < 6.4)
    anterior *= _ramp(u - 0.25, 0.15) * _ramp(a.lung_width + 0.06 - u, 0.06)
    below = _ramp(a.dome_y[side] + a.costophrenic_drop + 0.12 - y, 0.12)
    return (posterior + 0.4 * anterior) * below


def _clavicle(a: _Anatomy, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    centre = a.clavicle_y + 0.04 - 0.2 * (u - 0.08) + 0.22 * (u - 0.3) ** 2
    band = _ramp(0.028 - np.abs(y - centre), 0.014)
    return band * _ramp(u - 0.07, 0.02) * _ramp(0.58 - u, 0.05)


@dataclass(frozen=True)
class _Collapse:
    """A pneumothorax: the lung of ``side`` shrunk towards its medial base."""

    side: int
    scale_y: float
    scale_x: float


def _render(
    rng: np.random.Generator, size: int, collapse: _Collapse | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Attenuation image, lung mask and pneumothorax mask (soft, 0..1)."""
    a = _random_anatomy(rng)
    frame = _Frame(
        size,
        scale=rng.uniform(0.88, 1.04),
        angle=math.radians(rng.uniform(-4.0, 4.0)),
        shift=(rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.06)),
    )
    x, y = frame.grid()
    edge = 2.5 / frame.half  # soft edges of about 2.5 pixels

    # Soft-tissue envelope: thickness of an elliptical trunk, narrowing to the neck.
    body_half = 0.24 + (a.body_width - 0.24) * np.clip((y + 0.98) / 0.32, 0.0, 1.0) ** 0.6
    body = _ramp(body_half - np.abs(x), edge * 2)
    thickness = np.sqrt(np.clip(1.0 - (x / body_half) ** 2, 0.0, 1.0))
    attenuation = 0.55 * thickness * body

    thick_vessels, thin_vessels = _vessel_trees(rng, a, frame)
    vessels = thick_vessels + thin_vessels
    mottle = _gaussian_blur(rng.standard_normal((size, size)).astype(np.float32), size / 256.0)

    lung_mask = np.zeros((size, size), dtype=np.float32)
    ptx_mask = None
    for side in (0, 1):
        sign = -1.0 if side == 0 else 1.0
        u = sign * x
        half = (u > 0).astype(np.float32)
        m = _lung_margins(a, side, u, x, y)
        margin = np.minimum.reduce(list(m.values()))
        lung = _ramp(margin, edge) * half
        lung_mask += lung
        depth = np.clip(margin / 0.06, 0.0, 1.0) * half
        attenuation -= rng.uniform(0.27, 0.33) * depth
        # Lung markings fade towards the pleura but stay faintly visible in a normal lung.
        fade = 0.35 + 0.65 * np.clip(margin / 0.16, 0.0, 1.0)
        markings = (0.11 * vessels + 0.012 * mottle) * fade
        if collapse is not None and collapse.side == side:
            lung_ptx, markings_ptx, line = _pneumothorax(collapse, a, frame, m, u, x, y, vessels)
            ptx_mask = lung_ptx * lung
            collapsed = lung * (1.0 - lung_ptx)
            attenuation += 0.12 * (1.0 - collapse.scale_x * collapse.scale_y) * collapsed
            attenuation -= rng.uniform(0.0, 0.04) * ptx_mask
            markings = (0.11 * markings_ptx + 0.012 * mottle) * fade * (1.0 - lung_ptx)
            attenuation += rng.uniform(0.03, 0.08) * line * half
        attenuation += markings * lung
        attenuation += rng.uniform(0.04, 0.06) * _ribs(a, side, u, y) * body * half
        attenuation += 0.08 * _clavicle(a, u, y) * half

    hx, hy, rx, ry = a.heart
    heart = _ramp(1.0 - np.sqrt(((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2), 0.05)
    attenuation += 0.04 * heart
    vertebrae = 0.8 + 0.2 * np.cos(2 * np.pi * (y - a.rib_origin) / a.rib_spacing)
    attenuation += 0.09 * _ramp(0.055 - np.abs(x), edge * 2) * vertebrae * body
    # Trachea: an air column in the upper mediastinum down to the carina.
    carina = a.heart[1] - a.heart[3] - 0.12
    trachea = _ramp(0.035 - np.abs(x + 0.01), edge) * _ramp(carina - y, 0.05)
    attenuation -= 0.05 * trachea * body
    if rng.random() < 0.4:
        attenuation += _skin_fold(rng, x, y) * body
    return attenuation, lung_mask, ptx_mask


def _pneumothorax(
    collapse: _Collapse,
    a: _Anatomy,
    frame: _Frame,
    margins: dict,
    u: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    vessels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pleural air (soft mask), the markings of the collapsed lung and the visceral line."""
    anchor_u = a.mediastinum + 0.04
    anchor_y = a.dome_y[collapse.side]
    # The gap is widest at the apex and tapers down the lateral wall, as in an upright patient.
    height = np.clip((anchor_y - y) / (anchor_y - a.apex_y), 0.15, 1.0) ** 0.7
    scale_x = 1.0 - (1.0 - collapse.scale_x) * height
    src_u = anchor_u + (u - anchor_u) / scale_x
    src_y = anchor_y + (y - anchor_y) / collapse.scale_y
    sign = -1.0 if collapse.side == 0 else 1.0
    moved = _lung_margins(a, collapse.side, src_u, sign * src_u, src_y)
    outer = np.minimum(moved["apex"] * collapse.scale_y, moved["lateral"] * scale_x)
    inner = np.minimum.reduce([margins["medial"], margins["dome"], margins["heart"]])
    collapsed_margin = np.minimum(outer, inner)
    edge = 2.0 / frame.half
    pleural_air = 1.0 - _ramp(collapsed_margin, edge)
    # The collapsed lung keeps its own (compressed) markings.
    row, col = frame.to_pixel(sign * src_u, src_y)
    markings = _sample(vessels, row, col)
    line_width = 1.1 / frame.half
    lung_margin = np.minimum.reduce(list(margins.values()))
    line = np.exp(-((outer / line_width) ** 2)) * np.clip(lung_margin / (3 * line_width), 0, 1)
    return pleural_air, markings, line


def _skin_fold(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A distractor: a long curved soft-tissue edge crossing a hemithorax (no lucency)."""
    sign = -1.0 if rng.random() < 0.5 else 1.0
    offset = rng.uniform(0.45, 0.75)
    bend = rng.uniform(-0.25, 0.25)
    curve = sign * x - (offset + bend * y**2)
    step = np.clip(curve / 0.015 + 0.5, 0.0, 1.0)
    extent = _ramp(0.55 - np.abs(y - rng.uniform(-0.2, 0.2)), 0.2)
    return rng.uniform(0.015, 0.035) * step * extent * (sign * x > 0)


def _to_stored(
    rng: np.random.Generator, attenuation: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """Exposure, detector noise and 12-bit quantisation; returns pixels, window centre, width."""
    size = attenuation.shape[0]
    bias = rng.uniform(0.0, 0.06) * _smooth_field(rng, size, 3)
    gradient = np.linspace(-1, 1, size, dtype=np.float32)
    bias += (
        rng.uniform(-0.04, 0.04) * gradient[None, :] + rng.uniform(-0.04, 0.04) * gradient[:, None]
    )
    noise = rng.uniform(0.006, 0.02) * rng.standard_normal(attenuation.shape).astype(np.float32)
    signal = np.clip((attenuation + bias + noise + 0.12) / 0.95, 0.0, 1.0)
    low, high = rng.uniform(0.03, 0.2), rng.uniform(0.72, 0.98)
    gamma = rng.uniform(0.8, 1.25)
    pixels = np.round((low + (high - low) * signal**gamma) * MAX_VALUE).astype(np.uint16)
    p_low, p_high = np.percentile(pixels, [rng.uniform(0.5, 3.0), rng.uniform(97.0, 99.8)])
    width = max(float(p_high - p_low), 64.0)
    return pixels, float((p_low + p_high) / 2.0), width


def _box(mask: np.ndarray | None) -> tuple[int, int, int, int] | None:
    if mask is None:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _dx_dataset(
    seed: int,
    pixels: np.ndarray,
    centre: float,
    width: float,
    photometric: str,
    patient_id: str,
    accession_number: str,
    study_instance_uid: str,
) -> pydicom.Dataset:
    """A Digital X-Ray Image For Presentation dataset around 12-bit pixels (MONOCHROME2 values)."""
    size = pixels.shape[0]
    rng = np.random.default_rng([seed, 7])
    study_date = dt.date(2024, 1, 1) + dt.timedelta(days=seed % 700)
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))
    study_time = f"{8 + seed % 10:02d}{seed % 60:02d}{(seed // 60) % 60:02d}"
    sop_instance_uid = _uid(str(seed), study_instance_uid, "image")
    series_instance_uid = _uid(str(seed), study_instance_uid, "series")
    frame_of_reference = _uid(str(seed), study_instance_uid, "frame-of-reference")
    if photometric == "MONOCHROME1":
        pixels = (MAX_VALUE - pixels).astype(np.uint16)
        centre = MAX_VALUE - centre
    elif photometric != "MONOCHROME2":
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = study_date.strftime("%Y%m%d")
    ds.InstanceCreationTime = study_time
    # Patient
    ds.PatientName = f"PHANTOM^CXR^{seed}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "F" if rng.random() < 0.5 else "M"
    # General study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = ds.InstanceCreationDate
    ds.StudyTime = study_time
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.StudyID = f"S{seed % 100000:05d}"
    ds.StudyDescription = "XR CHEST PA"
    # General and DX series
    ds.Modality = "DX"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "CHEST PA"
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = study_time
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    # Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "cxr phantom"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "dicomnode"
    ds.StationName = "SYNTH"
    # General image, DX image
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # PA view read as facing the patient
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = study_time
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    # -1: higher values mean less X-ray intensity (denser), as MONOCHROME2 displays bright.
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.WindowCenter = round(centre, 1)
    ds.WindowWidth = round(width, 1)
    ds.WindowCenterWidthExplanation = "SYNTHETIC"
    ds.VOILUTFunction = "LINEAR"
    # DX anatomy imaged, positioning, detector
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    ds.ViewPosition = "PA"
    ds.ViewCodeSequence = Sequence([_code("399348003", "SCT", "postero-anterior")])
    ds.PatientPosition = ""
    ds.PositionerType = "NONE"
    ds.DetectorType = "DIRECT"
    pitch = round(DETECTOR_MM / size, 6)
    ds.ImagerPixelSpacing = [pitch, pitch]
    ds.DistanceSourceToDetector = 1800
    ds.DistanceSourceToPatient = 1650
    ds.EstimatedRadiographicMagnificationFactor = round(1800 / 1650, 6)
    ds.AcquisitionContextSequence = Sequence()
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_cxr(
    seed: int,
    *,
    pneumothorax: bool,
    size: int = 512,
    photometric: str = "MONOCHROME2",
    patient_id: str | None = None,
    accession_number: str | None = None,
    study_instance_uid: str | None = None,
) -> tuple[pydicom.Dataset, CxrTruth]:
    """A synthetic PA chest radiograph (DX For Presentation) and its ground truth."""
    if size < 64:
        raise ValueError(f"phantom size must be at least 64 pixels, got {size}")
    rng = np.random.default_rng([seed, 1])
    collapse = None
    side = None
    if pneumothorax:
        # Skewed towards small (apical) pneumothoraces, the ones that are easy to miss.
        extent = rng.uniform(0.0, 1.0) ** 2
        side_index = int(rng.integers(0, 2))
        side = "R" if side_index == 0 else "L"
        collapse = _Collapse(
            side=side_index,
            scale_y=1.0 - (0.035 + 0.33 * extent) * rng.uniform(0.85, 1.15),
            scale_x=1.0 - (0.015 + 0.4 * extent) * rng.uniform(0.8, 1.2),
        )
    attenuation, lung_mask, ptx_mask = _render(rng, size, collapse)
    pixels, centre, width = _to_stored(rng, attenuation)
    study_uid = study_instance_uid or _uid(str(seed), "study")
    ds = _dx_dataset(
        seed,
        pixels,
        centre,
        width,
        photometric,
        patient_id or f"PH{seed:08d}",
        accession_number or f"ACC{seed:08d}",
        study_uid,
    )
    truth = CxrTruth(
        pneumothorax=pneumothorax,
        side=side,
        box=_box(ptx_mask > 0.5) if ptx_mask is not None else None,
        lung_mask=lung_mask > 0.5,
    )
    return ds, truth


def write_dataset(
    out: Path,
    n: int,
    seed: int,
    pneumothorax_fraction: float = 0.5,
    size: int = 512,
    progress: bool = False,
) -> Path:
    """Write ``n`` phantoms (seeds ``seed``..``seed+n-1``) and ground_truth.csv; return the CSV."""
    if not 0.0 <= pneumothorax_fraction <= 1.0:
        raise ValueError(f"pneumothorax_fraction must be in 0..1, got {pneumothorax_fraction}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    positives = round(n * pneumothorax_fraction)
    labels = np.zeros(n, dtype=bool)
    labels[:positives] = True
    np.random.default_rng([seed, 99]).shuffle(labels)
    csv_path = out / "ground_truth.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "file",
                "sop_instance_uid",
                "study_instance_uid",
                "patient_id",
                "pneumothorax",
                "side",
                "box",
            ]
        )
        for index in range(n):
            ds, truth = make_cxr(seed + index, pneumothorax=bool(labels[index]), size=size)
            name = f"cxr_{seed + index:08d}.dcm"
            ds.save_as(out / name, enforce_file_format=True)
            box = " ".join(str(v) for v in truth.box) if truth.box else ""
            writer.writerow(
                [
                    name,
                    ds.SOPInstanceUID,
                    ds.StudyInstanceUID,
                    ds.PatientID,
                    int(truth.pneumothorax),
                    truth.side or "",
                    box,
                ]
            )
            if progress and (index + 1) % 50 == 0:
                print(f"{index + 1}/{n} phantoms written to {out}", flush=True)
    return csv_path
