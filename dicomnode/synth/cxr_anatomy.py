"""Chest anatomy of the phantoms: frontal (PA, AP) and lateral projections as attenuation images.

The phantom is built in a normalised patient frame (x, y in about -1..1; y grows towards the
feet). On a frontal view image left is the patient's right, as a PA chest is read; on a lateral
view the patient faces image left (sternum left, spine right). Renderers return a ``Scene``: the
attenuation image, the bone part of it (ribs, clavicles, scapulae, spine, sternum), the lung and
heart masks and the regions of the findings drawn by a ``FindingPainter``.

A pneumothorax on a frontal view is drawn the way a radiologist recognises it: a rim of pleural
air at the apex and the lateral chest wall with no lung markings, bounded by a thin visceral
pleural line, and the lung with its markings collapsed towards the hilum.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dicomnode.synth.cxr_raster import Frame, gaussian_blur, ramp, sample, splat


@dataclass(frozen=True)
class Anatomy:
    """Random per-patient frontal anatomy in the normalised frame."""

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


@dataclass(frozen=True)
class Collapse:
    """A pneumothorax: the lung of ``side`` shrunk towards its medial base."""

    side: int
    scale_y: float
    scale_x: float


@dataclass
class Thorax:
    """What a finding painter needs to know of the rendered chest (arrays on the pixel grid).

    ``margins[side]`` is the signed distance-like margin of each lung (positive inside),
    ``wall[side]`` runs 0 at the lung's centre to 1 at its chest wall, ``base_y`` is the lowest
    point of each pleural space (the costophrenic sulcus), ``outward`` the image column direction
    from each lung towards its chest wall. Points are normalised (x, y).
    """

    view: str
    frame: Frame
    x: np.ndarray
    y: np.ndarray
    margins: list[np.ndarray]
    wall: list[np.ndarray]
    ribs: np.ndarray
    apex_y: tuple[float, float]
    base_y: tuple[float, float]
    hilum: tuple[tuple[float, float], tuple[float, float]]
    outward: tuple[int, int]
    carina: tuple[float, float]
    trachea_top: tuple[float, float]
    central_line: dict[str, list[tuple[float, float]]]
    lobes: Callable[[int], dict[str, np.ndarray]]
    grow_tree: Callable[[np.random.Generator], np.ndarray]


@dataclass
class Layers:
    """What findings add to a rendered chest.

    ``aeration[side]`` multiplies the lung's lucency and markings (1 normal, 0 airless),
    ``marking_gain`` multiplies the markings (vascular redistribution), ``opacity`` is added to
    the attenuation, ``masks`` are soft 0..1 regions by name, ``boxes`` (finding, bool mask of one
    region), ``landmarks`` normalised (x, y) points.
    """

    aeration: list[np.ndarray | None] = field(default_factory=lambda: [None, None])
    marking_gain: np.ndarray | None = None
    opacity: np.ndarray | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: list[tuple[str, np.ndarray]] = field(default_factory=list)
    landmarks: dict[str, tuple[float, float]] = field(default_factory=dict)


FindingPainter = Callable[[Thorax], Layers]


@dataclass
class Scene:
    """A rendered chest: attenuation, its bone part, lung and heart masks, finding layers."""

    frame: Frame
    attenuation: np.ndarray
    bones: np.ndarray
    lung: np.ndarray
    heart: np.ndarray
    pneumothorax: np.ndarray | None
    layers: Layers


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random adult frontal chest."""
    dome_right = rng.uniform(0.20, 0.34)
    return Anatomy(
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


def cardiothoracic_ratio(a: Anatomy) -> float:
    """Heart width over the inner thoracic width at the lung bases."""
    return (2.0 * a.heart[2]) / (2.0 * a.lung_width)


def enlarge_heart(a: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Cardiomegaly: a heart with a cardiothoracic ratio of 0.55..0.68."""
    hx, hy, rx, ry = a.heart
    new_rx = rng.uniform(0.55, 0.68) * a.lung_width
    grow = new_rx / rx
    new_ry = ry * min(1.0 + 0.5 * (grow - 1.0), 1.35)
    # The enlarged heart grows to the left and down onto the diaphragm.
    return dataclasses.replace(
        a, heart=(hx + 0.35 * (new_rx - rx), hy + 0.4 * (new_ry - ry), new_rx, new_ry)
    )


def ap_anatomy(a: Anatomy, rng: np.random.Generator) -> Anatomy:
    """An AP (usually portable, supine or semi-erect) projection of the same chest.

    The heart is further from the detector, so magnified; inspiration is poorer (higher domes);
    the clavicles project higher.
    """
    hx, hy, rx, ry = a.heart
    grow = rng.uniform(1.1, 1.18)
    lift = rng.uniform(0.02, 0.08)
    return dataclasses.replace(
        a,
        heart=(hx, hy - lift * 0.5, rx * grow, ry * rng.uniform(1.04, 1.1)),
        dome_y=(a.dome_y[0] - lift, a.dome_y[1] - lift),
        clavicle_y=a.clavicle_y - rng.uniform(0.03, 0.08),
    )


def lung_margins(a: Anatomy, side: int, u: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
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


def _grow(
    rng: np.random.Generator,
    starts: tuple[np.ndarray, np.ndarray],
    angles: np.ndarray,
    lengths: np.ndarray,
    thickness: np.ndarray,
    inside: Callable[[np.ndarray, np.ndarray], np.ndarray],
    to_pixel: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    units: tuple[float, float],
    out: list[list[np.ndarray]],
) -> None:
    """Grow branching segments for eight generations; append (rows, cols, weights, thickness)."""
    starts_u, starts_y = starts
    for _level in range(8):
        ends_u = starts_u + lengths * np.cos(angles)
        ends_y = starts_y + lengths * np.sin(angles)
        keep_inside = inside(ends_u, ends_y)
        steps = np.linspace(0.0, 1.0, 12, dtype=np.float32)
        pu = starts_u[:, None] + (ends_u - starts_u)[:, None] * steps
        py = starts_y[:, None] + (ends_y - starts_y)[:, None] * steps
        row, col = to_pixel(pu, py)
        seg_px = lengths * units[0] * units[1]
        density = (seg_px / 11.0)[:, None] * np.ones_like(steps)
        out[0].append(row.ravel())
        out[1].append(col.ravel())
        out[2].append((thickness[:, None] * density).ravel())
        out[3].append(np.repeat(thickness, steps.size))
        keep = keep_inside & (thickness > 0.1)
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


def _rasterise_tree(frame: Frame, out: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols, weights, thick = (np.concatenate(part) for part in out)
    px = 2.0 * frame.half / 512.0
    big = thick > 0.4
    thick_img = splat(frame.shape, rows[big], cols[big], weights[big])
    thin_img = splat(frame.shape, rows[~big], cols[~big], weights[~big])
    thick_img = gaussian_blur(thick_img, 1.8 * px) * (4.0 * px)
    thin_img = gaussian_blur(thin_img, max(0.6, 0.9 * px)) * (2.2 * px)
    return thick_img, thin_img


def vessel_trees(
    rng: np.random.Generator, a: Anatomy, frame: Frame
) -> tuple[np.ndarray, np.ndarray]:
    """Branching pulmonary vessels from both hila, rasterised (thick, thin) in pixel space."""
    out: list[list[np.ndarray]] = [[], [], [], []]
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

        def inside(u: np.ndarray, yy: np.ndarray, side: int = side, sign: float = sign):
            margins = lung_margins(a, side, u, sign * u, yy)
            return np.minimum.reduce(list(margins.values())) > -0.01

        def to_pixel(u: np.ndarray, yy: np.ndarray, sign: float = sign):
            return frame.to_pixel(sign * u, yy)

        _grow(
            rng,
            (starts_u, starts_y),
            angles,
            lengths,
            thickness,
            inside,
            to_pixel,
            (frame.half, frame.scale),
            out,
        )
    return _rasterise_tree(frame, out)


def _bands(phase: np.ndarray, width: float) -> np.ndarray:
    """Bone bands with brighter cortical edges at the integer steps of ``phase``."""
    t = phase - np.floor(phase)
    inside = ramp(np.minimum(t, width - t), 0.06)
    edge = np.exp(-(((np.minimum(t, np.abs(width - t))) / 0.06) ** 2))
    return inside * 0.75 + 0.35 * edge * inside


def ribs(a: Anatomy, side: int, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Posterior and anterior rib arcs of one side (lateral coordinate ``u``)."""
    # Posterior ribs rise slightly from the spine, then turn down along the chest wall.
    posterior_curve = y - (a.rib_origin - 0.12 * u + 0.85 * u**2)
    phase = posterior_curve / a.rib_spacing
    posterior = _bands(phase, 0.36) * (phase > 0) * (phase < 10.4)
    posterior *= ramp(u - 0.06, 0.03) * ramp(a.lung_width + 0.08 - u, 0.06)
    # Anterior ribs run down and medially from the chest wall; their cartilage is invisible.
    anterior_curve = y - (a.rib_origin + 0.12 + 0.45 * (a.lung_width + 0.05 - u))
    phase_a = anterior_curve / (1.3 * a.rib_spacing)
    anterior = _bands(phase_a, 0.3) * (phase_a > 0) * (phase_a < 6.4)
    anterior *= ramp(u - 0.25, 0.15) * ramp(a.lung_width + 0.06 - u, 0.06)
    below = ramp(a.dome_y[side] + a.costophrenic_drop + 0.12 - y, 0.12)
    return (posterior + 0.4 * anterior) * below


def clavicle(a: Anatomy, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One clavicle (lateral coordinate ``u``)."""
    centre = a.clavicle_y + 0.04 - 0.2 * (u - 0.08) + 0.22 * (u - 0.3) ** 2
    band = ramp(0.028 - np.abs(y - centre), 0.014)
    return band * ramp(u - 0.07, 0.02) * ramp(0.58 - u, 0.05)


def scapula(rng: np.random.Generator, a: Anatomy, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A scapula projected over the upper lateral lung, as on an AP view (plate and cortex)."""
    top = (rng.uniform(0.5, 0.6), a.clavicle_y - rng.uniform(0.02, 0.08))
    glenoid = (a.lung_width + rng.uniform(0.06, 0.14), a.clavicle_y + rng.uniform(0.0, 0.06))
    tip = (rng.uniform(0.55, 0.68), a.clavicle_y + rng.uniform(0.55, 0.7))
    corners = (top, glenoid, tip)
    margin = None
    for (u0, y0), (u1, y1) in zip(corners, corners[1:] + corners[:1], strict=True):
        length = math.hypot(u1 - u0, y1 - y0)
        # Signed distance to the edge, positive on the triangle's side (corners run clockwise).
        dist = ((u1 - u0) * (y - y0) - (y1 - y0) * (u - u0)) / length
        margin = dist if margin is None else np.minimum(margin, dist)
    assert margin is not None
    plate = ramp(margin, 0.02)
    cortex = np.exp(-((margin / 0.012) ** 2))
    return 0.5 * plate + 0.6 * cortex * ramp(margin + 0.03, 0.02)


def skin_fold(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A distractor: a long curved soft-tissue edge crossing a hemithorax (no lucency)."""
    sign = -1.0 if rng.random() < 0.5 else 1.0
    offset = rng.uniform(0.45, 0.75)
    bend = rng.uniform(-0.25, 0.25)
    curve = sign * x - (offset + bend * y**2)
    step = np.clip(curve / 0.015 + 0.5, 0.0, 1.0)
    extent = ramp(0.55 - np.abs(y - rng.uniform(-0.2, 0.2)), 0.2)
    return rng.uniform(0.015, 0.035) * step * extent * (sign * x > 0)


def ecg_electrodes(rng: np.random.Generator, frame: Frame) -> np.ndarray:
    """Two to four ECG electrodes (a faint disc with a bright snap), common on AP films."""
    image = np.zeros(frame.shape, dtype=np.float32)
    count = int(rng.integers(2, 5))
    xs = rng.uniform(-0.9, 0.9, count)
    ys = rng.uniform(-0.85, 0.1, count)
    rows, cols = frame.to_pixel(xs, ys)
    radius = 0.045 * frame.pixels_per_unit
    snap = 0.012 * frame.pixels_per_unit
    span = math.ceil(radius) + 2
    for row, col in zip(rows, cols, strict=True):
        r0, c0 = int(row) - span, int(col) - span
        rr = np.arange(max(r0, 0), min(r0 + 2 * span + 1, frame.shape[0]))[:, None]
        cc = np.arange(max(c0, 0), min(c0 + 2 * span + 1, frame.shape[1]))[None, :]
        if rr.size == 0 or cc.size == 0:
            continue
        dist = np.hypot(rr - row, cc - col)
        disc = 0.02 * ramp(radius - dist, 1.5) + 0.18 * ramp(snap - dist, 1.0)
        image[rr, cc] += disc.astype(np.float32)
    return image


def pneumothorax_layers(
    collapse: Collapse,
    a: Anatomy,
    frame: Frame,
    margins: dict,
    u: np.ndarray,
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
    moved = lung_margins(a, collapse.side, src_u, sign * src_u, src_y)
    outer = np.minimum(moved["apex"] * collapse.scale_y, moved["lateral"] * scale_x)
    inner = np.minimum.reduce([margins["medial"], margins["dome"], margins["heart"]])
    collapsed_margin = np.minimum(outer, inner)
    edge = 2.0 / frame.half
    pleural_air = 1.0 - ramp(collapsed_margin, edge)
    # The collapsed lung keeps its own (compressed) markings.
    row, col = frame.to_pixel(sign * src_u, src_y)
    markings = sample(vessels, row, col)
    line_width = 1.1 / frame.half
    lung_margin = np.minimum.reduce(list(margins.values()))
    line = np.exp(-((outer / line_width) ** 2)) * np.clip(lung_margin / (3 * line_width), 0, 1)
    return pleural_air, markings, line


def _frontal_lobes(a: Anatomy, x: np.ndarray, y: np.ndarray, side: int) -> dict[str, np.ndarray]:
    """Soft projections of the lobes of one lung on a frontal view."""
    u = -x if side == 0 else x
    fissure = -0.02 if side == 0 else 0.1  # horizontal fissure; the lingula lies lower
    lobes = {
        "upper": ramp(fissure - y, 0.06),
        "lower": ramp(y - (fissure + 0.04), 0.08) * ramp(u - 0.2, 0.1),
    }
    if side == 0:
        hx, _hy, rx, _ry = a.heart
        near_heart = ramp(0.25 - np.abs(u - (rx - hx)), 0.1)
        lobes["middle"] = ramp(y - fissure, 0.04) * near_heart
    return lobes


def _frontal_thorax(
    view: str,
    a: Anatomy,
    frame: Frame,
    x: np.ndarray,
    y: np.ndarray,
    margins: list[np.ndarray],
    rib_shapes: list[np.ndarray],
) -> Thorax:
    walls = []
    for side in (0, 1):
        u = -x if side == 0 else x
        walls.append(np.clip((u - a.mediastinum) / (a.lung_width - a.mediastinum), 0.0, 1.0))
    _hx, hy, _rx, ry = a.heart
    carina_y = hy - ry - 0.12
    heart_top = hy - ry
    central_lines = {
        "right": [(-0.48, -0.8), (-0.3, a.clavicle_y + 0.06), (-0.08, -0.45), (-0.07, heart_top)],
        "left": [(0.48, -0.8), (0.25, a.clavicle_y + 0.08), (-0.03, -0.46), (-0.07, heart_top)],
    }

    def grow_tree(rng: np.random.Generator) -> np.ndarray:
        thick, _ = vessel_trees(rng, a, frame)
        return thick

    return Thorax(
        view=view,
        frame=frame,
        x=x,
        y=y,
        margins=margins,
        wall=walls,
        ribs=rib_shapes[0] * (x < 0) + rib_shapes[1] * (x > 0),
        apex_y=(a.apex_y, a.apex_y),
        base_y=(a.dome_y[0] + a.costophrenic_drop, a.dome_y[1] + a.costophrenic_drop),
        hilum=((-(a.mediastinum + 0.1), -0.04), (a.mediastinum + 0.1, -0.02)),
        outward=(-1, 1),
        carina=(-0.01, carina_y),
        trachea_top=(-0.01, -1.6),
        central_line=central_lines,
        lobes=lambda side: _frontal_lobes(a, x, y, side),
        grow_tree=grow_tree,
    )


def render_frontal(
    rng: np.random.Generator,
    shape: tuple[int, int],
    collapse: Collapse | None,
    *,
    view: str = "PA",
    extra_rng: np.random.Generator | None = None,
    cardiomegaly: np.random.Generator | None = None,
    painter: FindingPainter | None = None,
) -> Scene:
    """A frontal chest (PA or AP) with an optional pneumothorax and painted findings.

    ``rng`` drives the anatomy as the original PA renderer did (so a plain PA phantom stays
    byte-identical for a seed); ``extra_rng`` drives the AP changes and ``cardiomegaly`` (when
    given) enlarges the heart, each from its own stream.
    """
    a = random_anatomy(rng)
    frame = Frame(
        shape,
        scale=rng.uniform(0.88, 1.04),
        angle=math.radians(rng.uniform(-4.0, 4.0)),
        shift=(rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.06)),
    )
    if view == "AP":
        assert extra_rng is not None
        a = ap_anatomy(a, extra_rng)
    if cardiomegaly is not None:
        a = enlarge_heart(a, cardiomegaly)
    x, y = frame.grid()
    edge = 2.5 / frame.half  # soft edges of about 2.5 pixels

    # Soft-tissue envelope: thickness of an elliptical trunk, narrowing to the neck.
    body_half = 0.24 + (a.body_width - 0.24) * np.clip((y + 0.98) / 0.32, 0.0, 1.0) ** 0.6
    body = ramp(body_half - np.abs(x), edge * 2)
    thickness = np.sqrt(np.clip(1.0 - (x / body_half) ** 2, 0.0, 1.0))
    attenuation = 0.55 * thickness * body

    thick_vessels, thin_vessels = vessel_trees(rng, a, frame)
    vessels = thick_vessels + thin_vessels
    mottle = gaussian_blur(rng.standard_normal(shape).astype(np.float32), min(shape) / 256.0)

    sides_m = []
    sides_margin = []
    rib_shapes = []
    for side in (0, 1):
        u = x if side else -x
        m = lung_margins(a, side, u, x, y)
        sides_m.append(m)
        sides_margin.append(np.minimum.reduce(list(m.values())))
        rib_shapes.append(ribs(a, side, u, y))
    layers = Layers()
    if painter is not None:
        thorax = _frontal_thorax(view, a, frame, x, y, sides_margin, rib_shapes)
        layers = painter(thorax)

    bones = np.zeros(shape, dtype=np.float32)
    lung_mask = np.zeros(shape, dtype=np.float32)
    ptx_mask = None
    for side in (0, 1):
        sign = -1.0 if side == 0 else 1.0
        u = sign * x
        half = (u > 0).astype(np.float32)
        m = sides_m[side]
        margin = sides_margin[side]
        lung = ramp(margin, edge) * half
        lung_mask += lung
        depth = np.clip(margin / 0.06, 0.0, 1.0) * half
        aeration = layers.aeration[side]
        attenuation -= rng.uniform(0.27, 0.33) * (depth if aeration is None else depth * aeration)
        # Lung markings fade towards the pleura but stay faintly visible in a normal lung.
        fade = 0.35 + 0.65 * np.clip(margin / 0.16, 0.0, 1.0)
        markings = (0.11 * vessels + 0.012 * mottle) * fade
        if collapse is not None and collapse.side == side:
            lung_ptx, markings_ptx, line = pneumothorax_layers(collapse, a, frame, m, u, y, vessels)
            ptx_mask = lung_ptx * lung
            collapsed = lung * (1.0 - lung_ptx)
            attenuation += 0.12 * (1.0 - collapse.scale_x * collapse.scale_y) * collapsed
            attenuation -= rng.uniform(0.0, 0.04) * ptx_mask
            markings = (0.11 * markings_ptx + 0.012 * mottle) * fade * (1.0 - lung_ptx)
            attenuation += rng.uniform(0.03, 0.08) * line * half
        if aeration is not None:
            markings = markings * aeration
        if layers.marking_gain is not None:
            markings = markings * layers.marking_gain
        attenuation += markings * lung
        rib_layer = rng.uniform(0.04, 0.06) * rib_shapes[side] * body * half
        attenuation += rib_layer
        bones += rib_layer
        clavicle_layer = 0.08 * clavicle(a, u, y) * half
        attenuation += clavicle_layer
        bones += clavicle_layer

    hx, hy, rx, ry = a.heart
    heart = ramp(1.0 - np.sqrt(((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2), 0.05)
    attenuation += 0.04 * heart
    vertebrae = 0.8 + 0.2 * np.cos(2 * np.pi * (y - a.rib_origin) / a.rib_spacing)
    spine = 0.09 * ramp(0.055 - np.abs(x), edge * 2) * vertebrae * body
    attenuation += spine
    bones += spine
    # Trachea: an air column in the upper mediastinum down to the carina.
    carina = a.heart[1] - a.heart[3] - 0.12
    trachea = ramp(0.035 - np.abs(x + 0.01), edge) * ramp(carina - y, 0.05)
    attenuation -= 0.05 * trachea * body
    if rng.random() < 0.4:
        attenuation += skin_fold(rng, x, y) * body
    if view == "AP":
        assert extra_rng is not None
        for side in (0, 1):
            u = x if side else -x
            blade = 0.05 * scapula(extra_rng, a, u, y) * (u > 0) * body
            attenuation += blade
            bones += blade
        if extra_rng.random() < 0.6:
            attenuation += ecg_electrodes(extra_rng, frame)
    if layers.opacity is not None:
        attenuation += layers.opacity * body
    return Scene(frame, attenuation, bones, lung_mask, heart, ptx_mask, layers)


# --- lateral view -------------------------------------------------------------------------


@dataclass(frozen=True)
class LateralAnatomy:
    """Random per-patient lateral anatomy (x: anterior negative, posterior positive)."""

    anterior_skin: float
    posterior_skin: float
    lung_front: float
    lung_back: float
    apex_y: float
    dome_top: tuple[float, float]  # right, left
    dome_x: float
    heart: tuple[float, float, float, float]
    spine_front: float
    spine_depth: float
    rib_origin: float
    rib_spacing: float
    carina: tuple[float, float]


def random_lateral_anatomy(rng: np.random.Generator) -> LateralAnatomy:
    """A random adult chest seen from the side."""
    dome_right = rng.uniform(0.1, 0.22)
    front = rng.uniform(-0.52, -0.44)
    return LateralAnatomy(
        anterior_skin=front - rng.uniform(0.08, 0.14),
        posterior_skin=rng.uniform(0.68, 0.78),
        lung_front=front,
        lung_back=rng.uniform(0.44, 0.5),
        apex_y=rng.uniform(-0.82, -0.7),
        dome_top=(dome_right, dome_right + rng.uniform(0.03, 0.09)),
        dome_x=rng.uniform(-0.15, -0.02),
        heart=(
            rng.uniform(-0.24, -0.16),
            rng.uniform(0.08, 0.16),
            rng.uniform(0.24, 0.3),
            rng.uniform(0.22, 0.28),
        ),
        spine_front=rng.uniform(0.24, 0.3),
        spine_depth=rng.uniform(0.16, 0.2),
        rib_origin=rng.uniform(-0.86, -0.78),
        rib_spacing=rng.uniform(0.1, 0.125),
        carina=(rng.uniform(-0.02, 0.04), rng.uniform(-0.2, -0.1)),
    )


def _lateral_margins(
    a: LateralAnatomy, side: int, x: np.ndarray, y: np.ndarray
) -> dict[str, np.ndarray]:
    """Signed margins of one lung's outline on a lateral view (both lungs superimpose)."""
    top = a.dome_top[side]
    slope = np.where(x > a.dome_x, 1.1, 0.7)
    dome = top + slope * (x - a.dome_x) ** 2
    upper = np.clip(-0.35 - y, 0.0, None)
    hx, hy, rx, ry = a.heart
    heart = np.sqrt(((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2)
    return {
        "anterior": x - (a.lung_front + 0.6 * upper**1.5),
        "posterior": (a.lung_back - 0.35 * upper**1.5) - x,
        "apex": y - (a.apex_y + 1.6 * (x - 0.05) ** 2),
        "dome": dome - y,
        "heart": (heart - 1.0) * min(rx, ry),
    }


def _trachea_x(a: LateralAnatomy, y: np.ndarray | float) -> np.ndarray | float:
    """The trachea runs down and back from the neck to the carina."""
    cx, cy = a.carina
    return cx - 0.16 * (cy - y)


def render_lateral(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    cardiomegaly: bool = False,
    pneumothorax_side: int | None = None,
    painter: FindingPainter | None = None,
) -> Scene:
    """A left lateral chest: sternum in front, spine behind, heart, both diaphragm domes."""
    a = random_lateral_anatomy(rng)
    if cardiomegaly:
        hx, hy, rx, ry = a.heart
        grow = rng.uniform(1.25, 1.45)
        # A big heart fills the retrosternal space and pushes back into the retrocardiac space.
        a = dataclasses.replace(a, heart=(hx + 0.25 * rx * (grow - 1), hy, rx * grow, ry * 1.1))
    frame = Frame(
        shape,
        scale=rng.uniform(0.9, 1.05),
        angle=math.radians(rng.uniform(-4.0, 4.0)),
        shift=(rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.06)),
    )
    x, y = frame.grid()
    edge = 2.5 / frame.half

    # Body: the trunk seen side-on, a long transverse path (denser than a PA), neck above.
    neck = np.clip((y + 1.0) / 0.35, 0.0, 1.0) ** 0.6
    front = a.anterior_skin * (0.45 + 0.55 * neck) + 0.02 * y
    back = a.posterior_skin * (0.55 + 0.45 * neck)
    body = ramp(x - front, edge * 2) * ramp(back - x, edge * 2)
    centre = (front + back) / 2
    half_depth = (back - front) / 2
    thickness = np.sqrt(np.clip(1.0 - ((x - centre) / half_depth) ** 2, 0.0, 1.0)) ** 0.5
    attenuation = 0.6 * thickness * body
    # Arms raised in front of the face: soft tissue over the upper anterior chest.
    arms = ramp(-0.5 - y, 0.25) * ramp(0.15 - x, 0.2)
    attenuation += 0.06 * arms * rng.uniform(0.5, 1.0)

    hilum = (rng.uniform(-0.02, 0.06), rng.uniform(-0.08, 0.02))

    def inside(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        margins = _lateral_margins(a, 0, px, py)
        return np.minimum.reduce(list(margins.values())) > -0.01

    def tree(generator: np.random.Generator, count: int) -> list[list[np.ndarray]]:
        parts: list[list[np.ndarray]] = [[], [], [], []]
        angles = np.linspace(-math.pi, math.pi, count, endpoint=False)
        angles = angles + generator.normal(0, 0.12, count)
        starts = (
            hilum[0] + 0.05 * np.cos(angles) + generator.normal(0, 0.01, count),
            hilum[1] + 0.06 * np.sin(angles) + generator.normal(0, 0.02, count),
        )
        lengths = generator.uniform(0.08, 0.14, count)
        thickness = generator.uniform(0.85, 1.15, count)
        _grow(
            generator,
            starts,
            angles,
            lengths,
            thickness,
            inside,
            frame.to_pixel,
            (frame.half, frame.scale),
            parts,
        )
        return parts

    thick_vessels, thin_vessels = _rasterise_tree(frame, tree(rng, int(rng.integers(16, 22))))
    vessels = thick_vessels + thin_vessels
    mottle = gaussian_blur(rng.standard_normal(shape).astype(np.float32), min(shape) / 256.0)

    # Posterior ribs of both sides: oblique bands over the back of the lungs, slightly offset.
    rib_shapes = []
    for side in (0, 1):
        offset = 0.02 * side
        curve = y - (a.rib_origin + offset + 0.55 * (a.spine_front - x) - 0.3 * (x - 0.1) ** 2)
        phase = curve / a.rib_spacing
        band = _bands(phase, 0.33) * (phase > 0) * (phase < 10.5)
        rib_shapes.append(band * ramp(x + 0.15, 0.25) * ramp(a.spine_front + 0.12 - x, 0.04))

    margins_m = [_lateral_margins(a, side, x, y) for side in (0, 1)]
    margins = [np.minimum.reduce(list(m.values())) for m in margins_m]
    layers = Layers()
    if painter is not None:
        mid = (a.lung_front + a.lung_back) / 2
        half_width = (a.lung_back - a.lung_front) / 2
        wall = np.clip(np.abs(x - mid) / half_width, 0.0, 1.0)
        base = tuple(a.dome_top[side] + 1.1 * (a.lung_back - a.dome_x) ** 2 for side in (0, 1))
        cx, cy = a.carina
        heart_top = a.heart[1] - a.heart[3]

        def lobes(side: int) -> dict[str, np.ndarray]:
            # Oblique fissure from high behind to the front of the diaphragm.
            p0, p1 = (a.lung_back - 0.1, -0.45), (a.lung_front + 0.15, a.dome_top[side] + 0.12)
            oblique = ((p1[0] - p0[0]) * (y - p0[1]) - (p1[1] - p0[1]) * (x - p0[0])) / math.hypot(
                p1[0] - p0[0], p1[1] - p0[1]
            )
            lobe = {"lower": ramp(-oblique, 0.06), "upper": ramp(oblique, 0.06)}
            if side == 0:
                lobe["middle"] = lobe["upper"] * ramp(y - (hilum[1] + 0.02), 0.05)
                lobe["upper"] = lobe["upper"] * ramp(hilum[1] + 0.02 - y, 0.05)
            return lobe

        thorax = Thorax(
            view="LATERAL",
            frame=frame,
            x=x,
            y=y,
            margins=margins,
            wall=[wall, wall],
            ribs=rib_shapes[0] + rib_shapes[1],
            apex_y=(a.apex_y, a.apex_y),
            base_y=(float(base[0]), float(base[1])),
            hilum=(hilum, hilum),
            outward=(1, 1),
            carina=(cx, cy),
            trachea_top=(float(_trachea_x(a, -1.6)), -1.6),
            central_line={
                "right": [(-0.32, -1.2), (-0.24, -0.7), (-0.2, -0.4), (-0.17, heart_top)],
            },
            lobes=lobes,
            grow_tree=lambda generator: _rasterise_tree(frame, tree(generator, 18))[0],
        )
        layers = painter(thorax)

    bones = np.zeros(shape, dtype=np.float32)
    lung_mask = np.zeros(shape, dtype=np.float32)
    ptx_mask = None
    for side in (0, 1):
        margin = margins[side]
        lung = ramp(margin, edge)
        lung_mask = np.maximum(lung_mask, lung)
        depth = np.clip(margin / 0.08, 0.0, 1.0)
        aeration = layers.aeration[side]
        lucency = depth if aeration is None else depth * aeration
        fade = 0.4 + 0.6 * np.clip(margin / 0.16, 0.0, 1.0)
        markings = (0.06 * vessels + 0.01 * mottle) * fade
        if pneumothorax_side == side:
            # Pleural air over the apex and in front of the lung, bounded by the visceral line.
            height = np.clip((0.1 - y) / (0.1 - a.apex_y), 0.0, 1.0)
            gap = rng.uniform(0.04, 0.14) * height
            outer = np.minimum(margins_m[side]["apex"], margins_m[side]["anterior"])
            air = (1.0 - ramp(outer - gap, edge)) * lung
            line_width = 1.1 / frame.half
            line = np.exp(-(((outer - gap) / line_width) ** 2)) * lung * (height > 0.05)
            markings = markings * (1.0 - air)
            attenuation -= rng.uniform(0.02, 0.05) * air
            attenuation += rng.uniform(0.03, 0.06) * line
            ptx_mask = air
        if aeration is not None:
            markings = markings * aeration
        if layers.marking_gain is not None:
            markings = markings * layers.marking_gain
        attenuation -= rng.uniform(0.15, 0.18) * lucency
        attenuation += markings * lung
        rib_layer = rng.uniform(0.025, 0.035) * rib_shapes[side] * body
        attenuation += rib_layer
        bones += rib_layer

    hx, hy, rx, ry = a.heart
    heart = ramp(1.0 - np.sqrt(((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2), 0.05)
    attenuation += 0.03 * heart
    # Spine: vertebral bodies with end plates and disc spaces, posterior elements behind.
    kyphosis = 0.05 * (y + 0.2) ** 2
    front_edge = a.spine_front + kyphosis
    phase = (y - a.rib_origin) / a.rib_spacing
    bodies = _bands(phase, 0.8) * ramp(x - front_edge, edge * 2)
    bodies *= ramp(front_edge + a.spine_depth - x, edge * 2)
    posterior = ramp(x - (front_edge + a.spine_depth + 0.02), 0.03)
    posterior = posterior * ramp(front_edge + a.spine_depth + 0.16 - x, 0.04)
    posterior = posterior * (0.6 + 0.4 * np.cos(2 * np.pi * phase))
    spine = (0.12 * bodies + 0.05 * posterior) * ramp(0.6 - y, 0.1) * body
    attenuation += spine
    bones += spine
    # Sternum: manubrium and body, a dense strip behind the anterior chest wall.
    sternum_x = a.lung_front - 0.05 + 0.06 * (y + 0.6)
    width = 0.035 + 0.03 * ramp(-0.45 - y, 0.05)
    sternum = ramp(width - np.abs(x - sternum_x), edge) * ramp(y + 0.62, 0.04)
    sternum = sternum * ramp(0.3 - y, 0.05)
    sternum_layer = (
        0.07 * sternum * (0.8 + 0.2 * np.exp(-(((np.abs(x - sternum_x) - width) / 0.01) ** 2)))
    )
    attenuation += sternum_layer
    bones += sternum_layer
    # Trachea: an air column running down and back to the carina.
    trachea = ramp(0.03 - np.abs(x - _trachea_x(a, y)), edge) * ramp(a.carina[1] - y, 0.04)
    attenuation -= 0.06 * trachea * body
    if layers.opacity is not None:
        attenuation += layers.opacity * body
    return Scene(frame, attenuation, bones, lung_mask, heart, ptx_mask, layers)
