"""Train the demo CXR nodule detector (CenterNet-style) on synthetic phantoms and export it to ONNX.

Run from the repository root (about 4-5 minutes on 2 CPU cores, less with a warm phantom cache):

    python models/train/train_cxr_nodule.py --out models

Phantoms come from ``dicomnode.synth.cxr.make_cxr`` with varied acquisitions (DX/CR, PA/AP,
MONOCHROME1/2, bit depth, size, aspect) with nodules in half of them, tubes/lines in half and the
other findings as rarer distractors; each goes through a DICOM write/read round trip and
``dicomnode.pipeline.preprocess.prepare_input``, as the node runs it. Nodule boxes and the tube
tip are mapped into model-input pixels with the returned Letterbox geometry. The prepared
phantoms are cached on disk and shared with ``train_cxr_tube_tip.py`` (this module holds the
localisation data, backbone, crop training loop and ONNX helpers both scripts use).

The network predicts a nodule-centre heatmap, a centre offset and a box size at 1/4 of the input
resolution. It trains on random 128 x 128 crops of the 384 x 384 inputs (fully convolutional, so
it runs on whole inputs at inference); the ONNX graph decodes the maps itself (sigmoid, 3 x 3
max-pool peak suppression, top-K, boxes from the size regression) into (N, K, 6) rows
(x0, y0, x1, y1, score, label_index) in model-input pixels. Train, validation and held-out
phantoms use disjoint seed ranges; the card gets the FROC sensitivities at 0.125-8 false
positives per image, the CPM and the image-level AUC measured with the ONNX file on the held-out
phantoms (``dicomnode.evaluation.metrics``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import shared
import torch
import torch.nn.functional as F
from cxr_common import input_table, normalised, select_table
from cxr_common import zscore_spec as cxr_zscore_spec
from shared import round_trip
from torch import nn

from dicomnode.evaluation import metrics as evaluation
from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.letterbox import Letterbox
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.synth import cxr

MODEL_NAME = "cxr-nodule-demo"
MODEL_VERSION = "1.0.0"
STEM = "cxr_nodule_demo"
# Model input of both localisation models (384 rather than 256: nodules of 5-8 mm are 3-4
# pixels across at 256 and were mostly missed there).
INPUT_SHAPE = (1, 384, 384)
STRIDE = 4  # model-input pixels per output cell
CROP = 128  # training crop side (input pixels); a multiple of 16 keeps the grids aligned
TOP_K = 10
MIN_SCORE = 0.02
TRAIN_SEED_START = 10_000_000
VALIDATION_SEED_START = 11_000_000
HELDOUT_SEED_START = 12_000_000
NODULE_CODE = ("786838002", "SCT", "Pulmonary nodule")
NODULE_PREVALENCE = 0.5
TUBE_PREVALENCE = 0.5
# Other findings drawn into the phantoms (each independently) so that the detector learns to
# ignore them.
DISTRACTOR_PREVALENCE = 0.12
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# A detection hits a nodule when its box centre lies within the nodule's radius, but at least
# this many mm, so that 5 mm nodules (3-4 input px) are not held to sub-pixel aim.
MIN_HIT_RADIUS_MM = 5.0
CACHE_VERSION = "cxr-localisation-1"


# --- phantoms ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalisationJob:
    """One frontal phantom: seed, findings and acquisition."""

    seed: int
    findings: tuple[str, ...]
    view: str
    modality: str
    bits: int
    size: int  # rows
    columns: int
    photometric: str


def localisation_job(seed: int) -> LocalisationJob:
    """The phantom mix of the localisation models: PA 55 % / AP 45 %, DX or CR, 8-16 bit,
    MONOCHROME1 30 %, 384-576 rows, columns 0.85-1.15 x rows; a nodule in 50 %, a tube or
    central line in 50 %, each other finding in 12 %."""
    rng = np.random.default_rng([seed, 4242])
    findings = [f for f in ("nodule", "tube") if rng.random() < 0.5]
    for finding in cxr.FINDINGS:
        if finding not in ("nodule", "tube") and rng.random() < DISTRACTOR_PREVALENCE:
            findings.append(finding)
    size = int(rng.choice([384, 448, 512, 576]))
    return LocalisationJob(
        seed=seed,
        findings=tuple(findings),
        view="PA" if rng.random() < 0.55 else "AP",
        modality="DX" if rng.random() < 0.6 else "CR",
        bits=int(rng.choice([8, 10, 12, 14, 16], p=[0.1, 0.2, 0.4, 0.2, 0.1])),
        size=size,
        columns=round(size * rng.uniform(0.85, 1.15)),
        photometric="MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2",
    )


def box_to_input(box: tuple[int, int, int, int], geometry: Letterbox) -> tuple[float, ...]:
    """Source (row0, col0, row1, col1) half-open box -> input (x0, y0, x1, y1) pixel edges."""
    row0, col0, row1, col1 = box
    row_scale, col_scale = geometry.scale, geometry.col_scale or geometry.scale
    return (
        col0 * col_scale + geometry.pad_cols,
        row0 * row_scale + geometry.pad_rows,
        col1 * col_scale + geometry.pad_cols,
        row1 * row_scale + geometry.pad_rows,
    )


def point_to_input(row: float, col: float, geometry: Letterbox) -> tuple[float, float]:
    """Source (row, col) pixel position -> input (x, y) pixel position (inverse of to_source)."""
    col_scale = geometry.col_scale or geometry.scale
    return (
        (col + 0.5) * col_scale + geometry.pad_cols - 0.5,
        (row + 0.5) * geometry.scale + geometry.pad_rows - 0.5,
    )


def pixel_spacing_mm(ds: pydicom.Dataset) -> tuple[float, float]:
    """Row and column pixel spacing in mm (PixelSpacing, else ImagerPixelSpacing)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing:
        raise ValueError(f"SOP Instance {ds.SOPInstanceUID} has no pixel spacing")
    return float(spacing[0]), float(spacing[1])


def prepare_phantom(
    job: LocalisationJob, shape: tuple[int, int, int] = INPUT_SHAPE
) -> dict[str, np.ndarray]:
    """Worker: one phantom prepared as the node would ('unit' input), its nodule boxes and tube
    tip in input pixels, and the input pixel size in mm (rows, columns)."""
    ds, truth = cxr.make_cxr(
        job.seed,
        findings=job.findings,
        view=job.view,
        modality=job.modality,
        bits=job.bits,
        size=job.size,
        columns=job.columns,
        photometric=job.photometric,
    )
    ds = round_trip(ds)
    sample, geometry = prepare_input(ds, InputSpec(shape=shape, normalisation="unit"))
    boxes = [box_to_input(box, geometry) for name, box in truth.boxes if name == "nodule"]
    tip = truth.landmarks.get("tube_tip")
    row_mm, col_mm = pixel_spacing_mm(ds)
    return {
        "image": sample,
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "tip": np.array(point_to_input(*tip, geometry) if tip else (np.nan, np.nan), np.float32),
        "mm": np.array(
            [row_mm / geometry.scale, col_mm / (geometry.col_scale or geometry.scale)], np.float32
        ),
    }


@dataclass
class LocalisationSplit:
    """Prepared 'unit' inputs of one seed range with their truth in model-input pixels."""

    seeds: np.ndarray  # N
    images: np.ndarray  # N x 1 x H x W, 0..1 (float16 for training, float32 otherwise)
    boxes: list[np.ndarray]  # per image, M x 4 (x0, y0, x1, y1) nodule box edges
    tips: np.ndarray  # N x 2 (x, y) tube tip, NaN without a tube
    mm_per_pixel: np.ndarray  # N x 2 (rows, columns) input pixel size in mm

    @property
    def has_nodule(self) -> np.ndarray:
        return np.array([len(b) > 0 for b in self.boxes], dtype=bool)

    @property
    def has_tip(self) -> np.ndarray:
        return ~np.isnan(self.tips[:, 0])


def cache_dir() -> Path:
    """``$DICOMNODE_TRAIN_CACHE`` or ``~/.cache/dicomnode/cxr-train``."""
    default = Path.home() / ".cache" / "dicomnode" / "cxr-train"
    return Path(os.environ.get("DICOMNODE_TRAIN_CACHE", default))


def _cache_key(jobs: list[LocalisationJob], shape: tuple[int, int, int]) -> str:
    # Keyed by the phantom sources and the preparation code, not the training code.
    sources = sorted(Path(cxr.__file__).parent.glob("cxr*.py"))
    sources.append(Path(prepare_input.__code__.co_filename))
    preparation = (round_trip, box_to_input, point_to_input, pixel_spacing_mm, prepare_phantom)
    source = (
        b"".join(p.read_bytes() for p in sources)
        + "".join(inspect.getsource(function) for function in preparation).encode()
    )
    payload = json.dumps([CACHE_VERSION, shape, [asdict(j) for j in jobs]]).encode()
    return hashlib.sha256(hashlib.sha256(source).digest() + payload).hexdigest()[:20]


def localisation_split(
    seed_start: int,
    n: int,
    workers: int = 2,
    precision: type = np.float16,
    shape: tuple[int, int, int] = INPUT_SHAPE,
) -> LocalisationSplit:
    """Phantoms with seeds seed_start..seed_start+n-1 prepared at input ``shape``, rendered in
    ``workers`` processes and cached on disk (keyed by the jobs, the shape, the preparation
    code and the phantom sources)."""
    jobs = [localisation_job(seed) for seed in range(seed_start, seed_start + n)]
    key = _cache_key(jobs, shape)
    path = cache_dir() / f"localisation-{shape[1]}-{seed_start}-{n}-{key}.npz"
    if not path.is_file():
        started = time.monotonic()
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(functools.partial(prepare_phantom, shape=shape), jobs, chunksize=8)
        print(f"rendered {n} phantoms in {time.monotonic() - started:.0f} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = [len(r["boxes"]) for r in results]
        temporary = path.with_suffix(".tmp.npz")
        np.savez(
            temporary,
            seeds=np.array([j.seed for j in jobs]),
            images=np.stack([r["image"] for r in results]),
            boxes=np.concatenate([r["boxes"] for r in results]).reshape(-1, 4),
            box_counts=np.array(counts),
            tips=np.stack([r["tip"] for r in results]),
            mm=np.stack([r["mm"] for r in results]),
        )
        temporary.replace(path)
    data = np.load(path)
    offsets = np.r_[0, np.cumsum(data["box_counts"])]
    boxes = data["boxes"]
    return LocalisationSplit(
        seeds=data["seeds"],
        images=data["images"].astype(precision),
        boxes=[boxes[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)],
        tips=data["tips"],
        mm_per_pixel=data["mm"],
    )


def zscore_spec(train: LocalisationSplit) -> InputSpec:
    """A z-score InputSpec with the mean/std of (up to 256) training inputs, at their shape."""
    return cxr_zscore_spec(train.images, tuple(int(v) for v in train.images.shape[1:]))


# --- network -------------------------------------------------------------------------------


def _conv(channels_in: int, channels_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class StrideFourBackbone(nn.Module):
    """Small encoder to 1/16 resolution and a feature-pyramid decoder back to 1/4."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.down4 = nn.Sequential(_conv(1, 16, stride=2), _conv(16, 32, stride=2), _conv(32, 32))
        self.down8 = nn.Sequential(_conv(32, 64, stride=2), _conv(64, 64))
        self.down16 = nn.Sequential(_conv(64, 96, stride=2), _conv(96, 96), _conv(96, 96))
        self.lateral8 = nn.Conv2d(64, 96, 1)
        self.merge8 = _conv(96, 48)
        self.lateral4 = nn.Conv2d(32, 48, 1)
        self.merge4 = _conv(48, channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f4 = self.down4(image)
        f8 = self.down8(f4)
        f16 = self.down16(f8)
        up8 = self.merge8(self.lateral8(f8) + F.interpolate(f16, scale_factor=2.0))
        return self.merge4(self.lateral4(f4) + F.interpolate(up8, scale_factor=2.0))


class CentreNet(nn.Module):
    """Backbone and a head: centre logit, then ``regressions`` more maps per 1/4 cell."""

    def __init__(self, regressions: int) -> None:
        super().__init__()
        self.backbone = StrideFourBackbone(32)
        self.head = nn.Sequential(
            nn.Conv2d(32, 24, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(24, 1 + regressions, 1),
        )
        with torch.no_grad():
            self.head[-1].bias.zero_()
            self.head[-1].bias[0] = -4.0  # prior of about 2 % per cell

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(image))


def decode_boxes(raw: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """(N, K, 6) rows (x0, y0, x1, y1, score, label 0) in input pixels from the raw head
    (centre logit, offset x, offset y, log width, log height per cell)."""
    batch, _, rows, cols = raw.shape
    heat = torch.sigmoid(raw[:, 0:1])
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
    scores, index = torch.topk(peaks.reshape(batch, rows * cols), k, dim=1)
    regression = raw[:, 1:5].reshape(batch, 4, rows * cols)
    picked = torch.gather(regression, 2, index.unsqueeze(1).expand(batch, 4, k))
    cell_y = torch.div(index, cols, rounding_mode="floor")
    cell_x = (index - cell_y * cols).to(heat.dtype)
    centre_x = (cell_x + torch.sigmoid(picked[:, 0])) * STRIDE
    centre_y = (cell_y.to(heat.dtype) + torch.sigmoid(picked[:, 1])) * STRIDE
    half_w = torch.exp(picked[:, 2].clamp(-3.0, 4.0)) * (STRIDE / 2)
    half_h = torch.exp(picked[:, 3].clamp(-3.0, 4.0)) * (STRIDE / 2)
    width, height = float(cols * STRIDE), float(rows * STRIDE)
    return torch.stack(
        [
            (centre_x - half_w).clamp(0.0, width),
            (centre_y - half_h).clamp(0.0, height),
            (centre_x + half_w).clamp(0.0, width),
            (centre_y + half_h).clamp(0.0, height),
            scores,
            torch.zeros_like(scores),
        ],
        dim=2,
    )


class BoxExport(nn.Module):
    """ONNX graph: the network and its box decoding."""

    def __init__(self, net: CentreNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return decode_boxes(self.net(image))


# --- training ------------------------------------------------------------------------------


def gaussian_targets(
    centres: np.ndarray, sigmas: np.ndarray, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmap target (rows x cols) with a Gaussian of peak exactly 1 at each centre's cell, the
    centre cells' flat indexes and the offsets inside them (0..1). ``centres`` are (x, y) in
    cell units, measured from the grid's top-left edge."""
    heat = np.zeros((rows, cols), dtype=np.float32)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cells, offsets = [], []
    for (cx, cy), sigma in zip(centres, sigmas, strict=True):
        col, row = min(int(cx), cols - 1), min(int(cy), rows - 1)
        heat = np.maximum(heat, np.exp(-((xx - col) ** 2 + (yy - row) ** 2) / (2 * sigma**2)))
        cells.append(row * cols + col)
        offsets.append([cx - col, cy - row])
    return (
        heat,
        np.array(cells, dtype=np.int64),
        np.clip(np.array(offsets, dtype=np.float32).reshape(-1, 2), 0.02, 0.98),
    )


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss summed over cells, per centre (at least one)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1.0).to(p.dtype)
    pos_loss = -torch.log(p) * (1 - p) ** 2 * positive
    neg_loss = -torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - positive)
    return (pos_loss.sum() + neg_loss.sum()) / positive.sum().clamp(min=1.0)


def nodule_loss(raw: torch.Tensor, boxes: list[np.ndarray]) -> torch.Tensor:
    """Focal loss on the centre heatmap plus smooth L1 on offset logits and log sizes (cells)
    at nodule centres; each nodule's Gaussian has sigma a quarter of its size (>= 0.6 cells)."""
    _, _, rows, cols = raw.shape
    heat_targets, regression_loss, n_nodules = [], raw.new_zeros(()), 0
    for i, image_boxes in enumerate(boxes):
        centres = np.stack(
            [(image_boxes[:, 0] + image_boxes[:, 2]), (image_boxes[:, 1] + image_boxes[:, 3])], 1
        ) / (2 * STRIDE)
        sizes = np.maximum((image_boxes[:, 2:4] - image_boxes[:, 0:2]) / STRIDE, 0.25)
        heat, cells, offsets = gaussian_targets(
            centres, np.maximum(0.6, sizes.sum(axis=1) / 8), rows, cols
        )
        heat_targets.append(heat)
        if len(cells):
            target = np.concatenate([np.log(offsets / (1 - offsets)), np.log(sizes)], axis=1)
            picked = raw[i, 1:5].reshape(4, -1)[:, torch.from_numpy(cells)].T
            regression_loss = regression_loss + F.smooth_l1_loss(
                picked, torch.from_numpy(target.astype(np.float32)), reduction="sum"
            )
            n_nodules += len(cells)
    heat_target = torch.from_numpy(np.stack(heat_targets)).unsqueeze(1)
    return focal_loss(raw[:, 0:1], heat_target) + 0.5 * regression_loss / max(n_nodules, 1) / 4


def crop_boxes(boxes: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """Boxes shifted into a crop at (x0, y0), keeping those whose centre lies inside it."""
    shifted = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    cx, cy = (shifted[:, 0] + shifted[:, 2]) / 2, (shifted[:, 1] + shifted[:, 3]) / 2
    inside = (cx >= 0) & (cx < side) & (cy >= 0) & (cy < side)
    return shifted[inside]


def crop_origin(
    rng: np.random.Generator, targets: np.ndarray, size: int, side: int
) -> tuple[int, int]:
    """A crop origin on the 16-pixel grid; half the time around one of ``targets`` ((x, y)
    points, may be empty) so that crops with a target are common."""
    positions = np.arange(0, size - side + 1, 16)
    if len(targets) and rng.random() < 0.5:
        x, y = targets[int(rng.integers(0, len(targets)))]
        near_x = positions[(positions <= x - 8) & (positions + side > x + 8)]
        near_y = positions[(positions <= y - 8) & (positions + side > y + 8)]
        if len(near_x) and len(near_y):
            return int(rng.choice(near_x)), int(rng.choice(near_y))
    return int(rng.choice(positions)), int(rng.choice(positions))


@dataclass
class CropBatch:
    """Crops of one batch and, per crop, its origin (x0, y0) in the full input and whether it
    was mirrored left-right (after cropping)."""

    images: torch.Tensor
    origins: list[tuple[int, int]]
    index: np.ndarray
    flipped: np.ndarray


def crop_batches(
    images: np.ndarray,
    targets: list[np.ndarray],
    spec: InputSpec,
    batch: int,
    rng: np.random.Generator,
    crop: int = CROP,
    flip: bool = False,
) -> list[CropBatch]:
    """One epoch of shuffled crop batches (normalised as the card says), half of them
    mirrored left-right when ``flip``."""
    order = rng.permutation(len(images))
    size = images.shape[-1]
    out = []
    for start in range(0, len(order), batch):
        index = order[start : start + batch]
        origins = [crop_origin(rng, targets[i], size, crop) for i in index]
        crops = np.stack(
            [
                images[i, :, y : y + crop, x : x + crop]
                for i, (x, y) in zip(index, origins, strict=True)
            ]
        )
        flipped = rng.random(len(index)) < 0.5 if flip else np.zeros(len(index), dtype=bool)
        crops[flipped] = crops[flipped][..., ::-1]
        out.append(CropBatch(torch.from_numpy(normalised(crops, spec)), origins, index, flipped))
    return out


def train_crops(
    net: nn.Module,
    images: np.ndarray,
    targets: list[np.ndarray],
    spec: InputSpec,
    loss_of_batch: Callable[[torch.Tensor, CropBatch], torch.Tensor],
    validate: Callable[[], float],
    epochs: int,
    batch: int,
    learning_rate: float = 3e-3,
    crop: int = CROP,
    flip: bool = False,
) -> tuple[float, int]:
    """AdamW with a one-cycle schedule on random crops; keep the epoch with the best
    ``validate()`` score (higher is better) and return it and its epoch."""
    rng = np.random.default_rng(1)
    steps = epochs * math.ceil(len(images) / batch)
    optimiser, schedule = shared.adamw_one_cycle(net.parameters(), learning_rate, steps)

    def train_epoch() -> float:
        total = 0.0
        for crops in crop_batches(images, targets, spec, batch, rng, crop, flip):
            loss = loss_of_batch(net(crops.images), crops)
            shared.optimise(optimiser, schedule, loss)
            total += loss.item() * len(crops.index)
        return total / len(images)

    def validate_epoch() -> tuple[float, str]:
        score = validate()
        return score, f"validation {score:.4f}"

    best = shared.fit(net, epochs, train_epoch, validate_epoch, shared.BestEpoch(keep_ties=True))
    return best.score, best.epoch


def predict(module: nn.Module, images: np.ndarray, spec: InputSpec, batch: int = 32) -> np.ndarray:
    """Outputs of a torch module in eval mode on full normalised inputs."""
    return shared.predict(module, images, batch, lambda chunk: normalised(chunk, spec))


# --- evaluation ----------------------------------------------------------------------------


def detection_cases(
    predictions: np.ndarray, split: LocalisationSplit, min_score: float = MIN_SCORE
) -> list[evaluation.CaseDetections]:
    """FROC cases: per image the boxes scoring >= ``min_score`` (what the node reports) and the
    nodule each one hits (box centre within the nodule's radius, at least MIN_HIT_RADIUS_MM)."""
    cases = []
    for rows, truth, mm in zip(predictions, split.boxes, split.mm_per_pixel, strict=True):
        rows = rows[rows[:, 4] >= min_score]
        if len(rows) == 0:
            cases.append(evaluation.CaseDetections(np.zeros(0), np.zeros(0, int), len(truth)))
            continue
        if len(truth) == 0:
            # match_points cannot take an empty truth array (reshape of size 0 to (0, -1)).
            hits = np.full(len(rows), -1, dtype=np.int64)
            cases.append(evaluation.CaseDetections(rows[:, 4], hits, 0))
            continue
        centres = np.stack([(rows[:, 0] + rows[:, 2]) / 2, (rows[:, 1] + rows[:, 3]) / 2], 1)
        truth_centres = np.stack(
            [(truth[:, 0] + truth[:, 2]) / 2, (truth[:, 1] + truth[:, 3]) / 2], 1
        )
        radii = np.maximum(
            (truth[:, 2:4] - truth[:, 0:2]).max(axis=1, initial=0) / 2,
            MIN_HIT_RADIUS_MM / float(mm.min()),
        )
        hits = evaluation.match_points(centres, truth_centres, radii)
        cases.append(evaluation.CaseDetections(rows[:, 4], hits, len(truth)))
    return cases


def found_nodules(
    cases: list[evaluation.CaseDetections], threshold: float
) -> tuple[list[np.ndarray], int]:
    """Per case which nodules a detection scoring >= ``threshold`` hits, and the number of
    false positives at that threshold."""
    found, false_positives = [], 0
    for case in cases:
        keep = case.scores >= threshold
        hit = np.zeros(case.n_lesions, dtype=bool)
        hit[case.hits[keep & (case.hits >= 0)]] = True
        found.append(hit)
        false_positives += int((keep & (case.hits < 0)).sum())
    return found, false_positives


def sensitivity_by_diameter(
    cases: list[evaluation.CaseDetections], split: LocalisationSplit, threshold: float
) -> dict[str, float | int]:
    """Sensitivity at ``threshold`` (the 1 FP/image point) for small, medium and large
    nodules (box width in mm: < 8, 8-15, >= 15) and how many there are of each."""
    found, _ = found_nodules(cases, threshold)
    diameters = np.concatenate(
        [(b[:, 2] - b[:, 0]) * mm[1] for b, mm in zip(split.boxes, split.mm_per_pixel, strict=True)]
    )
    hit = np.concatenate(found)
    out: dict[str, float | int] = {}
    for name, low, high in (("lt8", 0, 8), ("8to15", 8, 15), ("ge15", 15, np.inf)):
        band = (diameters >= low) & (diameters < high)
        out[f"sensitivity_at_1_fp_diameter_{name}_mm"] = (
            float(hit[band].mean()) if band.any() else 0.0
        )
        out[f"heldout_nodules_diameter_{name}_mm"] = int(band.sum())
    return out


def froc_key(rate: float) -> str:
    """The card's metric name of the FROC sensitivity at ``rate`` FP/image (a bare TOML key)."""
    return f"froc_sensitivity_at_{rate:g}_fp".replace(".", "_")


def nodule_froc(predictions: np.ndarray, split: LocalisationSplit) -> evaluation.FrocCurve:
    return evaluation.froc(detection_cases(predictions, split))


# --- export and card -----------------------------------------------------------------------


def export_onnx(
    module: nn.Module, path: Path, output_name: str, shape: tuple[int, int, int] = INPUT_SHAPE
) -> None:
    """ONNX opset 17 with input ``image`` [N, *shape] and one output, dynamic batch."""
    shared.export_onnx(module, path, shape, [output_name])


def onnx_run(path: Path, images: np.ndarray, spec: InputSpec, batch: int = 32) -> np.ndarray:
    """The model's only output from onnxruntime on the CPU, batch by batch."""
    return shared.onnx_outputs(path, images, batch, prepare=lambda c: normalised(c, spec))[0]


def ranked_difference(onnx_rows: np.ndarray, torch_rows: np.ndarray, gap: float = 1e-4) -> float:
    """Largest difference between ONNX and torch (N, K, C) rows (score in column 4 of boxes, 2
    of landmarks): all scores, and every value of rows whose score stands apart from the other
    rows' by ``gap`` (near-tied scores may swap places between runtimes)."""
    column = 4 if onnx_rows.shape[-1] == 6 else 2
    largest = float(np.abs(onnx_rows[..., column] - torch_rows[..., column]).max())
    for image_onnx, image_torch in zip(onnx_rows, torch_rows, strict=True):
        scores = image_torch[:, column]
        gaps = np.abs(scores[:, None] - scores[None, :]) + np.eye(len(scores))
        distinct = gaps.min(axis=1) > gap
        if distinct.any():
            difference = np.abs(image_onnx[distinct] - image_torch[distinct]).max()
            largest = max(largest, float(difference))
    return largest


def ms_per_image(path: Path, spec: InputSpec, n: int = 20) -> float:
    """Median onnxruntime latency of one (all-zero) image on one CPU thread, in ms."""
    image = np.zeros((1, *spec.shape), dtype=np.float32)
    return shared.onnx_latency_ms(path, image, runs=n, warmups=1, input_name="image")


def write_card(
    path: Path,
    script: str,
    model: dict[str, object],
    spec: InputSpec,
    output: dict[str, object],
    label: dict[str, object],
    metrics: dict[str, object],
    training: dict[str, object],
) -> None:
    """A frontal CXR model card (DX/CR, CHEST, PA/AP) with this run's metrics; it must load."""
    sections = {
        "model": model,
        "input": input_table(spec),
        "outputs": [output],
        "labels": [label],
        "select": select_table(),
        "metrics": metrics,
        "training": training,
    }
    shared.write_card(path, script, sections, quote_nonfinite=False)


def load_splits(
    n_train: int,
    n_validation: int,
    n_heldout: int,
    workers: int,
    shape: tuple[int, int, int] = INPUT_SHAPE,
) -> dict[str, LocalisationSplit]:
    """The train (float16), validation and held-out (float32) splits at input ``shape``."""
    return {
        "train": localisation_split(TRAIN_SEED_START, n_train, workers, np.float16, shape),
        "validation": localisation_split(
            VALIDATION_SEED_START, n_validation, workers, np.float32, shape
        ),
        "heldout": localisation_split(HELDOUT_SEED_START, n_heldout, workers, np.float32, shape),
    }


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=1200, n_validation=200, n_heldout=400, epochs=14, batch=16
    )
    parser.add_argument(
        "--threshold-fp-rate",
        type=float,
        default=0.25,
        help="false positives per image on validation phantoms at the card's threshold",
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="render and cache the phantoms, then stop"
    )
    args = parser.parse_args()

    started = shared.start_run(args.out)
    splits = load_splits(args.n_train, args.n_validation, args.n_heldout, args.workers, INPUT_SHAPE)
    train, validation, heldout = splits["train"], splits["validation"], splits["heldout"]
    data_seconds = time.monotonic() - started
    if args.prepare_only:
        print(f"phantoms cached in {cache_dir()} ({data_seconds:.0f} s)")
        return
    spec = zscore_spec(train)
    print(f"phantoms ready ({data_seconds:.0f} s); input z-score {spec.mean} / {spec.std}")

    net = CentreNet(regressions=4)
    decoder = BoxExport(net)

    def loss_of_batch(raw: torch.Tensor, crops: CropBatch) -> torch.Tensor:
        boxes = [
            crop_boxes(train.boxes[i], x, y, CROP)
            for i, (x, y) in zip(crops.index, crops.origins, strict=True)
        ]
        boxes = [
            np.stack([CROP - b[:, 2], b[:, 1], CROP - b[:, 0], b[:, 3]], 1) if f else b
            for b, f in zip(boxes, crops.flipped, strict=True)
        ]
        return nodule_loss(raw, boxes)

    def validate() -> float:
        return nodule_froc(predict(decoder, validation.images, spec), validation).cpm(FP_RATES)

    centres = [np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1) for b in train.boxes]
    best_cpm, best_epoch = train_crops(
        net,
        train.images,
        centres,
        spec,
        loss_of_batch,
        validate,
        args.epochs,
        args.batch,
        flip=True,
    )
    train_seconds = time.monotonic() - started - data_seconds
    validation_curve = nodule_froc(predict(decoder, validation.images, spec), validation)
    # Rounded as the card stores it, so the reported operating point is the card's.
    threshold = float(f"{min(validation_curve.threshold_at(args.threshold_fp_rate), 1.0):.6g}")

    onnx_path = args.out / f"{STEM}.onnx"
    export_onnx(decoder, onnx_path, "boxes", spec.shape)
    torch_boxes = predict(decoder, heldout.images, spec)
    boxes = onnx_run(onnx_path, heldout.images, spec)
    max_difference = ranked_difference(boxes, torch_boxes)
    if boxes.shape != (len(heldout.seeds), TOP_K, 6) or max_difference > 1e-3:
        raise SystemExit(f"ONNX and torch disagree on held-out phantoms by {max_difference:.2e}")

    cases = detection_cases(boxes, heldout)
    curve = evaluation.froc(cases)
    image_scores = np.where(boxes[:, :, 4] >= MIN_SCORE, boxes[:, :, 4], 0.0).max(axis=1)
    labels = heldout.has_nodule
    found, false_positives = found_nodules(cases, threshold)
    n_nodules = int(sum(len(b) for b in heldout.boxes))
    auc_low, auc_high = evaluation.auc_confidence_interval(labels, image_scores)
    metrics: dict[str, object] = {froc_key(rate): curve.sensitivity_at(rate) for rate in FP_RATES}
    metrics.update(
        {
            "cpm": curve.cpm(FP_RATES),
            "cpm_fp_rates": " ".join(f"{rate:g}" for rate in FP_RATES),
            "hit_criterion": (
                f"box centre within the nodule radius (at least {MIN_HIT_RADIUS_MM:g} mm)"
            ),
            "froc_min_score": MIN_SCORE,
            "image_auc": evaluation.roc_auc(labels, image_scores),
            "image_auc_ci_low": auc_low,
            "image_auc_ci_high": auc_high,
            "image_auc_score": "highest box score per image",
            "heldout_n": len(heldout.seeds),
            "heldout_nodules": n_nodules,
            "heldout_images_with_nodules": int(labels.sum()),
            "heldout_seed_start": HELDOUT_SEED_START,
            "threshold": threshold,
            "threshold_method": (
                f"lowest score at {args.threshold_fp_rate:g} false positives per image on "
                "validation phantoms"
            ),
            "sensitivity_at_threshold": float(np.concatenate(found).mean()),
            "fp_per_image_at_threshold": false_positives / len(cases),
            **sensitivity_by_diameter(cases, heldout, curve.threshold_at(1.0)),
            "image_sensitivity_at_threshold": float((image_scores[labels] >= threshold).mean()),
            "image_specificity_at_threshold": float((image_scores[~labels] < threshold).mean()),
            "validation_cpm": best_cpm,
            "validation_n": len(validation.seeds),
            "validation_seed_start": VALIDATION_SEED_START,
            "onnx_torch_max_abs_difference": max_difference,
            "onnx_ms_per_image_1_thread": ms_per_image(onnx_path, spec),
        }
    )
    training = {
        "n_train": len(train.seeds),
        "train_seed_start": TRAIN_SEED_START,
        "epochs": args.epochs,
        "best_epoch": best_epoch,
        "batch": args.batch,
        "crop": CROP,
        "augmentation": "random crops, half mirrored left-right",
        "seconds": round(time.monotonic() - started),
        "train_seconds": round(train_seconds),
        "phantom_seconds": round(data_seconds),
        "torch": torch.__version__,
        "data": (
            "dicomnode.synth.cxr.make_cxr PA/AP, nodule in "
            f"{NODULE_PREVALENCE:.0%} of phantoms, tube/line in {TUBE_PREVALENCE:.0%}, other "
            f"findings {DISTRACTOR_PREVALENCE:.0%} each as distractors"
        ),
    }
    card_path = args.out / f"{STEM}.toml"
    write_card(
        card_path,
        "train_cxr_nodule.py",
        {
            "name": MODEL_NAME,
            "version": MODEL_VERSION,
            "task": "detection",
            "onnx": f"{STEM}.onnx",
            "description": (
                "Pulmonary nodule detector for PA/AP chest radiographs (CenterNet-style centre "
                f"heatmap and box size, up to {TOP_K} boxes per image). Trained only on "
                "synthetic chest phantoms (dicomnode.synth.cxr); metrics are on held-out "
                "phantoms, not patients. Research demo, not for clinical use."
            ),
        },
        spec,
        {"name": "boxes", "kind": "boxes", "min_score": MIN_SCORE},
        shared.label_table(NODULE_CODE, "nodule", threshold),
        metrics,
        training,
    )
    shared.print_summary(
        {"metrics": metrics, "training": training},
        f"{onnx_path} ({onnx_path.stat().st_size} bytes) and {card_path}",
    )


if __name__ == "__main__":
    main()
