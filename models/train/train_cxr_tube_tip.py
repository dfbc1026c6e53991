"""Train the demo CXR tube/catheter tip landmark model on synthetic phantoms and export it to ONNX.

Run from the repository root (about 4 minutes on 2 CPU cores with the phantom cache that
``train_cxr_nodule.py`` leaves; it renders the phantoms itself otherwise):

    python models/train/train_cxr_tube_tip.py --out models

The phantoms are those of ``train_cxr_nodule.py`` (same seeds, acquisitions and preparation
through a DICOM round trip and ``prepare_input``): half of them have an endotracheal tube or a
central venous line, whose tip (``truth.landmarks["tube_tip"]``) is mapped into model-input
pixels with the Letterbox geometry. The network (the nodule detector's stride-4 backbone) predicts
a tip heatmap and a sub-cell offset; it trains on random crops with CenterNet's focal loss. The
ONNX graph decodes the maps itself: the highest heatmap cell with its offset gives the tip
(x, y) in model-input pixels and its sigmoid the presence score, as (N, 1, 3) landmark rows.
The card gets the held-out presence AUC and the tip distances in mm measured with the ONNX file.
"""

from __future__ import annotations

import time

import numpy as np
import shared
import torch
import torch.nn.functional as F
import train_cxr_nodule as localisation
from torch import nn

from dicomnode.evaluation import metrics as evaluation
from dicomnode.models.registry import InputSpec

MODEL_NAME = "cxr-tube-tip-demo"
MODEL_VERSION = "1.0.0"
STEM = "cxr_tube_tip_demo"
STRIDE = localisation.STRIDE
CROP = 160
# SNOMED CT "Catheter" (DICOM CID 6404 Chest Non-lesion Object Type); the point is its tip.
TIP_CODE = ("19923001", "SCT", "Catheter")
TIP_SIGMA_CELLS = 1.0
DISTANCES_MM = (5.0, 10.0, 20.0)


def decode_tip(raw: torch.Tensor) -> torch.Tensor:
    """(N, 1, 3) rows (x, y, score) in input pixels (pixel-centre convention) from the raw head
    (tip logit, offset x, offset y per cell): the highest cell and its offset."""
    batch, _, rows, cols = raw.shape
    logit, index = torch.topk(raw[:, 0].reshape(batch, rows * cols), 1, dim=1)
    offsets = torch.gather(
        raw[:, 1:3].reshape(batch, 2, rows * cols), 2, index.unsqueeze(1).expand(batch, 2, 1)
    )
    cell_y = torch.div(index, cols, rounding_mode="floor")
    cell_x = (index - cell_y * cols).to(raw.dtype)
    x = (cell_x + torch.sigmoid(offsets[:, 0])) * STRIDE - 0.5
    y = (cell_y.to(raw.dtype) + torch.sigmoid(offsets[:, 1])) * STRIDE - 0.5
    return torch.stack([x, y, torch.sigmoid(logit)], dim=2)


class TipExport(nn.Module):
    """ONNX graph: the network and its landmark decoding."""

    def __init__(self, net: localisation.CentreNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return decode_tip(self.net(image))


def tip_loss(raw: torch.Tensor, tips: np.ndarray) -> torch.Tensor:
    """Focal loss on the tip heatmap plus smooth L1 on the offset logits at the tip cell;
    ``tips`` are (x, y) in crop pixels, NaN where the crop shows no tip."""
    _, _, rows, cols = raw.shape
    heat_targets, offset_loss, n_tips = [], raw.new_zeros(()), 0
    for i, (x, y) in enumerate(tips):
        if np.isnan(x):
            heat_targets.append(np.zeros((rows, cols), dtype=np.float32))
            continue
        # Pixel-centre position -> grid units measured from the grid's top-left edge.
        centre = np.array([[(x + 0.5) / STRIDE, (y + 0.5) / STRIDE]], dtype=np.float32)
        heat, cells, offsets = localisation.gaussian_targets(
            centre, np.array([TIP_SIGMA_CELLS]), rows, cols
        )
        heat_targets.append(heat)
        picked = raw[i, 1:3].reshape(2, -1)[:, int(cells[0])]
        target = torch.from_numpy(np.log(offsets[0] / (1 - offsets[0])).astype(np.float32))
        offset_loss = offset_loss + F.smooth_l1_loss(picked, target, reduction="sum")
        n_tips += 1
    heat_target = torch.from_numpy(np.stack(heat_targets)).unsqueeze(1)
    return localisation.focal_loss(raw[:, 0:1], heat_target) + offset_loss / max(n_tips, 1) / 2


def crop_tips(tips: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """A tip (x, y) shifted into a crop at (x0, y0); NaN when it lies outside (or is NaN)."""
    x, y = tips[0] - x0, tips[1] - y0
    inside = 0 <= x < side - 0.5 and 0 <= y < side - 0.5
    return np.array([x, y] if inside else [np.nan, np.nan], dtype=np.float32)


def tip_distances_mm(
    predicted: np.ndarray, truth: np.ndarray, mm_per_pixel: np.ndarray
) -> np.ndarray:
    """Euclidean distances in mm between (x, y) input-pixel points, rows scaled by the input
    pixel size (rows, columns) in mm."""
    dx = (predicted[:, 0] - truth[:, 0]) * mm_per_pixel[:, 1]
    dy = (predicted[:, 1] - truth[:, 1]) * mm_per_pixel[:, 0]
    return np.hypot(dx, dy)


def tip_metrics(
    rows: np.ndarray, split: localisation.LocalisationSplit
) -> tuple[float, np.ndarray]:
    """Presence AUC and the tip distances (mm) of the phantoms with a tube."""
    present = split.has_tip
    distances = tip_distances_mm(
        rows[present, 0, :2], split.tips[present], split.mm_per_pixel[present]
    )
    return evaluation.roc_auc(present, rows[:, 0, 2]), distances


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=1200, n_validation=200, n_heldout=400, epochs=12, batch=16
    )
    args = parser.parse_args()

    started = shared.start_run(args.out)
    splits = localisation.load_splits(args.n_train, args.n_validation, args.n_heldout, args.workers)
    train, validation, heldout = splits["train"], splits["validation"], splits["heldout"]
    data_seconds = time.monotonic() - started
    spec: InputSpec = localisation.zscore_spec(train)
    print(f"phantoms ready ({data_seconds:.0f} s); input z-score {spec.mean} / {spec.std}")

    net = localisation.CentreNet(regressions=2)
    decoder = TipExport(net)

    def loss_of_batch(raw: torch.Tensor, crops: localisation.CropBatch) -> torch.Tensor:
        tips = np.stack(
            [
                crop_tips(train.tips[i], x, y, CROP)
                for i, (x, y) in zip(crops.index, crops.origins, strict=True)
            ]
        )
        return tip_loss(raw, tips)

    def validate() -> float:
        area, distances = tip_metrics(
            localisation.predict(decoder, validation.images, spec), validation
        )
        return (area + float((distances <= 10.0).mean())) / 2

    targets = [tip[None, :] if not np.isnan(tip[0]) else np.zeros((0, 2)) for tip in train.tips]
    best_score, best_epoch = localisation.train_crops(
        net,
        train.images,
        targets,
        spec,
        loss_of_batch,
        validate,
        args.epochs,
        args.batch,
        crop=CROP,
    )
    train_seconds = time.monotonic() - started - data_seconds
    validation_rows = localisation.predict(decoder, validation.images, spec)
    threshold = float(
        f"{evaluation.youden_threshold(validation.has_tip, validation_rows[:, 0, 2]):.6g}"
    )

    onnx_path = args.out / f"{STEM}.onnx"
    localisation.export_onnx(decoder, onnx_path, "landmarks")
    torch_rows = localisation.predict(decoder, heldout.images, spec)
    rows = localisation.onnx_run(onnx_path, heldout.images, spec)
    max_difference = localisation.ranked_difference(rows, torch_rows)
    if rows.shape != (len(heldout.seeds), 1, 3) or max_difference > 1e-3:
        raise SystemExit(f"ONNX and torch disagree on held-out phantoms by {max_difference:.2e}")

    present = heldout.has_tip
    scores = rows[:, 0, 2]
    area, distances = tip_metrics(rows, heldout)
    auc_low, auc_high = evaluation.auc_confidence_interval(present, scores)
    sensitivity, specificity = evaluation.sensitivity_specificity(present, scores, threshold)
    detected = scores[present] >= threshold
    metrics: dict[str, object] = {
        "presence_auc": area,
        "presence_auc_ci_low": auc_low,
        "presence_auc_ci_high": auc_high,
        "presence_auc_ci_method": "DeLong 95%",
        "presence_score": "landmark score (sigmoid of the highest heatmap cell)",
        "threshold": threshold,
        "threshold_method": "Youden J of presence on validation phantoms",
        "sensitivity": sensitivity,
        "specificity": specificity,
        "tip_distance_median_mm": float(np.median(distances)),
        "tip_distance_p90_mm": float(np.percentile(distances, 90)),
        "tip_distance_mean_mm": float(distances.mean()),
        "tip_distance_median_mm_detected": float(np.median(distances[detected]))
        if detected.any()
        else -1.0,
    }
    for limit in DISTANCES_MM:
        metrics[f"tip_within_{limit:g}_mm"] = float((distances <= limit).mean())
    metrics.update(
        {
            "tip_distance_scope": "all held-out phantoms with a tube, whatever their score",
            "heldout_n": len(heldout.seeds),
            "heldout_with_tube": int(present.sum()),
            "heldout_seed_start": localisation.HELDOUT_SEED_START,
            "validation_score": best_score,
            "validation_score_method": "(presence AUC + fraction within 10 mm) / 2",
            "validation_n": len(validation.seeds),
            "validation_seed_start": localisation.VALIDATION_SEED_START,
            "onnx_torch_max_abs_difference": max_difference,
            "onnx_ms_per_image_1_thread": localisation.ms_per_image(onnx_path, spec),
        }
    )
    training = {
        "n_train": len(train.seeds),
        "train_seed_start": localisation.TRAIN_SEED_START,
        "epochs": args.epochs,
        "best_epoch": best_epoch,
        "batch": args.batch,
        "crop": CROP,
        "seconds": round(time.monotonic() - started),
        "train_seconds": round(train_seconds),
        "phantom_seconds": round(data_seconds),
        "torch": torch.__version__,
        "data": (
            "dicomnode.synth.cxr.make_cxr PA/AP (the nodule detector's phantoms): endotracheal "
            f"tube or central line in {localisation.TUBE_PREVALENCE:.0%} of phantoms, nodules "
            f"in {localisation.NODULE_PREVALENCE:.0%}, other findings "
            f"{localisation.DISTRACTOR_PREVALENCE:.0%} each"
        ),
    }
    card_path = args.out / f"{STEM}.toml"
    localisation.write_card(
        card_path,
        "train_cxr_tube_tip.py",
        {
            "name": MODEL_NAME,
            "version": MODEL_VERSION,
            "task": "landmark",
            "onnx": f"{STEM}.onnx",
            "description": (
                "Tip of an endotracheal tube or central venous catheter on PA/AP chest "
                "radiographs: one landmark (the tip) with a presence score. Trained only on "
                "synthetic chest phantoms (dicomnode.synth.cxr); metrics are on held-out "
                "phantoms, not patients. Research demo, not for clinical use."
            ),
        },
        spec,
        {"name": "landmarks", "kind": "landmarks", "min_score": 0.05},
        shared.label_table(TIP_CODE, "tube_tip", threshold),
        metrics,
        training,
    )
    shared.print_summary(
        {"metrics": metrics, "training": training},
        f"{onnx_path} ({onnx_path.stat().st_size} bytes) and {card_path}",
    )


if __name__ == "__main__":
    main()
