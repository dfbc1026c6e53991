"""Chest X-ray findings painted onto a rendered thorax, drawn the way radiologists recognise them.

- effusion: dependent homogeneous opacity with a meniscus rising along the chest wall, blunting
  the costophrenic angle and hiding the hemidiaphragm;
- consolidation: lobar air-space opacity (the lung loses its air and markings) with air
  bronchograms, patchy at its edges;
- edema: bilateral perihilar haze, Kerley B lines at the bases reaching the pleura, and upper-lobe
  vascular redistribution;
- nodule: 1 to 4 round opacities of 5 to 30 mm, some over a rib;
- tuberculosis: patchy upper-lobe opacities, acinar nodules, fibrotic streaks towards the hilum,
  often a thick-walled cavity;
- tube: an endotracheal tube with its tip above the carina, or a central venous catheter with its
  tip at the cavo-atrial junction; the tip is a landmark.

Pneumothorax and cardiomegaly change the anatomy itself and live in ``cxr_anatomy``.
"""

from __future__ import annotations

import math

import numpy as np

from dicomnode.synth.cxr_anatomy import Layers, Thorax
from dicomnode.synth.cxr_raster import (
    chaikin,
    line_image,
    ramp,
    resample_polyline,
    segments_image,
    smooth_field,
)

PAINTED = ("effusion", "consolidation", "edema", "nodule", "tuberculosis", "tube")


def paint(rng: np.random.Generator, findings: set[str], thorax: Thorax, pitch_mm: float) -> Layers:
    """Layers for the painted ``findings`` on ``thorax`` (pixel pitch ``pitch_mm``)."""
    shape = thorax.frame.shape
    edge = 2.5 / thorax.frame.half
    lungs = [ramp(margin, edge) for margin in thorax.margins]
    layers = Layers(opacity=np.zeros(shape, dtype=np.float32))
    aeration = [np.ones(shape, dtype=np.float32), np.ones(shape, dtype=np.float32)]
    px_per_mm = 1.0 / pitch_mm
    if "effusion" in findings:
        _effusion(rng, thorax, lungs, aeration, layers)
    if "consolidation" in findings:
        _consolidation(rng, thorax, lungs, aeration, layers)
    if "edema" in findings:
        _edema(rng, thorax, lungs, aeration, layers, px_per_mm)
    if "nodule" in findings:
        _nodules(rng, thorax, layers, px_per_mm)
    if "tuberculosis" in findings:
        _tuberculosis(rng, thorax, lungs, aeration, layers, px_per_mm)
    if "tube" in findings:
        _tube(rng, thorax, layers, px_per_mm)
    layers.aeration = [np.clip(a, 0.0, 1.0) for a in aeration]
    return layers


def _sides(rng: np.random.Generator, both: float) -> tuple[int, ...]:
    if rng.random() < both:
        return (0, 1)
    return (int(rng.integers(0, 2)),)


def _effusion(
    rng: np.random.Generator,
    t: Thorax,
    lungs: list[np.ndarray],
    aeration: list[np.ndarray],
    layers: Layers,
) -> None:
    mask = np.zeros(t.frame.shape, dtype=np.float32)
    for side in _sides(rng, 0.35):
        volume = rng.uniform(0.0, 1.0) ** 1.6  # small, angle-blunting effusions are common
        base, apex = t.base_y[side], t.apex_y[side]
        top = base - (0.14 + 0.5 * volume) * (base - apex)  # fluid height at the chest wall
        rise = rng.uniform(0.06, 0.14)  # the meniscus: lower towards the mediastinum
        surface = top + rise * (1.0 - t.wall[side]) ** 2
        fluid = ramp(t.y - surface, 0.02) * lungs[side]
        aeration[side] *= 1.0 - 0.97 * fluid
        # Layering fluid is thicker, so denser, towards the base.
        assert layers.opacity is not None
        layers.opacity += (0.02 + 0.04 * ramp(t.y - surface - 0.08, 0.16)) * fluid
        mask = np.maximum(mask, fluid)
    layers.masks["effusion"] = mask


def _consolidation(
    rng: np.random.Generator,
    t: Thorax,
    lungs: list[np.ndarray],
    aeration: list[np.ndarray],
    layers: Layers,
) -> None:
    bronchi = t.grow_tree(rng)
    bronchi = bronchi / max(float(bronchi.max()), 1e-6)
    mask = np.zeros(t.frame.shape, dtype=np.float32)
    for side in _sides(rng, 0.15):
        lobes = t.lobes(side)
        names = sorted(lobes)
        lobe = lobes[names[int(rng.integers(0, len(names)))]]
        field = smooth_field(rng, t.frame.shape, 7)
        patch = ramp(field + rng.uniform(0.3, 0.7), 0.35)
        region = lobe * lungs[side] * patch
        if float((region > 0.5).mean()) < 0.004:  # too little of the lobe: take all of it
            region = lobe * lungs[side]
        density = rng.uniform(0.75, 0.95)
        aeration[side] *= 1.0 - density * region
        # Air bronchograms: air-filled bronchi seen only against the airless lung.
        assert layers.opacity is not None
        layers.opacity -= rng.uniform(0.05, 0.08) * bronchi * region**2
        layers.boxes.append(("consolidation", region > 0.5))
        mask = np.maximum(mask, region)
    layers.masks["consolidation"] = mask


def _edema(
    rng: np.random.Generator,
    t: Thorax,
    lungs: list[np.ndarray],
    aeration: list[np.ndarray],
    layers: Layers,
    px_per_mm: float,
) -> None:
    severity = rng.uniform(0.35, 0.7)
    mask = np.zeros(t.frame.shape, dtype=np.float32)
    for side in (0, 1):
        hx, hy = t.hilum[side]
        spread = rng.uniform(0.3, 0.42)
        batwing = np.exp(-(((t.x - hx) / spread) ** 2 + ((t.y - hy) / (1.3 * spread)) ** 2))
        haze = severity * batwing * lungs[side]
        aeration[side] *= 1.0 - haze
        mask = np.maximum(mask, ramp(batwing - 0.25, 0.1) * lungs[side])
    # Vascular redistribution: upper-zone vessels as prominent as the lower ones.
    hilum_y = 0.5 * (t.hilum[0][1] + t.hilum[1][1])
    upper = ramp(hilum_y - t.y, 0.4)
    layers.marking_gain = 1.0 + rng.uniform(0.5, 0.9) * upper
    for side in (0, 1):
        mask = np.maximum(mask, (upper > 0.05) * lungs[side])
    # Kerley B lines: short horizontal lines at the bases, reaching the pleura.
    starts, ends = [], []
    for side in (0, 1):
        inside = lungs[side] > 0.5
        lower = (t.y > 0.5 * (t.hilum[side][1] + t.base_y[side])) & inside
        rows = np.flatnonzero(lower.any(axis=1))
        if rows.size == 0:
            continue
        chosen = rng.choice(rows, size=min(rows.size, int(rng.integers(5, 11))), replace=False)
        row_mask = inside[chosen]
        if t.outward[side] < 0:
            edge_cols = row_mask.argmax(axis=1)
        else:
            edge_cols = row_mask.shape[1] - 1 - row_mask[:, ::-1].argmax(axis=1)
        lengths = rng.uniform(10.0, 20.0, chosen.size) * px_per_mm
        outer = edge_cols - t.outward[side] * 1.0
        inner = outer - t.outward[side] * lengths
        starts.append(np.stack([chosen, outer], axis=1))
        ends.append(np.stack([chosen, inner], axis=1))
    if starts:
        lines = segments_image(
            t.frame.shape, np.concatenate(starts), np.concatenate(ends), max(1.0, 1.2 * px_per_mm)
        )
        assert layers.opacity is not None
        layers.opacity += rng.uniform(0.03, 0.05) * lines
        mask = np.maximum(mask, (lines > 0).astype(np.float32))
    # The mask covers everything edema changes: the haze, the redistributed upper-zone vessels
    # and the Kerley lines.
    layers.masks["edema"] = mask


def _disc(
    shape: tuple[int, int], row: float, col: float, radius: float, lobulation: np.ndarray | None
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Normalised radius (distance / local radius) in a window around a round lesion."""
    span = math.ceil(radius * 1.3) + 2
    r0, r1 = max(int(row) - span, 0), min(int(row) + span + 1, shape[0])
    c0, c1 = max(int(col) - span, 0), min(int(col) + span + 1, shape[1])
    rr = np.arange(r0, r1, dtype=np.float32)[:, None] - row
    cc = np.arange(c0, c1, dtype=np.float32)[None, :] - col
    local = np.full(1, radius, dtype=np.float32)
    if lobulation is not None:
        theta = np.arctan2(rr, cc)
        local = radius * (1.0 + lobulation[0] * np.sin(lobulation[1] * theta + lobulation[2]))
    return (slice(r0, r1), slice(c0, c1)), np.hypot(rr, cc) / local


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> tuple[int, int] | None:
    flat = np.flatnonzero(candidates)
    if flat.size == 0:
        return None
    index = int(flat[int(rng.integers(0, flat.size))])
    return divmod(index, candidates.shape[1])


def _nodules(rng: np.random.Generator, t: Thorax, layers: Layers, px_per_mm: float) -> None:
    shape = t.frame.shape
    mask = np.zeros(shape, dtype=bool)
    assert layers.opacity is not None
    for _ in range(int(rng.integers(1, 5))):
        diameter = 5.0 + 25.0 * rng.uniform(0.0, 1.0) ** 1.5
        radius = 0.5 * diameter * px_per_mm
        side = int(rng.integers(0, 2))
        clear = t.margins[side] > radius / t.frame.pixels_per_unit + 0.03
        behind_rib = rng.random() < 0.5
        place = _pick(rng, clear & (t.ribs > 0.5)) if behind_rib else None
        place = place or _pick(rng, clear)
        if place is None:
            continue
        row = place[0] + rng.uniform(-0.5, 0.5)
        col = place[1] + rng.uniform(-0.5, 0.5)
        lobulation = np.array([rng.uniform(0.0, 0.12), rng.integers(3, 7), rng.uniform(0, 6.3)])
        window, dist = _disc(shape, row, col, radius, lobulation)
        # A sphere's projected thickness, slightly soft at its edge.
        profile = np.sqrt(np.clip(1.0 - dist**2, 0.0, 1.0)) + 0.15 * ramp(1.0 - dist, 0.2)
        amplitude = rng.uniform(0.045, 0.06) + 0.0025 * diameter
        layers.opacity[window] += amplitude * profile / 1.15
        region = np.zeros(shape, dtype=bool)
        region[window] = dist < 1.0
        if not region.any():
            continue
        mask |= region
        layers.boxes.append(("nodule", region))
    layers.masks["nodule"] = mask.astype(np.float32)


def _tuberculosis(
    rng: np.random.Generator,
    t: Thorax,
    lungs: list[np.ndarray],
    aeration: list[np.ndarray],
    layers: Layers,
    px_per_mm: float,
) -> None:
    shape = t.frame.shape
    mask = np.zeros(shape, dtype=np.float32)
    assert layers.opacity is not None
    sides = _sides(rng, 0.4)
    cavity_side = sides[int(rng.integers(0, len(sides)))] if rng.random() < 0.6 else None
    for side in sides:
        upper_limit = t.apex_y[side] + rng.uniform(0.4, 0.6) * (t.hilum[side][1] - t.apex_y[side])
        upper = ramp(upper_limit - t.y, 0.08) * lungs[side]
        field = smooth_field(rng, shape, 10)
        patch = ramp(field + rng.uniform(0.25, 0.55), 0.3) * upper
        aeration[side] *= 1.0 - rng.uniform(0.5, 0.75) * patch
        region = patch.copy()
        # Acinar nodules clustered in the diseased upper zone.
        for _ in range(int(rng.integers(6, 15))):
            place = _pick(rng, patch > 0.3)
            if place is None:
                break
            radius = 0.5 * rng.uniform(2.0, 6.0) * px_per_mm
            window, dist = _disc(shape, place[0], place[1], max(radius, 0.8), None)
            layers.opacity[window] += 0.04 * np.sqrt(np.clip(1.0 - dist**2, 0.0, 1.0))
        # Fibrotic streaks pulling towards the hilum.
        hilum_row, hilum_col = t.frame.to_pixel(
            np.float32(t.hilum[side][0]), np.float32(t.hilum[side][1])
        )
        starts = []
        for _ in range(int(rng.integers(2, 5))):
            place = _pick(rng, patch > 0.5)
            if place is not None:
                starts.append(place)
        if starts:
            begin = np.array(starts, dtype=np.float64)
            toward = np.array([hilum_row, hilum_col], dtype=np.float64) - begin
            end = begin + toward * rng.uniform(0.25, 0.5, (len(starts), 1))
            streaks = segments_image(shape, begin, end, max(1.0, 1.5 * px_per_mm))
            layers.opacity += 0.03 * streaks * upper
        if side == cavity_side:
            place = _pick(rng, upper > 0.9)
            if place is not None:
                outer = 0.5 * rng.uniform(16.0, 40.0) * px_per_mm
                wall = rng.uniform(2.5, 5.0) * px_per_mm
                window, dist = _disc(shape, place[0], place[1], outer, None)
                radius_px = dist * outer
                ring = ramp(outer - radius_px, 1.5) * ramp(radius_px - (outer - wall), 1.5)
                cavity = ramp(outer - wall - radius_px, 1.5)
                aeration[side][window] = np.maximum(aeration[side][window], cavity)
                aeration[side][window] *= 1.0 - 0.7 * ring
                layers.opacity[window] += 0.03 * ring - 0.02 * cavity
                region[window] = np.maximum(region[window], ramp(outer - radius_px, 1.5))
        layers.boxes.append(("tuberculosis", region > 0.5))
        mask = np.maximum(mask, region)
    layers.masks["tuberculosis"] = mask


def _tube(rng: np.random.Generator, t: Thorax, layers: Layers, px_per_mm: float) -> None:
    frame = t.frame
    assert layers.opacity is not None
    units_per_mm = px_per_mm / frame.pixels_per_unit
    if rng.random() < 0.6 or not t.central_line:
        # Endotracheal tube: down the trachea, tip normally 3..7 cm above the carina.
        cx, cy = t.carina
        above = rng.uniform(30.0, 70.0) if rng.random() < 0.85 else rng.uniform(-10.0, 15.0)
        tip_y = cy - above * units_per_mm
        top_x, top_y = t.trachea_top
        slope = (cx - top_x) / (cy - top_y)
        ys = np.linspace(top_y, tip_y, 24)
        xs = top_x + slope * (ys - top_y) + rng.uniform(-0.01, 0.01)
        rows, cols = frame.to_pixel(xs, ys)
        width = rng.uniform(9.0, 11.0) * px_per_mm
        centre = line_image(frame.shape, rows, cols, width)
        points = resample_polyline(rows, cols, 1.0)
        direction = points[-1] - points[0]
        normal = np.array([-direction[1], direction[0]]) / np.hypot(*direction)
        walls = sum(
            line_image(
                frame.shape, rows + s * normal[0] * width / 2, cols + s * normal[1] * width / 2, 1.5
            )
            for s in (-1.0, 1.0)
        )
        stripe_side = 1.0 if rng.random() < 0.5 else -1.0
        stripe = line_image(
            frame.shape,
            rows + stripe_side * normal[0] * width / 3,
            cols + stripe_side * normal[1] * width / 3,
            max(1.0, 1.0 * px_per_mm),
        )
        layers.opacity += 0.02 * walls + rng.uniform(0.08, 0.14) * stripe + 0.005 * centre
        tube_mask = centre > 0.3
        tip = (float(rows[-1]), float(cols[-1]))
    else:
        names = sorted(t.central_line)
        path = np.array(t.central_line[names[int(rng.integers(0, len(names)))]], dtype=np.float64)
        path = path + rng.normal(0.0, 0.015, path.shape)
        path[-1, 1] += rng.uniform(-25.0, 20.0) * units_per_mm
        smooth = chaikin(path, 3)
        rows, cols = frame.to_pixel(smooth[:, 0], smooth[:, 1])
        width = max(1.2, rng.uniform(2.0, 3.0) * px_per_mm)
        line = line_image(frame.shape, rows, cols, width)
        layers.opacity += rng.uniform(0.08, 0.13) * line
        tube_mask = line > 0.3
        tip = (float(rows[-1]), float(cols[-1]))
    layers.masks["tube"] = tube_mask.astype(np.float32)
    layers.landmarks["tube_tip"] = tip
