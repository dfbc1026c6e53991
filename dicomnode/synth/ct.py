"""Synthetic chest CT series (phantoms) with pulmonary nodules, as CT Image Storage DICOM.

One series is a stack of axial slices (one file each) of a random patient: body wall with fat and
muscle, ribs, spine, mediastinum and heart, lungs of textured parenchyma with branching vessels
and airways, and 3 to 30 mm nodules (solid, part-solid, ground-glass; some touching the pleura or
a vessel). Pixel values are HU + 1024 (Rescale Intercept -1024); the window is a lung window.

Ground truth, per series, is :class:`CtTruth` (in memory) or one line of ``ground_truth.jsonl``
with a ``truth/<series>.npz`` of masks (on disk), read back with :func:`read_truth`.

``ground_truth.jsonl`` schema (one JSON object per series)::

    {"series_dir": "ct_00000001",            # folder of the slices, relative to the data set
     "seed": 1, "study_instance_uid": "...", "series_instance_uid": "...",
     "patient_id": "...", "slices": 64, "rows": 256, "columns": 256,
     "slice_thickness_mm": 2.5, "spacing_between_slices_mm": 2.5,
     "pixel_spacing_mm": 1.5,               # rows and columns alike
     "noise_hu": 20.0,                      # standard deviation of the added noise
     "nodules": [{"center_voxel": [slice, row, col],   # float, slice = file index (0-based,
                  "center_mm": [x, y, z],              #   InstanceNumber - 1), patient LPS mm
                  "diameter_mm": 8.2, "kind": "solid|part-solid|ground-glass",
                  "location": "free|juxtapleural|juxtavascular", "label": 1}],
     "masks": "truth/ct_00000001.npz"}      # keys "lung" (slices, rows, cols) bool and
                                            # "nodules" (slices, rows, cols) uint8, 0 = none,
                                            # k = the nodule with "label" k
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from dicomnode.synth.ct_anatomy import (
    Anatomy,
    Grid,
    NoduleSpec,
    Tube,
    add_noise,
    airway_tree,
    lung_margin_both,
    random_anatomy,
    rasterise_nodule,
    render,
    vessel_tree,
)
from dicomnode.synth.header import phantom_header

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024
BITS_STORED = 12
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width
SLICE_THICKNESSES = (1.0, 1.25, 2.5, 5.0)
# Noise standard deviation (HU) at 2.5 mm slices; thinner slices are noisier.
DOSE_NOISE_HU = {"standard": 18.0, "low": 55.0}
NODULE_KINDS = ("solid", "part-solid", "ground-glass")
NODULE_LOCATIONS = ("free", "juxtapleural", "juxtavascular")

_UID_NAMESPACE = "dicomnode/synth/ct/v1"


@dataclass(frozen=True)
class CtNodule:
    """One nodule: centre as (slice, row, col) voxel and (x, y, z) patient mm, its diameter,
    composition, location and its label in the nodule mask."""

    center_voxel: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str
    location: str
    label: int

    def as_json(self) -> dict:
        return {
            "center_voxel": list(self.center_voxel),
            "center_mm": list(self.center_mm),
            "diameter_mm": self.diameter_mm,
            "kind": self.kind,
            "location": self.location,
            "label": self.label,
        }

    @classmethod
    def from_json(cls, value: dict) -> CtNodule:
        return cls(
            center_voxel=tuple(value["center_voxel"]),
            center_mm=tuple(value["center_mm"]),
            diameter_mm=float(value["diameter_mm"]),
            kind=value.get("kind", "solid"),
            location=value.get("location", "free"),
            label=int(value.get("label", 0)),
        )


@dataclass(frozen=True)
class CtTruth:
    """Ground truth of one series. Masks are (slices, rows, cols) in file order."""

    nodules: tuple[CtNodule, ...]
    slice_thickness_mm: float
    spacing_between_slices_mm: float
    pixel_spacing_mm: float
    noise_hu: float
    lung: np.ndarray = field(compare=False, repr=False)
    nodule_labels: np.ndarray = field(compare=False, repr=False)


@dataclass(frozen=True)
class CtRecord:
    """One line of ``ground_truth.jsonl`` with its paths resolved against the data set."""

    folder: Path  # the series' slice folder
    seed: int
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    slices: int
    rows: int
    columns: int
    slice_thickness_mm: float
    spacing_between_slices_mm: float
    pixel_spacing_mm: float
    noise_hu: float
    nodules: tuple[CtNodule, ...]
    masks: Path

    def load_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(lung bool, nodule labels uint8), both (slices, rows, cols)."""
        with np.load(self.masks) as data:
            return data["lung"].astype(bool), data["nodules"]

    def slice_paths(self) -> list[Path]:
        """The slice files in file (slice index) order."""
        return sorted(self.folder.glob("*.dcm"))


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=[json.dumps([_UID_NAMESPACE, *parts])]))


def _random_rotation(rng: np.random.Generator) -> tuple[tuple[float, float, float], ...]:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return tuple(tuple(float(v) for v in row) for row in q)


def _inside_all_around(a: Anatomy, centre: np.ndarray, radius: float, need: float) -> bool:
    """Whether points ``radius`` away from ``centre`` in 26 directions all have lung margin
    of at least ``need`` mm (the centre included)."""
    dirs = np.array(
        [
            (i, j, k)
            for i in (-1, 0, 1)
            for j in (-1, 0, 1)
            for k in (-1, 0, 1)
            if (i, j, k) != (0, 0, 0)
        ],
        float,
    )
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    points = np.vstack([centre, centre + radius * dirs])
    return bool(np.all(lung_margin_both(a, points[:, 0], points[:, 1], points[:, 2]) >= need))


def _place_nodules(
    rng: np.random.Generator,
    a: Anatomy,
    grid: Grid,
    vessels: Tube,
    count: int,
    diameter_range: tuple[float, float],
) -> list[NoduleSpec]:
    """Nodules inside the lungs and inside the scanned slab, not touching each other."""
    z_low, z_high = float(grid.z.min()), float(grid.z.max())
    x_span, y_span = (grid.x.min(), grid.x.max()), (grid.y.min(), grid.y.max())
    placed: list[NoduleSpec] = []
    thick = vessels.r0 >= 1.5
    for _ in range(count):
        # Small nodules are the common ones: log-uniform diameters.
        diameter = float(math.exp(rng.uniform(*np.log(diameter_range))))
        radius = diameter / 2.0
        kind = str(rng.choice(NODULE_KINDS, p=[0.7, 0.15, 0.15]))
        location = str(rng.choice(NODULE_LOCATIONS, p=[0.5, 0.25, 0.25]))
        for _attempt in range(300):
            if location == "juxtavascular" and thick.any():
                index = rng.choice(np.flatnonzero(thick))
                t = rng.uniform(0.2, 0.8)
                point = vessels.start[index] + t * (vessels.end[index] - vessels.start[index])
                axis = vessels.end[index] - vessels.start[index]
                perp = np.cross(axis, rng.normal(size=3))
                perp /= np.linalg.norm(perp)
                vessel_r = vessels.r0[index] + t * (vessels.r1[index] - vessels.r0[index])
                centre = point + perp * (vessel_r + 0.75 * radius)
                ok = _inside_all_around(a, centre, radius, 0.5)
            elif location == "juxtapleural":
                start = np.array(
                    [rng.uniform(*x_span), rng.uniform(*y_span), rng.uniform(z_low, z_high)]
                )
                if lung_margin_both(a, *start) < radius + 3.0:
                    continue
                direction = rng.normal(size=3)
                direction[2] *= 0.3
                direction /= np.linalg.norm(direction)
                steps = np.arange(0.0, 250.0, 1.0)
                ray = start[None, :] + steps[:, None] * direction[None, :]
                outside = np.flatnonzero(lung_margin_both(a, ray[:, 0], ray[:, 1], ray[:, 2]) < 0)
                if outside.size == 0:
                    continue
                centre = ray[outside[0]] - direction * (0.7 * radius)
                ok = float(lung_margin_both(a, *centre)) > 0.0
            else:
                centre = np.array(
                    [rng.uniform(*x_span), rng.uniform(*y_span), rng.uniform(z_low, z_high)]
                )
                ok = _inside_all_around(a, centre, radius, 1.0)
            if not ok or not z_low <= centre[2] <= z_high:
                continue
            if any(
                np.linalg.norm(centre - np.array(other.centre)) < radius + other.diameter / 2 + 3
                for other in placed
            ):
                continue
            placed.append(
                NoduleSpec(
                    centre=tuple(float(v) for v in centre),
                    diameter=diameter,
                    kind=kind,
                    location=location,
                    solid_hu=float(rng.uniform(5.0, 60.0)),
                    glass_hu=float(rng.uniform(-650.0, -450.0)),
                    axes=tuple(float(v) for v in rng.uniform(0.85, 1.15, 3)),
                    rotation=_random_rotation(rng),
                    lobulation=(
                        float(rng.uniform(0.0, 0.15)),
                        float(rng.uniform(0, 2 * np.pi)),
                        float(rng.uniform(0, 2 * np.pi)),
                    ),
                )
            )
            break
    return placed


def _draw_nodules(
    hu: np.ndarray, grid: Grid, nodules: list[NoduleSpec], lung: np.ndarray
) -> np.ndarray:
    """Blend the nodules into ``hu`` (in place); returns the uint8 label volume."""
    labels = np.zeros(hu.shape, np.uint8)
    for label, nodule in enumerate(nodules, start=1):
        block, whole, solid = rasterise_nodule(grid, nodule)
        if whole.size == 0:
            continue
        region = hu[block]
        texture = np.float32(nodule.solid_hu)
        glass = region + (nodule.glass_hu - region) * whole
        # Tissue never gets less dense where the nodule overlaps vessels or the chest wall.
        mixed = np.maximum(region, glass)
        mixed = np.maximum(mixed, mixed + (texture - mixed) * solid)
        hu[block] = mixed
        labels[block] = np.where(whole >= 0.5, label, labels[block])
        lung[block] |= whole >= 0.5
    return labels


def _noise_sigma(dose: str, noise_hu: float | None, thickness: float) -> float:
    if noise_hu is not None:
        if noise_hu < 0:
            raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
        return float(noise_hu)
    if dose not in DOSE_NOISE_HU:
        raise ValueError(f"dose must be one of {sorted(DOSE_NOISE_HU)}, not {dose!r}")
    return round(DOSE_NOISE_HU[dose] * math.sqrt(2.5 / thickness), 2)


def make_ct_volume(
    seed: int,
    *,
    rows: int = 256,
    slices: int = 64,
    slice_thickness: float = 2.5,
    dose: str = "standard",
    noise_hu: float | None = None,
    nodules: tuple[int, int] = (1, 4),
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0),
) -> tuple[np.ndarray, CtTruth, Grid]:
    """The HU volume (slices, rows, cols) float32, its truth and its voxel grid (no DICOM)."""
    if rows < 64:
        raise ValueError(f"rows must be at least 64, got {rows}")
    if slices < 1:
        raise ValueError(f"slices must be at least 1, got {slices}")
    if slice_thickness <= 0:
        raise ValueError(f"slice thickness must be positive, got {slice_thickness}")
    low_n, high_n = nodules
    low_d, high_d = nodule_diameter_mm
    if not 0 <= low_n <= high_n:
        raise ValueError(f"nodule count range must be 0 <= min <= max, got {nodules}")
    if not 0 < low_d <= high_d:
        raise ValueError(f"nodule diameter range must be 0 < min <= max, got {nodule_diameter_mm}")
    sigma = _noise_sigma(dose, noise_hu, slice_thickness)
    rng = np.random.default_rng([seed, 2])
    a = random_anatomy(rng)
    fov = round(2.0 * a.body_a * 1.1 + rng.uniform(20.0, 50.0), 1)
    pixel_spacing = round(fov / rows, 4)
    spacing = float(slice_thickness)
    # The slab is centred where the lungs are, wherever its length allows.
    length = (slices - 1) * spacing
    lung_low, lung_high = a.dome[0] - a.recess - 10.0, a.apex
    centre = (
        rng.uniform(lung_low + length / 2, lung_high - length / 2)
        if (length < lung_high - lung_low)
        else (lung_low + lung_high) / 2
    )
    z0 = round(float(centre - length / 2), 2)
    offset = rng.uniform(-8.0, 8.0, 2)
    origin = -fov / 2 + pixel_spacing / 2
    grid = Grid(
        x=(origin + offset[0] + pixel_spacing * np.arange(rows)).astype(np.float64),
        y=(origin + offset[1] + 0.12 * a.body_b + pixel_spacing * np.arange(rows)),
        z=z0 + spacing * np.arange(slices, dtype=np.float64),
        pixel_spacing=pixel_spacing,
        thickness=float(slice_thickness),
    )
    vessels = vessel_tree(rng, a)
    airways = airway_tree(rng, a, float(grid.z.max()))
    count = int(rng.integers(low_n, high_n + 1))
    placed = _place_nodules(rng, a, grid, vessels, count, (low_d, high_d))
    hu, lung = render(rng, a, grid, vessels, airways)
    labels = _draw_nodules(hu, grid, placed, lung)
    hu = add_noise(rng, hu, sigma)
    truth_nodules = tuple(
        CtNodule(
            center_voxel=(
                round((n.centre[2] - grid.z[0]) / spacing, 3),
                round((n.centre[1] - grid.y[0]) / pixel_spacing, 3),
                round((n.centre[0] - grid.x[0]) / pixel_spacing, 3),
            ),
            center_mm=tuple(round(v, 3) for v in n.centre),
            diameter_mm=round(n.diameter, 3),
            kind=n.kind,
            location=n.location,
            label=index,
        )
        for index, n in enumerate(placed, start=1)
    )
    truth = CtTruth(
        nodules=truth_nodules,
        slice_thickness_mm=float(slice_thickness),
        spacing_between_slices_mm=spacing,
        pixel_spacing_mm=pixel_spacing,
        noise_hu=sigma,
        lung=lung,
        nodule_labels=labels,
    )
    return hu, truth, grid


def _slice_dataset(
    seed: int,
    index: int,
    pixels: np.ndarray,
    grid: Grid,
    sigma: float,
    ids: dict[str, str],
) -> pydicom.Dataset:
    """One CT Image Storage slice around its stored values (HU + 1024)."""
    ds = phantom_header(
        seed,
        sop_class_uid=CT_IMAGE_STORAGE,
        sop_instance_uid=_uid(ids["series"], "slice", str(index)),
        patient_name=f"PHANTOM^CT^{seed}",
        patient_id=ids["patient"],
        study_instance_uid=ids["study"],
        accession_number=ids["accession"],
        study_description="CT CHEST",
        modality="CT",
        series_instance_uid=ids["series"],
        series_number=2,
        series_description=f"CHEST {grid.thickness:g}mm LUNG",
        model_name="ct phantom",
    )
    # Frame of reference, acquisition
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = ids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    # General image and image plane
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [f"{grid.pixel_spacing:.4f}", f"{grid.pixel_spacing:.4f}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [
        f"{grid.x[0]:.4f}",
        f"{grid.y[0]:.4f}",
        f"{grid.z[index]:.4f}",
    ]
    ds.SliceLocation = f"{grid.z[index]:.4f}"
    ds.SliceThickness = f"{grid.thickness:g}"
    ds.SpacingBetweenSlices = (
        f"{grid.z[1] - grid.z[0]:g}" if grid.z.size > 1 else (f"{grid.thickness:g}")
    )
    # Image pixel and CT image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.DataCollectionDiameter = 500
    ds.ReconstructionDiameter = f"{grid.pixel_spacing * pixels.shape[1]:.1f}"
    ds.ConvolutionKernel = "LUNG"
    ds.XRayTubeCurrent = round(min(600.0, 200.0 * (18.0 / max(sigma, 1.0)) ** 2))
    ds.ExposureTime = 500
    ds.WindowCenter = f"{LUNG_WINDOW[0]:g}"
    ds.WindowWidth = f"{LUNG_WINDOW[1]:g}"
    ds.WindowCenterWidthExplanation = "LUNG"
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def make_ct_series(
    seed: int,
    *,
    rows: int = 256,
    slices: int = 64,
    slice_thickness: float = 2.5,
    dose: str = "standard",
    noise_hu: float | None = None,
    nodules: tuple[int, int] = (1, 4),
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0),
    patient_id: str | None = None,
    accession_number: str | None = None,
    study_instance_uid: str | None = None,
) -> tuple[list[pydicom.Dataset], CtTruth]:
    """A synthetic axial chest CT series (CT Image Storage, one dataset per slice, in
    ascending z) and its ground truth. ``nodules`` is the (min, max) count per series; noise
    is ``noise_hu`` (standard deviation, HU) or follows ``dose`` ('standard' or 'low')."""
    hu, truth, grid = make_ct_volume(
        seed,
        rows=rows,
        slices=slices,
        slice_thickness=slice_thickness,
        dose=dose,
        noise_hu=noise_hu,
        nodules=nodules,
        nodule_diameter_mm=nodule_diameter_mm,
    )
    stored = np.clip(np.round(hu) - RESCALE_INTERCEPT, 0, 2**BITS_STORED - 1).astype(np.uint16)
    study_uid = study_instance_uid or _uid(str(seed), "study")
    ids = {
        "patient": patient_id or f"CT{seed:08d}",
        "accession": accession_number or f"CTA{seed:08d}",
        "study": study_uid,
        "series": _uid(str(seed), study_uid, "series"),
        "frame": _uid(str(seed), study_uid, "frame-of-reference"),
    }
    datasets = [
        _slice_dataset(seed, index, stored[index], grid, truth.noise_hu, ids)
        for index in range(stored.shape[0])
    ]
    return datasets, truth


def series_dir_name(seed: int) -> str:
    return f"ct_{seed:08d}"


def write_dataset(
    out: Path,
    n: int,
    seed: int,
    *,
    progress: bool = False,
    **options,
) -> Path:
    """Write ``n`` series (seeds ``seed``..``seed+n-1``), one folder each, their masks under
    ``truth/`` and ``ground_truth.jsonl``; return the JSONL path. ``options`` go to
    :func:`make_ct_series`."""
    from tqdm import tqdm

    out = Path(out)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    jsonl = out / "ground_truth.jsonl"
    with jsonl.open("w") as handle:
        for index in tqdm(range(n), desc="CT series", unit="series", disable=not progress):
            series_seed = seed + index
            datasets, truth = make_ct_series(series_seed, **options)
            name = series_dir_name(series_seed)
            folder = out / name
            folder.mkdir(exist_ok=True)
            for ds in datasets:
                ds.save_as(folder / f"{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)
            masks = f"truth/{name}.npz"
            np.savez_compressed(out / masks, lung=truth.lung, nodules=truth.nodule_labels)
            first = datasets[0]
            record = {
                "series_dir": name,
                "seed": series_seed,
                "study_instance_uid": first.StudyInstanceUID,
                "series_instance_uid": first.SeriesInstanceUID,
                "patient_id": first.PatientID,
                "slices": len(datasets),
                "rows": int(first.Rows),
                "columns": int(first.Columns),
                "slice_thickness_mm": truth.slice_thickness_mm,
                "spacing_between_slices_mm": truth.spacing_between_slices_mm,
                "pixel_spacing_mm": truth.pixel_spacing_mm,
                "noise_hu": truth.noise_hu,
                "nodules": [nodule.as_json() for nodule in truth.nodules],
                "masks": masks,
            }
            handle.write(json.dumps(record) + "\n")
    return jsonl


def read_truth(folder: Path | str) -> list[CtRecord]:
    """The records of a data set written by :func:`write_dataset` (``folder`` holds
    ``ground_truth.jsonl``), in file order."""
    folder = Path(folder)
    records = []
    with (folder / "ground_truth.jsonl").open() as handle:
        for line in handle:
            if not line.strip():
                continue
            value = json.loads(line)
            records.append(
                CtRecord(
                    folder=folder / value["series_dir"],
                    seed=int(value.get("seed", -1)),
                    study_instance_uid=value["study_instance_uid"],
                    series_instance_uid=value["series_instance_uid"],
                    patient_id=value.get("patient_id", ""),
                    slices=int(value.get("slices", 0)),
                    rows=int(value.get("rows", 0)),
                    columns=int(value.get("columns", 0)),
                    slice_thickness_mm=float(value["slice_thickness_mm"]),
                    spacing_between_slices_mm=float(
                        value.get("spacing_between_slices_mm", value["slice_thickness_mm"])
                    ),
                    pixel_spacing_mm=float(value["pixel_spacing_mm"]),
                    noise_hu=float(value["noise_hu"]),
                    nodules=tuple(CtNodule.from_json(n) for n in value["nodules"]),
                    masks=folder / value["masks"],
                )
            )
    return records


def parse_range(text: str, kind: type = float) -> tuple:
    """'MIN..MAX' (or a single value) as a (min, max) tuple of ``kind``."""
    low, _, high = text.partition("..")
    try:
        values = (kind(low), kind(high or low))
    except ValueError:
        raise ValueError(f"expected MIN..MAX, got {text!r}") from None
    return values


def synth_command(args) -> int:
    """``dicomnode synth ct``: write the data set the parsed arguments describe."""
    jsonl = write_dataset(
        Path(args.out),
        n=args.n,
        seed=args.seed,
        progress=not args.no_progress,
        rows=args.rows,
        slices=args.slices,
        slice_thickness=args.slice_thickness,
        dose=args.dose,
        noise_hu=args.noise_hu,
        nodules=parse_range(args.nodules, int),
        nodule_diameter_mm=parse_range(args.nodule_size, float),
    )
    print(f"wrote {args.n} chest CT series to {args.out}; ground truth in {jsonl}")
    return 0
