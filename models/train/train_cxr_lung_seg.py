"""Train the demo lung segmentation U-Net on synthetic chest phantoms and export it to ONNX.

Run from the repository root (about 4-5 minutes on 2 CPU cores with the defaults):

    python models/train/train_cxr_lung_seg.py --out models

Phantoms come from ``dicomnode.synth.cxr.make_cxr`` across PA and AP views, DX and CR, 8 to 16
bits, MONOCHROME1 and 2, several sizes and aspect ratios, and random findings. Each goes through a
DICOM write/read round trip and ``dicomnode.pipeline.preprocess.prepare_input`` with the card's
InputSpec, the preprocessing the node applies at inference; the truth lung mask is put into the
same letterbox geometry. Held-out Dice is measured as the node uses the model: the ONNX mask is
mapped back to source pixels with ``Letterbox.map_to_source`` and thresholded at the card's
threshold.

The phantom mix, the rendering cache (inputs, lung targets and soft-tissue targets of one
rendering), the geometry helpers and the U-Net are also used by ``train_cxr_bone_suppression.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import multiprocessing
import multiprocessing.pool
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import shared
import torch
from cxr_common import cache_dir, export_onnx, input_table, select_table
from PIL import Image
from torch import nn
from torch.nn import functional

import dicomnode.synth.cxr as synth_cxr
from dicomnode.evaluation.metrics import dice, mean_confidence_interval
from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.letterbox import Letterbox
from dicomnode.pipeline.preprocess import prepare_input

MODEL_NAME = "cxr-lung-seg-demo"
MODEL_VERSION = "1.0.0"
STEM = "cxr_lung_seg_demo"
INPUT_SHAPE = (1, 256, 256)
# The U-Net works at a quarter of the input resolution (lungs are large, CPU time is scarce);
# the node resamples its mask to source pixels.
MASK_STRIDE = 4
THRESHOLD = 0.5
TRAIN_SEED_START = 0
VALIDATION_SEED_START = 500_000
HELDOUT_SEED_START = 1_000_000
WIDTHS = (8, 16, 32, 64)
SPEC = InputSpec(shape=INPUT_SHAPE, normalisation="unit")
LUNG_CODE = ("39607008", "SCT", "Lung structure")
VIEWS = ("PA", "AP")
SIZES = (256, 320, 384, 448, 512)
BITS = (8, 10, 12, 14, 16)
FINDING_PREVALENCE = 0.3
# Findings that change the lung fields' appearance; the card reports Dice on these separately.
OPACIFYING_FINDINGS = ("effusion", "consolidation", "pneumothorax")
# Bump when the cached arrays' meaning changes (the key also covers the phantom sources).
DENSE_CACHE_VERSION = "cxr-dense-1"


@dataclass(frozen=True)
class DenseJob:
    """One frontal phantom to render: seed, findings and acquisition variation."""

    seed: int
    findings: tuple[str, ...]
    view: str
    modality: str
    bits: int
    rows: int
    columns: int
    photometric: str


def phantom_job(seed: int, views: tuple[str, ...] = VIEWS) -> DenseJob:
    """Random view, modality, bit depth, photometric, size, aspect and findings for ``seed``."""
    rng = np.random.default_rng([seed, 4_041])
    rows = int(rng.choice(SIZES))
    return DenseJob(
        seed=seed,
        findings=tuple(sorted(synth_cxr.random_findings(rng, FINDING_PREVALENCE))),
        view=str(rng.choice(views)),
        modality=str(rng.choice(["DX", "CR"])),
        bits=int(rng.choice(BITS)),
        rows=rows,
        columns=round(rows * rng.uniform(0.85, 1.15)),
        photometric=str(rng.choice(["MONOCHROME1", "MONOCHROME2"])),
    )


def render(job: DenseJob) -> tuple[pydicom.Dataset, synth_cxr.CxrTruth]:
    """The phantom's dataset after a DICOM write/read round trip, and its truth."""
    ds, truth = synth_cxr.make_cxr(
        job.seed,
        findings=job.findings,
        view=job.view,
        modality=job.modality,
        bits=job.bits,
        size=job.rows,
        columns=job.columns,
        photometric=job.photometric,
    )
    return shared.round_trip(ds), truth


def soft_tissue_dataset(ds: pydicom.Dataset, soft_tissue: np.ndarray) -> pydicom.Dataset:
    """A copy of ``ds`` whose pixels are the truth's soft-tissue image (same stored-value scale,
    photometric and window), so ``prepare_input`` puts it in the input's intensity space."""
    if "WindowCenter" not in ds and not ds.get("VOILUTSequence"):
        # A percentile window would be recomputed on the soft-tissue pixels: a different scale.
        raise ValueError(f"phantom {ds.SOPInstanceUID} has no window; soft tissue has no scale")
    stored = ds.pixel_array
    soft = copy.deepcopy(ds)
    soft.PixelData = np.asarray(soft_tissue).astype(stored.dtype).tobytes()
    return soft


def source_to_input(source_map: np.ndarray, letterbox: Letterbox) -> np.ndarray:
    """A source-pixel map (rows x cols) placed in the model input's geometry, as prepare_input
    places the image: area-averaged (or bilinear when enlarging) into the letterbox's resized
    region, zero in the padding."""
    rows, cols = letterbox.resized_shape
    source = np.asarray(source_map, dtype=np.float32)
    shrinking = rows < source.shape[0] or cols < source.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    resized = Image.fromarray(source, mode="F").resize((cols, rows), resample)
    canvas = np.zeros(letterbox.input_shape, dtype=np.float32)
    top, left = letterbox.pad_rows, letterbox.pad_cols
    canvas[top : top + rows, left : left + cols] = np.asarray(resized, dtype=np.float32)
    return canvas


def image_region(letterbox: Letterbox) -> np.ndarray:
    """Boolean input-geometry mask of the pixels the image occupies (not the padding)."""
    return source_to_input(np.ones(letterbox.source_shape, dtype=np.float32), letterbox) > 0.5


def downsample(image: np.ndarray, stride: int) -> np.ndarray:
    """Mean over ``stride`` x ``stride`` blocks of an H x W array."""
    rows, cols = image.shape
    return image.reshape(rows // stride, stride, cols // stride, stride).mean(axis=(1, 3))


def lung_truth(truth: synth_cxr.CxrTruth) -> np.ndarray:
    """Boolean lung mask in source pixels (aerated lung, pleural fluid excluded)."""
    return np.asarray(truth.masks["lung"], dtype=bool)


@dataclass
class Split:
    """Prepared inputs and targets of one seed range ('unit' intensities, float16)."""

    jobs: list[DenseJob]
    images: np.ndarray  # N x 1 x H x W: the model input
    targets: np.ndarray  # N x 1 x H/stride x W/stride: area fraction of lung
    soft: np.ndarray  # N x 1 x H x W: the soft-tissue truth in the input's geometry and scale
    regions: np.ndarray  # N x 1 x H x W bool: image pixels (not letterbox padding)


def dense_sample(job: DenseJob) -> dict[str, np.ndarray]:
    """Worker: render one phantom; its input, lung target, soft-tissue target and region."""
    ds, truth = render(job)
    image, letterbox = prepare_input(ds, SPEC)
    soft, soft_letterbox = prepare_input(soft_tissue_dataset(ds, truth.soft_tissue), SPEC)
    assert soft_letterbox == letterbox
    lung = downsample(source_to_input(lung_truth(truth), letterbox), MASK_STRIDE)
    return {
        "images": image.astype(np.float16),
        "targets": lung[None].astype(np.float16),
        "soft": soft.astype(np.float16),
        "regions": image_region(letterbox)[None],
    }


def _cache_key(jobs: list[DenseJob]) -> str:
    sources = sorted(Path(synth_cxr.__file__).parent.glob("cxr*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).digest()
    payload = json.dumps(
        [DENSE_CACHE_VERSION, INPUT_SHAPE, MASK_STRIDE, [asdict(j) for j in jobs]], sort_keys=True
    ).encode()
    return hashlib.sha256(digest + payload).hexdigest()[:20]


def make_split(pool: multiprocessing.pool.Pool, seed_start: int, n: int) -> Split:
    """Phantoms with seeds seed_start..seed_start+n-1, rendered once and cached on disk
    (``cxr_common.cache_dir()``, keyed by the jobs and the dicomnode/synth/cxr*.py sources)."""
    jobs = [phantom_job(seed) for seed in range(seed_start, seed_start + n)]
    path = cache_dir() / f"dense-{seed_start}-{n}-{_cache_key(jobs)}.npz"
    if not path.is_file():
        results = pool.map(dense_sample, jobs, chunksize=8)
        arrays = {key: np.stack([r[key] for r in results]) for key in results[0]}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.npz")
        np.savez(temporary, **arrays)
        temporary.replace(path)
    data = np.load(path)
    return Split(jobs, data["images"], data["targets"], data["soft"], data["regions"])


def make_splits(
    pool: multiprocessing.pool.Pool, n_train: int, n_validation: int, n_heldout: int, started: float
) -> dict[str, Split]:
    """The train, validation and held-out splits (``make_split``), keyed by split name; prints
    the time since ``started`` after each."""
    splits = {}
    for name, seed_start, n in (
        ("train", TRAIN_SEED_START, n_train),
        ("validation", VALIDATION_SEED_START, n_validation),
        ("heldout", HELDOUT_SEED_START, n_heldout),
    ):
        splits[name] = make_split(pool, seed_start, n)
        print(f"{name}: {n} phantoms ({time.monotonic() - started:.0f} s)", flush=True)
    return splits


def _double_conv(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small U-Net: double 3x3 convolutions, max-pooling down, transposed convolutions up with
    skip connections, a 1x1 head. ``input_stride`` > 1 first averages the input over blocks, so
    the network (and its output) works at that fraction of the input resolution."""

    def __init__(self, widths: tuple[int, ...], input_stride: int = 1, channels_in: int = 1):
        super().__init__()
        self.input_stride = input_stride
        self.encoders = nn.ModuleList()
        channels = channels_in
        for width in widths:
            self.encoders.append(_double_conv(channels, width))
            channels = width
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
            self.decoders.append(_double_conv(2 * width, width))
            channels = width
        self.head = nn.Conv2d(channels, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """One output map (N x 1 x H/stride x W/stride), unbounded."""
        x = image
        if self.input_stride > 1:
            x = functional.avg_pool2d(x, self.input_stride)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level:
                x = functional.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips[:-1]), strict=True):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class MaskExport(nn.Module):
    """ONNX graph: lung probabilities (sigmoid of the U-Net's logits)."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per image, averaged over the batch."""
    probabilities = torch.sigmoid(logits)
    overlap = (probabilities * targets).sum(dim=(1, 2, 3))
    total = probabilities.sum(dim=(1, 2, 3)) + targets.sum(dim=(1, 2, 3))
    return (1 - (2 * overlap + 1) / (total + 1)).mean()


def predict(net: nn.Module, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Network outputs in eval mode (float32)."""
    return shared.predict(net, images, batch)


def input_dice(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-image Dice in the model's mask geometry (both thresholded at 0.5)."""
    return np.array(
        [dice(p[0] >= THRESHOLD, t[0] >= 0.5) for p, t in zip(probabilities, targets, strict=True)]
    )


def train(
    net: UNet, train_split: Split, validation: Split, epochs: int, batch: int
) -> tuple[float, int]:
    """AdamW with a one-cycle schedule on BCE + soft Dice, half of each batch mirrored; keeps the
    epoch with the best mean validation Dice."""
    generator = torch.Generator().manual_seed(1)
    steps = epochs * math.ceil(len(train_split.images) / batch)
    optimiser, schedule = shared.adamw_one_cycle(net.parameters(), 3e-3, steps)
    bce = nn.BCEWithLogitsLoss()

    def train_epoch() -> float:
        order = torch.randperm(len(train_split.images), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            index = np.sort(index)
            images = torch.from_numpy(train_split.images[index].astype(np.float32))
            targets = torch.from_numpy(train_split.targets[index].astype(np.float32))
            # Mirror half of each batch (image and mask): left and right lungs differ in shape.
            mirrored = torch.rand(len(index), generator=generator) < 0.5
            images[mirrored] = images[mirrored].flip(-1)
            targets[mirrored] = targets[mirrored].flip(-1)
            logits = net(images)
            loss = bce(logits, targets) + soft_dice_loss(logits, targets)
            shared.optimise(optimiser, schedule, loss)
            total += loss.item() * len(index)
        return total / len(order)

    def validate() -> tuple[float, str]:
        probabilities = 1 / (1 + np.exp(-predict(net, validation.images)))
        validation_dice = float(input_dice(probabilities, validation.targets).mean())
        return validation_dice, f"validation Dice {validation_dice:.4f}"

    best = shared.fit(net, epochs, train_epoch, validate, shared.BestEpoch(initial=-1.0))
    return best.score, best.epoch


def onnx_output(path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The ONNX file's single output from onnxruntime on the CPU."""
    return shared.onnx_outputs(path, images, batch)[0]


def onnx_latency_ms(path: Path, shape: tuple[int, ...], runs: int = 30) -> float:
    """Median milliseconds of one single-image onnxruntime run on one CPU thread (a random
    image, 3 untimed runs first)."""
    image = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    return shared.onnx_latency_ms(path, image, runs=runs, warmups=3)


def _heldout_source_dice(seed: int, probability: np.ndarray) -> float:
    """Dice of the node's view of one held-out phantom: mask mapped to source pixels."""
    ds, truth = render(phantom_job(seed))
    _, letterbox = prepare_input(ds, SPEC)
    predicted = letterbox.map_to_source(probability) >= THRESHOLD
    return dice(predicted, lung_truth(truth))


def heldout_source_dice(
    pool: multiprocessing.pool.Pool, split: Split, probabilities: np.ndarray
) -> np.ndarray:
    """Per-image held-out Dice in source pixels (phantoms re-rendered from their seeds)."""
    jobs = [(j.seed, p[0]) for j, p in zip(split.jobs, probabilities, strict=True)]
    return np.array(pool.starmap(_heldout_source_dice, jobs, chunksize=16))


def subgroup_metrics(values: np.ndarray, split: Split, name: str) -> dict[str, float | int]:
    """Mean and 95 % CI of per-image ``values`` by view and for images with opacifying
    findings, keyed ``{name}_{group}`` (groups with fewer than two images are left out)."""
    groups: dict[str, np.ndarray] = {
        f"view_{view.lower()}": np.array([s.view == view for s in split.jobs])
        for view in sorted({s.view for s in split.jobs})
    }
    for finding in OPACIFYING_FINDINGS:
        groups[finding] = np.array([any(finding in f for f in s.findings) for s in split.jobs])
    groups["no_findings"] = np.array([not s.findings for s in split.jobs])
    metrics: dict[str, float | int] = {}
    for group, members in groups.items():
        if members.sum() < 2:
            continue
        low, high = mean_confidence_interval(values[members])
        metrics[f"{name}_{group}"] = float(values[members].mean())
        metrics[f"{name}_{group}_ci_low"] = low
        metrics[f"{name}_{group}_ci_high"] = high
        metrics[f"{name}_{group}_n"] = int(members.sum())
    return metrics


def phantom_entries(started: float) -> dict[str, object]:
    """The [training] entries of the run and of the phantom mix (``phantom_job``) that the lung
    and bone-suppression cards share."""
    return {
        **shared.run_entries(started),
        "views": ",".join(VIEWS),
        "phantom_rows": ",".join(map(str, SIZES)),
        "phantom_columns": "0.85-1.15 x rows",
        "bits": ",".join(map(str, BITS)),
    }


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=1000, n_validation=100, n_heldout=300, epochs=6, batch=16
    )
    args = parser.parse_args()

    started = shared.start_run(args.out)

    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        splits = make_splits(pool, args.n_train, args.n_validation, args.n_heldout, started)

        net = UNet(WIDTHS, input_stride=MASK_STRIDE)
        training_started = time.monotonic()
        best_validation_dice, best_epoch = train(
            net, splits["train"], splits["validation"], args.epochs, args.batch
        )
        training_seconds = time.monotonic() - training_started
        export = MaskExport(net)
        onnx_path = args.out / f"{STEM}.onnx"
        export_onnx(export, onnx_path, SPEC, ["mask"])
        heldout = splits["heldout"]
        torch_probabilities = predict(export, heldout.images)
        probabilities = onnx_output(onnx_path, heldout.images)
        max_difference = float(np.abs(probabilities - torch_probabilities).max())
        shared.require_agreement(max_difference, "ONNX and torch disagree on held-out images")
        source_dice = heldout_source_dice(pool, heldout, probabilities)

    # Baseline: the mean training mask, the same for every image.
    mean_shape = splits["train"].targets.astype(np.float32).mean(axis=0, keepdims=True)
    baseline = input_dice(np.repeat(mean_shape, len(heldout.images), axis=0), heldout.targets)
    ci_low, ci_high = mean_confidence_interval(source_dice)
    metrics: dict[str, object] = {
        "heldout_dice": float(source_dice.mean()),
        "heldout_dice_ci_low": ci_low,
        "heldout_dice_ci_high": ci_high,
        "heldout_dice_ci_method": "normal approximation 95% of the per-image mean",
        "heldout_dice_median": float(np.median(source_dice)),
        "heldout_dice_min": float(source_dice.min()),
        "heldout_dice_geometry": "source pixels (mask mapped back through the letterbox)",
        "heldout_n": len(heldout.images),
        "heldout_seed_start": HELDOUT_SEED_START,
        **subgroup_metrics(source_dice, heldout, "heldout_dice"),
        "heldout_dice_model_geometry": float(input_dice(probabilities, heldout.targets).mean()),
        "mean_shape_baseline_dice_model_geometry": float(baseline.mean()),
        "threshold": THRESHOLD,
        "validation_dice_model_geometry": best_validation_dice,
        "validation_n": len(splits["validation"].images),
        "validation_seed_start": VALIDATION_SEED_START,
        "onnx_torch_max_abs_difference": max_difference,
        "onnx_bytes": onnx_path.stat().st_size,
        "onnx_ms_per_image_1_thread": onnx_latency_ms(onnx_path, INPUT_SHAPE),
    }
    training: dict[str, object] = {
        "n_train": len(splits["train"].images),
        "train_seed_start": TRAIN_SEED_START,
        "epochs": args.epochs,
        "best_epoch": best_epoch,
        "batch": args.batch,
        "widths": ",".join(map(str, WIDTHS)),
        "mask_stride": MASK_STRIDE,
        "loss": "BCE + soft Dice on area-fraction targets at the mask resolution",
        "augmentation": "horizontal mirror of half of each batch",
        "training_seconds": round(training_seconds),
        **phantom_entries(started),
        "finding_prevalence": FINDING_PREVALENCE,
        "data": "dicomnode.synth.cxr.make_cxr, settings drawn per seed by phantom_job (PA/AP, "
        "DX/CR, MONOCHROME1/2, random_findings), DICOM round trip, prepare_input",
    }
    description = (
        "Lung segmentation (small U-Net, mask at a quarter of the input resolution) of PA/AP "
        "chest radiographs. Trained only on synthetic chest phantoms (dicomnode.synth.cxr); "
        "metrics are on held-out phantoms, not patients. Research demo, not for clinical use."
    )
    card_path = args.out / f"{STEM}.toml"
    shared.write_card(
        card_path,
        Path(__file__).name,
        {
            "model": {
                "name": MODEL_NAME,
                "version": MODEL_VERSION,
                "task": "segmentation",
                "onnx": f"{STEM}.onnx",
                "description": description,
            },
            "input": input_table(SPEC),
            "outputs": [{"name": "mask", "kind": "mask"}],
            "labels": [shared.label_table(LUNG_CODE, "lung", THRESHOLD)],
            "select": select_table(VIEWS),
            "results": {"produce": ["seg"], "fractional": False},
            "metrics": metrics,
            "training": training,
        },
    )
    shared.print_summary(
        {"metrics": metrics, "training": training},
        f"{onnx_path} ({onnx_path.stat().st_size} bytes) and {card_path}",
    )


if __name__ == "__main__":
    main()
