"""Chest CT anatomy in patient millimetres, rendered to Hounsfield units with numpy only.

Coordinates are DICOM patient coordinates (LPS): x grows to the patient's left, y towards the
back, z towards the head; the carina sits at z = 0. Large structures (body wall, lungs,
mediastinum, heart, spine, diaphragm) are implicit functions evaluated at voxel centres; small
ones (airways, vessels, nodules) are tapered capsules and ellipsoids rasterised inside their
bounding boxes with sub-samples across the slice thickness, so thick slices show partial volume.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np

AIR_HU = -1000.0
FAT_HU = -95.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0
LUNG_HU = -850.0
BONE_HU = 650.0
MARROW_HU = 220.0
LIVER_HU = 58.0


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a series: x (columns), y (rows), z (slices) in mm, and sub-slice
    offsets that sample the slice thickness."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    pixel_spacing: float
    thickness: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)

    @property
    def sub_offsets(self) -> np.ndarray:
        """Offsets along z (mm) that average a structure over the slice thickness."""
        count = int(min(4, max(1, round(self.thickness / max(self.pixel_spacing, 1.0)))))
        return ((np.arange(count) + 0.5) / count - 0.5) * self.thickness


@dataclass(frozen=True)
class Anatomy:
    """One random patient."""

    body_a: float  # lateral semi-axis of the trunk
    body_b: float  # antero-posterior semi-axis
    fat: float  # subcutaneous fat thickness
    muscle: float  # chest-wall muscle thickness
    spine_r: float
    mediastinum: float  # half-width of the upper mediastinum
    heart: tuple[float, float, float, float, float, float]  # centre x, y, z, radii x, y, z
    dome: tuple[float, float]  # diaphragm dome height, right and left
    recess: float  # how far the costophrenic recesses sink below the dome
    apex: float  # lung apex height
    trachea_r: float
    gas_bubble: bool
    rib_pitch: float
    rib_phase: float

    @property
    def cavity(self) -> tuple[float, float]:
        """Semi-axes of the thoracic cavity (inside ribs)."""
        wall = self.fat + self.muscle + 6.0
        return self.body_a - wall, self.body_b - wall

    @property
    def spine_y(self) -> float:
        return self.cavity[1] - self.spine_r - 2.0

    @property
    def trachea_y(self) -> float:
        return self.spine_y - self.spine_r - self.trachea_r - 12.0

    def lung_centre(self, side: int) -> tuple[float, float]:
        """Centre (x, y) of one lung's cross-section; side -1 is the right lung (x < 0)."""
        a, b = self.cavity
        return side * (self.mediastinum + 0.45 * (a - self.mediastinum)), 0.1 * b


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    body_a = rng.uniform(145.0, 178.0)
    dome_right = rng.uniform(-125.0, -95.0)
    return Anatomy(
        body_a=body_a,
        body_b=rng.uniform(0.68, 0.78) * body_a,
        fat=rng.uniform(5.0, 20.0),
        muscle=rng.uniform(7.0, 13.0),
        spine_r=rng.uniform(15.0, 19.0),
        mediastinum=rng.uniform(17.0, 24.0),
        heart=(
            rng.uniform(18.0, 32.0),
            rng.uniform(-35.0, -20.0),
            dome_right + rng.uniform(35.0, 50.0),
            rng.uniform(52.0, 64.0),
            rng.uniform(42.0, 52.0),
            rng.uniform(45.0, 58.0),
        ),
        dome=(dome_right, dome_right - rng.uniform(5.0, 20.0)),
        recess=rng.uniform(35.0, 55.0),
        apex=rng.uniform(65.0, 85.0),
        trachea_r=rng.uniform(7.5, 10.0),
        gas_bubble=bool(rng.random() < 0.5),
        rib_pitch=rng.uniform(26.0, 32.0),
        rib_phase=rng.uniform(0.0, 1.0),
    )


def _ellipse(x, y, cx, cy, a, b):
    """Normalised elliptic radius (1 on the boundary)."""
    return np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)


def lung_margin(a: Anatomy, side: int, x, y, z) -> np.ndarray:
    """Signed margin in about mm of one lung (positive inside), broadcast over x, y, z."""
    ca, cb = a.cavity
    cavity = (1.0 - _ellipse(x, y, 0.0, 0.0, ca, cb)) * min(ca, cb)
    medial = side * x - a.mediastinum - 6.0 * np.clip((-y - 0.3 * cb) / cb, 0.0, 1.0) * 3.0
    spine = np.sqrt(x**2 + (y - a.spine_y) ** 2) - (a.spine_r + 10.0)
    hx, hy, hz, rx, ry, rz = a.heart
    heart = np.sqrt(((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2 + ((z - hz) / rz) ** 2) - 1.0
    heart = heart * min(rx, ry) - 3.0
    lx, ly = a.lung_centre(side)
    spread = ((x - lx) / (0.55 * ca)) ** 2 + ((y - ly) / cb) ** 2
    dome = a.dome[0 if side < 0 else 1]
    diaphragm = z - (dome - a.recess * np.clip(spread, 0.0, 1.6) - 12.0 * np.clip(y / cb, 0, 1))
    # Towards the apex the cross-section shrinks to a cone around the lung centre.
    taper = np.sqrt(np.clip((a.apex - z) / 55.0, 0.0, 1.0))
    apex = (2.0 * taper - _ellipse(x, y, lx, ly + 0.2 * cb, 0.5 * ca, 0.75 * cb)) * 40.0
    return np.minimum.reduce(np.broadcast_arrays(cavity, medial, spine, heart, diaphragm, apex))


def lung_margin_both(a: Anatomy, x, y, z) -> np.ndarray:
    """Margin of either lung (positive inside one of them)."""
    return np.maximum(lung_margin(a, -1, x, y, z), lung_margin(a, 1, x, y, z))


def smooth_field(rng: np.random.Generator, grid: Grid, cell_mm: float) -> np.ndarray:
    """Random field in about -1..1 varying over ``cell_mm``: a coarse grid upsampled trilinearly."""

    def axis(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        pos = (coords - coords.min()) / cell_mm
        cells = math.floor(pos.max()) + 2
        i0 = np.minimum(pos.astype(int), cells - 2)
        return i0, (pos - i0).astype(np.float32), cells

    (zi, zf, nz), (yi, yf, ny), (xi, xf, nx) = axis(grid.z), axis(grid.y), axis(grid.x)
    coarse = rng.uniform(-1.0, 1.0, (nz, ny, nx)).astype(np.float32)
    out = coarse[:, :, xi] * (1 - xf) + coarse[:, :, xi + 1] * xf
    out = out[:, yi, :] * (1 - yf)[:, None] + out[:, yi + 1, :] * yf[:, None]
    return out[zi] * (1 - zf)[:, None, None] + out[zi + 1] * zf[:, None, None]


@dataclass
class Tube:
    """Tapered capsules: start and end points (n, 3) mm and radii at both ends."""

    start: np.ndarray
    end: np.ndarray
    r0: np.ndarray
    r1: np.ndarray


def _grow_tree(
    rng: np.random.Generator,
    a: Anatomy,
    roots: list[tuple[np.ndarray, np.ndarray, float, float]],
    generations: int,
    spread: tuple[float, float],
    shrink: tuple[float, float],
    min_radius: float,
    tries: int = 6,
) -> Tube:
    """Branching tree from ``roots`` (point, direction, radius, length): every branch splits in
    two children turning opposite ways; a child that would leave the lungs tries other turns
    (``tries`` in all) and is dropped if none stays inside, so the tree fills the lungs."""
    point = np.array([r[0] for r in roots], float)
    direction = np.array([r[1] for r in roots], float)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = np.array([r[2] for r in roots], float)
    length = np.array([r[3] for r in roots], float)
    starts, ends, r0s, r1s = [], [], [], []
    for generation in range(generations):
        n = point.shape[0]
        if n == 0:
            break
        end = point + direction * length[:, None]
        child_r = radius * rng.uniform(*shrink, n)
        starts.append(point)
        ends.append(end)
        r0s.append(radius)
        r1s.append(np.maximum(child_r, min_radius * 0.8))
        grow = child_r >= min_radius
        if generation == generations - 1 or not grow.any():
            break
        end, direction, child_r = end[grow], direction[grow], child_r[grow]
        child_length = length[grow] * rng.uniform(0.72, 0.9, grow.sum())
        m = end.shape[0]
        # Candidates (branch, sign, try): turn by an angle within a random plane.
        normal = np.cross(direction[:, None, None, :], rng.normal(size=(m, 2, tries, 3)))
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        angle = rng.uniform(*spread, (m, 2, tries)) * (1.0 + 0.3 * np.arange(tries))
        sign = np.array([-1.0, 1.0])[None, :, None, None]
        child = (
            np.cos(angle)[..., None] * direction[:, None, None, :]
            + sign * np.sin(angle)[..., None] * normal
        )
        child /= np.linalg.norm(child, axis=-1, keepdims=True)
        tip = end[:, None, None, :] + child * child_length[:, None, None, None]
        ok = lung_margin_both(a, tip[..., 0], tip[..., 1], tip[..., 2]) > 1.0
        first = np.argmax(ok, axis=2)  # first acceptable try per (branch, sign)
        keep = ok.any(axis=2)
        b_idx, s_idx = np.nonzero(keep)
        t_idx = first[b_idx, s_idx]
        point = end[b_idx]
        direction = child[b_idx, s_idx, t_idx]
        radius = child_r[b_idx]
        length = child_length[b_idx]
    if not starts:
        empty = np.zeros((0, 3))
        return Tube(empty, empty, np.zeros(0), np.zeros(0))
    return Tube(
        np.concatenate(starts), np.concatenate(ends), np.concatenate(r0s), np.concatenate(r1s)
    )


def vessel_tree(rng: np.random.Generator, a: Anatomy) -> Tube:
    """Pulmonary vessels: several trees per hilum, tapering towards the pleura."""
    roots = []
    for side in (-1, 1):
        hx = side * (a.mediastinum + rng.uniform(14.0, 22.0))
        hy = rng.uniform(-5.0, 10.0)
        hz = rng.uniform(-35.0, -15.0)
        for _ in range(int(rng.integers(8, 12))):
            direction = np.array(
                [side * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-1.2, 1.2)]
            )
            start = np.array([hx, hy, hz]) + rng.normal(0, 5.0, 3)
            roots.append((start, direction, rng.uniform(3.5, 5.5), rng.uniform(22.0, 32.0)))
    return _grow_tree(rng, a, roots, 9, (0.35, 0.7), (0.7, 0.8), 0.5)


def airway_tree(rng: np.random.Generator, a: Anatomy, top_z: float) -> tuple[Tube, Tube]:
    """Trachea and main bronchi (central, outside the lungs) and intrapulmonary bronchi."""
    ty = a.trachea_y
    carina = np.array([0.0, ty, 0.0])
    right = np.array([-(a.mediastinum + 18.0), ty + 8.0, -22.0])
    left = np.array([a.mediastinum + 22.0, ty + 10.0, -42.0])
    central = Tube(
        np.array([[0.0, ty, max(top_z, 0.0) + 20.0], carina, carina]),
        np.array([carina, right, left]),
        np.array([a.trachea_r, 0.8 * a.trachea_r, 0.72 * a.trachea_r]),
        np.array([a.trachea_r, 0.72 * a.trachea_r, 0.65 * a.trachea_r]),
    )
    roots = []
    for point, side in ((right, -1), (left, 1)):
        for _ in range(3):
            direction = np.array(
                [side * rng.uniform(0.3, 0.8), rng.uniform(-0.6, 0.6), rng.uniform(-1.0, 1.0)]
            )
            roots.append((point, direction, rng.uniform(4.0, 5.0), rng.uniform(22.0, 30.0)))
    return central, _grow_tree(rng, a, roots, 4, (0.35, 0.6), (0.7, 0.8), 1.6)


def rasterise_tubes(grid: Grid, tubes: Tube, wall: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume fractions (0..1) of the tubes' lumen and, for ``wall`` > 0, of a wall of
    that thickness around it; both (slices, rows, cols) float32."""
    lumen = np.zeros(grid.shape, np.float32)
    shell = np.zeros(grid.shape, np.float32) if wall > 0 else lumen
    ps = grid.pixel_spacing
    offsets = grid.sub_offsets
    # The grid's coordinates ascend: a tube's box is a slice along each axis, found by
    # bisection (a vessel tree has thousands of small tubes; per tube, masks and fancy
    # indexing cost more than the arithmetic).
    slab_top = (grid.z + grid.thickness / 2).tolist()
    slab_bottom = (grid.z - grid.thickness / 2).tolist()
    ys, xs = grid.y.tolist(), grid.x.tolist()
    for p0, p1, r0, r1 in zip(tubes.start, tubes.end, tubes.r0, tubes.r1, strict=True):
        reach = max(r0, r1) + wall + ps
        low = (np.minimum(p0, p1) - reach).tolist()
        high = (np.maximum(p0, p1) + reach).tolist()
        k = slice(bisect_left(slab_top, low[2]), bisect_right(slab_bottom, high[2]))
        i = slice(bisect_left(ys, low[1]), bisect_right(ys, high[1]))
        j = slice(bisect_left(xs, low[0]), bisect_right(xs, high[0]))
        if k.start >= k.stop or i.start >= i.stop or j.start >= j.stop:
            continue
        z = grid.z[k][:, None, None, None] + offsets[None, :, None, None]
        y = grid.y[i][None, None, :, None]
        x = grid.x[j][None, None, None, :]
        axis = p1 - p0
        length2 = float(axis @ axis) or 1e-9
        t = np.clip(
            ((x - p0[0]) * axis[0] + (y - p0[1]) * axis[1] + (z - p0[2]) * axis[2]) / length2,
            0.0,
            1.0,
        )
        d = np.sqrt(
            (x - p0[0] - t * axis[0]) ** 2
            + (y - p0[1] - t * axis[1]) ** 2
            + (z - p0[2] - t * axis[2]) ** 2
        )
        radius = r0 + (r1 - r0) * t
        # Vessels thinner than a pixel are dimmer rather than thinner.
        gain = min(1.0, 2.0 * max(r0, r1) / ps)
        inner = radius - d
        inner /= ps
        inner += 0.5
        np.clip(inner, 0.0, 1.0, out=inner)
        inner *= gain
        inner = inner.mean(axis=1)
        block = lumen[k, i, j]
        np.maximum(block, inner, out=block)
        if wall > 0:
            outer = np.clip((radius + wall - d) / ps + 0.5, 0.0, 1.0).mean(axis=1)
            block = shell[k, i, j]
            np.maximum(block, outer, out=block)
    return lumen, shell


@dataclass(frozen=True)
class NoduleSpec:
    """A nodule to draw: centre (x, y, z) mm, diameter, composition and shape."""

    centre: tuple[float, float, float]
    diameter: float
    kind: str  # solid, part-solid, ground-glass
    location: str  # free, juxtapleural, juxtavascular
    solid_hu: float
    glass_hu: float
    axes: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]
    lobulation: tuple[float, float, float]  # amplitude, two phases


def rasterise_nodule(grid: Grid, nodule: NoduleSpec) -> tuple[tuple, np.ndarray, np.ndarray]:
    """(index block, whole-nodule fraction, solid-part fraction) over the nodule's box."""
    radius = nodule.diameter / 2.0
    reach = radius * 1.3 + grid.pixel_spacing
    cx, cy, cz = nodule.centre
    k = np.flatnonzero(np.abs(grid.z - cz) <= reach + grid.thickness / 2)
    i = np.flatnonzero(np.abs(grid.y - cy) <= reach)
    j = np.flatnonzero(np.abs(grid.x - cx) <= reach)
    if k.size == 0 or i.size == 0 or j.size == 0:
        empty = np.zeros((k.size, i.size, j.size), np.float32)
        return np.ix_(k, i, j), empty, empty
    z = grid.z[k][:, None, None, None] + grid.sub_offsets[None, :, None, None] - cz
    y = grid.y[i][None, None, :, None] - cy
    x = grid.x[j][None, None, None, :] - cx
    rot = np.asarray(nodule.rotation)
    q = [(rot[m, 0] * x + rot[m, 1] * y + rot[m, 2] * z) / nodule.axes[m] for m in range(3)]
    rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    amplitude, phase_a, phase_b = nodule.lobulation
    azimuth = np.arctan2(q[1], q[0])
    elevation = np.arctan2(q[2], np.sqrt(q[0] ** 2 + q[1] ** 2) + 1e-6)
    lobes = 1.0 + amplitude * np.cos(3 * azimuth + phase_a) * np.cos(2 * elevation + phase_b)
    edge = grid.pixel_spacing * 0.7
    whole = np.clip((radius * lobes - rho) / edge + 0.5, 0.0, 1.0).mean(axis=1)
    if nodule.kind == "solid":
        solid = whole
    elif nodule.kind == "part-solid":
        solid = np.clip((0.5 * radius * lobes - rho) / edge + 0.5, 0.0, 1.0).mean(axis=1)
    else:
        solid = np.zeros_like(whole)
    return np.ix_(k, i, j), whole.astype(np.float32), solid.astype(np.float32)


def _ribs(a: Anatomy, x, y, z) -> np.ndarray:
    """Bone fraction of ribs, costal cartilage excluded, and the sternum."""
    ca, cb = a.cavity
    ring = _ellipse(x, y, 0.0, 0.0, ca + 5.0, cb + 5.0)
    band = np.clip((0.06 - np.abs(ring - 1.0)) / 0.02, 0.0, 1.0)
    angle = np.arctan2(-y, np.abs(x))  # 0 lateral, +pi/2 anterior, -pi/2 posterior
    # Ribs descend from the spine round to the front.
    phase = (z + 45.0 * np.sin(angle)) / a.rib_pitch + a.rib_phase
    rib = np.clip((0.18 - np.abs(phase - np.round(phase))) / 0.05, 0.0, 1.0)
    lateral = np.clip((np.abs(x) / ca - 0.25) / 0.1, 0.0, 1.0) + np.clip(y / cb, 0.0, 1.0)
    ribs = band * rib * np.clip(lateral, 0.0, 1.0)
    sternum = (
        np.clip((14.0 - np.abs(x)) / 2.0, 0, 1)
        * np.clip((5.0 - np.abs(y + cb + 4.0)) / 1.5, 0, 1)
        * (z > a.heart[2] - 40.0)
    )
    return np.maximum(ribs, sternum)


def _blend(volume: np.ndarray, value, *weights) -> None:
    """``volume = volume + (value - volume) * w1 * w2 ...`` in place (``volume`` of the
    result's shape and type): the same values, fewer temporaries."""
    step = value - volume
    for weight in weights:
        step *= weight
    volume += step


def render(
    rng: np.random.Generator,
    a: Anatomy,
    grid: Grid,
    vessels: Tube,
    airways: tuple[Tube, Tube],
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU volume (slices, rows, cols) float32 and the lung mask (bool)."""
    z = grid.z[:, None, None].astype(np.float32)
    y = grid.y[None, :, None].astype(np.float32)
    x = grid.x[None, None, :].astype(np.float32)
    shape = grid.shape
    # Shoulders widen the trunk near the top of the chest.
    widen = 1.0 + 0.1 * np.clip((z - 30.0) / 80.0, 0.0, 1.0)
    body_r = _ellipse(x, y, 0.0, 0.0, a.body_a * widen, a.body_b)
    scale = min(a.body_a, a.body_b)
    body = np.clip((1.0 - body_r) * scale / 1.5 + 0.5, 0.0, 1.0)
    fat_depth = (1.0 - body_r) * scale
    fat_field = smooth_field(rng, grid, 30.0)
    muscle = np.clip((fat_depth - a.fat * (1 + 0.3 * fat_field)) / 2.0, 0.0, 1.0)
    # float64: the soft tissue below is (np.where gives float64), and so was every sum with
    # it; built in place (a volume is ~25 MB, each temporary a page-faulted allocation).
    hu = np.full(shape, AIR_HU, np.float64)
    soft = FAT_HU + (MUSCLE_HU - FAT_HU) * muscle
    # Mediastinal and abdominal fat planes between organs.
    ca, cb = a.cavity
    cavity_r = _ellipse(x, y, 0.0, 0.0, ca, cb)
    inside_cavity = np.clip((1.0 - cavity_r) * scale / 2.0 + 0.5, 0.0, 1.0)
    organ = 20.0 + 25.0 * fat_field
    soft = soft * (1 - inside_cavity) + organ * inside_cavity
    hx, hy, hz, rx, ry, rz = a.heart
    heart_r = np.sqrt(((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2 + ((z - hz) / rz) ** 2)
    heart = np.clip((1.0 - heart_r) * min(rx, ry) / 2.0 + 0.5, 0.0, 1.0)
    _blend(soft, BLOOD_HU, heart)
    aorta = np.clip((11.0 - np.sqrt((x - 22.0) ** 2 + (y - a.spine_y + 22.0) ** 2)) / 1.5, 0, 1)
    _blend(soft, BLOOD_HU, aorta, z < 10.0)
    # Abdomen under the domes: liver on the right, spleen/stomach on the left.
    below = np.clip(((a.dome[0] + a.dome[1]) / 2 - z) / 10.0, 0.0, 1.0) * inside_cavity
    soft = soft.astype(np.float64)  # as the sum with np.where's float64 made it
    _blend(soft, np.where(x < 10.0, LIVER_HU, 35.0), below)
    _blend(hu, soft, body)
    # Spine: cortical shell, marrow, spinal canal.
    spine_d = np.sqrt(x**2 + (y - a.spine_y) ** 2)
    cortex = np.clip((a.spine_r - spine_d) / 1.5 + 0.5, 0.0, 1.0)
    marrow = np.clip((a.spine_r - 3.0 - spine_d) / 1.5 + 0.5, 0.0, 1.0)
    _blend(hu, BONE_HU, cortex)
    _blend(hu, MARROW_HU, marrow)
    arch = (
        np.clip((6.0 - np.abs(x)) / 1.5, 0, 1)
        * np.clip((y - a.spine_y - a.spine_r) / 2.0, 0, 1)
        * np.clip((a.spine_y + a.spine_r + 35.0 - y) / 2.0, 0, 1)
    )
    _blend(hu, BONE_HU * 0.7, arch)
    _blend(hu, BONE_HU, _ribs(a, x, y, z), body)
    # Lungs: textured parenchyma, denser towards the back (dependent lung).
    margin = lung_margin_both(a, x, y, z)
    lung = np.clip(margin / 1.5 + 0.5, 0.0, 1.0)
    texture = 28.0 * smooth_field(rng, grid, 22.0) + 14.0 * smooth_field(rng, grid, 7.0)
    dependent = 45.0 * np.clip((y + 0.2 * cb) / cb, 0.0, 1.0)
    parenchyma = LUNG_HU + texture + dependent
    _blend(hu, parenchyma, lung)
    if a.gas_bubble:
        gas = np.sqrt(
            ((x - 0.45 * ca) / 40.0) ** 2
            + ((y + 0.2 * cb) / 28.0) ** 2
            + ((z - a.dome[1] + 45.0) / 22.0) ** 2
        )
        gas = np.clip((1.0 - gas) * 22.0 / 1.5 + 0.5, 0, 1) * (z < a.dome[1] - 15.0)
        _blend(hu, AIR_HU, gas)
    lumen_v, _ = rasterise_tubes(grid, vessels)
    lumen_v *= lung > 0.0
    _blend(hu, BLOOD_HU + 10.0, lumen_v)
    central, bronchi = airways
    for tube, wall in ((central, 2.0), (bronchi, 1.2)):
        lumen_a, shell_a = rasterise_tubes(grid, tube, wall)
        if tube is bronchi:
            lumen_a *= lung > 0.0
            shell_a *= lung > 0.0
        _blend(hu, MUSCLE_HU, shell_a)
        _blend(hu, AIR_HU, lumen_a)
        if tube is central:
            central_lumen = lumen_a
    table_y = a.body_b + 8.0
    table = np.clip((4.0 - np.abs(y - table_y)) / 1.0, 0, 1) * (np.abs(x) < 210.0)
    _blend(hu, -150.0, table, 1 - body)
    lung_mask = (margin > 0.0) & (central_lumen < 0.5)
    return hu.astype(np.float32), np.broadcast_to(lung_mask, shape).copy()


def add_noise(rng: np.random.Generator, hu: np.ndarray, sigma: float) -> np.ndarray:
    """Correlated in-plane quantum noise of standard deviation ``sigma`` HU."""
    if sigma <= 0:
        return hu
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    for axis in (1, 2):
        noise = (np.roll(noise, 1, axis) + 2 * noise + np.roll(noise, -1, axis)) / 4.0
    return hu + noise * np.float32(sigma / 0.375)
