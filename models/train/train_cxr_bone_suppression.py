"""Train the demo bone-suppression network on synthetic chest phantoms and export it to ONNX.

Run from the repository root (about 2.5 minutes on 2 CPU cores with the defaults; the phantoms
are rendered once and cached together with the lung segmentation script's):

    python models/train/train_cxr_bone_suppression.py --out models

The target is the phantom's ``soft_tissue`` image (``dicomnode.synth.cxr.CxrTruth``): the same
exposure, noise and window without ribs, clavicles, scapulae, spine and sternum. It is written
into a copy of the DICOM data set and passed through ``prepare_input`` exactly like the input,
so the network learns input -> soft tissue in the card's 'unit' intensity space (the node
adds its correction, output minus input, to the source in stored units with
``apply_correction`` for the derived image).

Network: space-to-depth by 4 (PixelUnshuffle), the lung script's small U-Net on the 64 x 64
grid, depth-to-space back to the full 256 x 256 input, added to the input (the network predicts
what to subtract). Full-resolution detail survives the coarse grid through the 16 channels per
cell. Trained on random 128 x 128 crops (bone suppression is local) with an L1 loss.

Held-out metrics compare the model's output and the unchanged input with the soft-tissue truth:
in the model's geometry (the image part of the letterbox) and in source pixels (the output
mapped back with ``Letterbox.map_to_source`` as the node writes the derived image, where the
256-pixel resampling alone costs detail: the card also reports the input passed through the
same resampling).
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.pool
import time
from pathlib import Path

import numpy as np
import shared
import torch
from cxr_common import export_onnx, input_table, select_table
from torch import nn
from train_cxr_lung_seg import (
    HELDOUT_SEED_START,
    SPEC,
    TRAIN_SEED_START,
    VALIDATION_SEED_START,
    VIEWS,
    Split,
    UNet,
    make_splits,
    onnx_latency_ms,
    onnx_output,
    phantom_entries,
    phantom_job,
    predict,
    render,
    soft_tissue_dataset,
)

from dicomnode.evaluation.metrics import mean_confidence_interval
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.pipeline.presentation_values import presentation_pixels

MODEL_NAME = "cxr-bone-suppression-demo"
MODEL_VERSION = "1.0.0"
STEM = "cxr_bone_suppression_demo"
INPUT_SHAPE = SPEC.shape
# Space-to-depth factor: the U-Net runs on a 64 x 64 grid of 4 x 4 pixel cells.
CELL = 4
WIDTHS = (16, 32, 64, 96)
CROP = 128
# Pixels whose input differs from the soft-tissue truth by more than this (0..1 presentation
# units) count as bone pixels for the bone-signal metric.
BONE_PIXEL = 0.02
# The image the output stands for (label truth "soft_tissue" for ``dicomnode models eval``).
SOFT_TISSUE_CODE = ("87784001", "SCT", "Soft tissues")


class BoneSuppressionNet(nn.Module):
    """Input plus a learned correction: space-to-depth, U-Net, depth-to-space."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, cell: int = CELL) -> None:
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(cell)
        self.unet = UNet(widths, channels_in=cell * cell)
        # The lung U-Net ends in one map; bone suppression needs one value per pixel of a cell.
        self.unet.head = nn.Conv2d(widths[0], cell * cell, 1)
        # Start as the identity (no correction): the input is already close to the target.
        nn.init.zeros_(self.unet.head.weight)
        nn.init.zeros_(self.unet.head.bias)
        self.shuffle = nn.PixelShuffle(cell)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Soft-tissue estimate (N x 1 x H x W) in the input's intensity space."""
        return image + self.shuffle(self.unet(self.unshuffle(image)))


def region_mae(a: np.ndarray, b: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Per-image mean absolute difference over the image region (N x 1 x H x W arrays)."""
    return np.array(
        [np.abs(x - y)[r].mean() for x, y, r in zip(a, b, regions, strict=True)], dtype=np.float64
    )


def _random_crops(
    split: Split, index: np.ndarray, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CROP x CROP crops (inputs, targets, region weights), one per image, inside the image
    part of the letterbox where it is large enough, half of them mirrored."""
    size = split.images.shape[-1]
    images, targets, weights = [], [], []
    draws = torch.rand(len(index), 3, generator=generator).numpy()
    for (row_draw, col_draw, mirror_draw), i in zip(draws, index, strict=True):
        rows = np.flatnonzero(split.regions[i, 0].any(axis=1))
        cols = np.flatnonzero(split.regions[i, 0].any(axis=0))
        row_low, row_high = rows[0], max(rows[0], min(rows[-1] + 1 - CROP, size - CROP))
        col_low, col_high = cols[0], max(cols[0], min(cols[-1] + 1 - CROP, size - CROP))
        row = min(int(row_low + row_draw * (row_high - row_low + 1)), size - CROP)
        col = min(int(col_low + col_draw * (col_high - col_low + 1)), size - CROP)
        window = (slice(None), slice(row, row + CROP), slice(col, col + CROP))
        parts = [split.images[i][window], split.soft[i][window], split.regions[i][window]]
        if mirror_draw < 0.5:
            parts = [p[..., ::-1] for p in parts]
        images.append(parts[0])
        targets.append(parts[1])
        weights.append(parts[2])
    return (
        torch.from_numpy(np.stack(images).astype(np.float32)),
        torch.from_numpy(np.stack(targets).astype(np.float32)),
        torch.from_numpy(np.stack(weights).astype(np.float32)),
    )


def train(
    net: BoneSuppressionNet, train_split: Split, validation: Split, epochs: int, batch: int
) -> tuple[float, int]:
    """AdamW with a one-cycle schedule, L1 over the image region of random crops; keeps the
    epoch with the lowest validation MAE (whole inputs)."""
    generator = torch.Generator().manual_seed(1)
    steps = epochs * math.ceil(len(train_split.images) / batch)
    optimiser, schedule = shared.adamw_one_cycle(net.parameters(), 3e-3, steps)

    def train_epoch() -> float:
        order = torch.randperm(len(train_split.images), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), batch):
            index = np.sort(order[start : start + batch])
            images, targets, weights = _random_crops(train_split, index, generator)
            error = (net(images) - targets).abs() * weights
            loss = error.sum() / weights.sum().clamp(min=1.0)
            shared.optimise(optimiser, schedule, loss)
            total += loss.item() * len(index)
        return total / len(order)

    def validate() -> tuple[float, str]:
        outputs = predict(net, validation.images)
        mae = float(region_mae(outputs, validation.soft, validation.regions).mean())
        return -mae, f"validation MAE {mae:.5f}"  # scores are -MAE: the lowest MAE is kept

    best = shared.fit(net, epochs, train_epoch, validate, shared.BestEpoch(), loss_format=".5f")
    return -best.score, best.epoch


def _box_mean(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over every size x size window ('valid' positions) via an integral image."""
    integral = np.pad(image, ((1, 0), (1, 0))).cumsum(axis=0).cumsum(axis=1)
    total = (
        integral[size:, size:]
        - integral[:-size, size:]
        - integral[size:, :-size]
        + integral[:-size, :-size]
    )
    return total / (size * size)


def ssim(a: np.ndarray, b: np.ndarray, size: int = 7) -> float:
    """Mean structural similarity of two 0..1 images (uniform size x size windows, data range 1,
    K1 0.01, K2 0.03, as skimage's ``structural_similarity`` with its defaults)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    c1, c2 = 0.01**2, 0.03**2
    mean_a, mean_b = _box_mean(a, size), _box_mean(b, size)
    # Sample (co)variances, as skimage: n / (n - 1).
    correction = size * size / (size * size - 1)
    var_a = (_box_mean(a * a, size) - mean_a**2) * correction
    var_b = (_box_mean(b * b, size) - mean_b**2) * correction
    covariance = (_box_mean(a * b, size) - mean_a * mean_b) * correction
    numerator = (2 * mean_a * mean_b + c1) * (2 * covariance + c2)
    denominator = (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    return float((numerator / denominator).mean())


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for data range 1."""
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def _region_box(region: np.ndarray) -> tuple[slice, slice]:
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def model_geometry_metrics(
    images: np.ndarray, outputs: np.ndarray, soft: np.ndarray, regions: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-image MAE, PSNR, SSIM (image part of the letterbox) of the output and of the input
    versus the soft-tissue truth, and the MAE on bone pixels."""
    values: dict[str, list[float]] = {}
    for image, output, target, region in zip(images, outputs, soft, regions, strict=True):
        image, output, target, region = image[0], np.clip(output[0], 0, 1), target[0], region[0]
        box = _region_box(region)
        bone = (np.abs(image - target) > BONE_PIXEL) & region
        for name, candidate in (("output", output), ("input", image)):
            error = candidate - target
            values.setdefault(f"mae_{name}", []).append(float(np.abs(error)[region].mean()))
            values.setdefault(f"psnr_{name}", []).append(psnr(float((error[region] ** 2).mean())))
            values.setdefault(f"ssim_{name}", []).append(ssim(candidate[box], target[box]))
            values.setdefault(f"bone_pixel_mae_{name}", []).append(
                float(np.abs(error)[bone].mean())
            )
    return {key: np.array(value) for key, value in values.items()}


def _source_metrics(seed: int, output: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """Source-pixel MAE and PSNR of one held-out phantom: the node's derived image (output
    mapped back), the original input, the input through the same 256-pixel resampling, and the
    source plus the mapped-back correction."""
    ds, truth = render(phantom_job(seed))
    _, letterbox = prepare_input(ds, SPEC)
    target = presentation_pixels(soft_tissue_dataset(ds, truth.soft_tissue))
    source = presentation_pixels(ds)
    candidates = {
        "output": np.clip(letterbox.map_to_source(output), 0, 1),
        "input": source,
        "resampled_input": np.clip(letterbox.map_to_source(image), 0, 1),
        # Not what the node does today: only the correction (output - input) mapped back and
        # added to the full-resolution source keeps the detail the resampling loses.
        "source_plus_correction": np.clip(source + letterbox.map_to_source(output - image), 0, 1),
    }
    metrics = {}
    for name, candidate in candidates.items():
        error = candidate - target
        metrics[f"mae_{name}"] = float(np.abs(error).mean())
        metrics[f"psnr_{name}"] = psnr(float((error**2).mean()))
    return metrics


def source_geometry_metrics(
    pool: multiprocessing.pool.Pool, split: Split, outputs: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-image source-pixel metrics (phantoms re-rendered from their seeds)."""
    jobs = [
        (job.seed, output[0], image[0].astype(np.float32))
        for job, output, image in zip(split.jobs, outputs, split.images, strict=True)
    ]
    rows = pool.starmap(_source_metrics, jobs, chunksize=8)
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def summarise(values: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """Mean and 95 % CI of each per-image metric, keyed ``{prefix}_{metric}``."""
    metrics: dict[str, float] = {}
    for key, value in values.items():
        low, high = mean_confidence_interval(value)
        metrics[f"{prefix}_{key}"] = float(value.mean())
        metrics[f"{prefix}_{key}_ci_low"] = low
        metrics[f"{prefix}_{key}_ci_high"] = high
    return metrics


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=1000, n_validation=100, n_heldout=300, epochs=30, batch=16
    )
    args = parser.parse_args()

    started = shared.start_run(args.out)

    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        splits = make_splits(pool, args.n_train, args.n_validation, args.n_heldout, started)

        net = BoneSuppressionNet()
        training_started = time.monotonic()
        best_validation_mae, best_epoch = train(
            net, splits["train"], splits["validation"], args.epochs, args.batch
        )
        training_seconds = time.monotonic() - training_started
        onnx_path = args.out / f"{STEM}.onnx"
        export_onnx(net, onnx_path, SPEC, ["soft_tissue"])
        heldout = splits["heldout"]
        torch_outputs = predict(net, heldout.images)
        outputs = onnx_output(onnx_path, heldout.images)
        max_difference = float(np.abs(outputs - torch_outputs).max())
        shared.require_agreement(max_difference, "ONNX and torch disagree on held-out images")
        source = source_geometry_metrics(pool, heldout, outputs)

    images = heldout.images.astype(np.float32)
    soft = heldout.soft.astype(np.float32)
    model = model_geometry_metrics(images, outputs, soft, heldout.regions)
    gain = 1 - model["bone_pixel_mae_output"] / model["bone_pixel_mae_input"]
    low, high = mean_confidence_interval(gain)
    metrics: dict[str, object] = {
        **summarise(model, "heldout"),
        "heldout_bone_error_removed": float(gain.mean()),
        "heldout_bone_error_removed_ci_low": low,
        "heldout_bone_error_removed_ci_high": high,
        **summarise(source, "heldout_source"),
        "heldout_geometry": "heldout_*: model input (256 x 256, image part of the letterbox); "
        "heldout_source_*: source pixels, output mapped back as the node writes it",
        "heldout_ci_method": "normal approximation 95% of the per-image mean",
        "heldout_intensity_space": "0..1 presentation values (card window, MONOCHROME1 inverted)",
        "heldout_bone_pixel_threshold": BONE_PIXEL,
        "heldout_n": len(heldout.images),
        "heldout_seed_start": HELDOUT_SEED_START,
        "validation_mae": best_validation_mae,
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
        "crop": CROP,
        "cell": CELL,
        "widths": ",".join(map(str, WIDTHS)),
        "loss": "L1 to the soft-tissue truth over the image part of random crops",
        "augmentation": "random crops, horizontal mirror of half of them",
        "training_seconds": round(training_seconds),
        **phantom_entries(started),
        "data": "dicomnode.synth.cxr.make_cxr via train_cxr_lung_seg.phantom_job (PA/AP, DX/CR, "
        "MONOCHROME1/2, random findings), DICOM round trip, prepare_input; target "
        "CxrTruth.soft_tissue through the same prepare_input",
    }
    description = (
        "Bone suppression (soft-tissue image) of PA/AP chest radiographs. A space-to-depth U-Net "
        "at 256 x 256 removes ribs, clavicles, scapulae and spine; the node writes its output as "
        "a derived image. Trained only on synthetic chest phantoms (dicomnode.synth.cxr); "
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
                "task": "image-to-image",
                "onnx": f"{STEM}.onnx",
                "description": description,
            },
            "input": input_table(SPEC),
            "outputs": [{"name": "soft_tissue", "kind": "image"}],
            "labels": [shared.label_table(SOFT_TISSUE_CODE, "soft_tissue")],
            "select": {**select_table(VIEWS), "monochrome_only": True},
            "results": {"produce": ["derived"]},
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
