"""Train the CT lung segmentation demo (small U-Net, one axial slice) on synthetic chest CT.

Input: one axial slice in the lung window (0..1), 160 x 160. Output ``mask`` (N, 1, 160, 160):
lung probabilities (sigmoid inside the graph). The lungs exclude the trachea and main bronchi
and include the vessels and nodules within them, as the phantom's truth does.

The card reports held-out Dice per series (3D, at the source resolution: probabilities mapped
back to the slice grid, thresholded at the card's threshold), mean and 95% CI over series.

Usage: python models/train/train_ct_lung_seg.py --out models
"""

from __future__ import annotations

import time
from pathlib import Path

import ct_common
import numpy as np
import onnxruntime
import shared
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dicomnode.evaluation import metrics as evaluation

STEM = "ct_lung_seg_demo"
MODEL_NAME = "ct-lung-seg-demo"
MODEL_VERSION = "1.0.0"
LUNG_CODE = ("39607008", "SCT", "Lung structure")
THRESHOLD = 0.5


def _block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class LungUNet(nn.Module):
    """U-Net of three levels at strides 2, 4, 8; logits at stride 2 upsampled bilinearly."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(*_block(1, 12, 2), *_block(12, 12))  # 80
        self.enc2 = nn.Sequential(*_block(12, 24, 2), *_block(24, 24))  # 40
        self.enc3 = nn.Sequential(*_block(24, 32, 2), *_block(32, 32))  # 20
        self.dec2 = nn.Sequential(*_block(32 + 24, 24))  # 40
        self.dec1 = nn.Sequential(*_block(24 + 12, 12))  # 80
        self.head = nn.Conv2d(12, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        logits = self.head(d1)
        return F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)


class MaskExport(nn.Module):
    def __init__(self, net: LungUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))


def slice_items(split: list[ct_common.Series]) -> list[tuple[int, int]]:
    return [(i, k) for i, s in enumerate(split) for k in range(len(s.images))]


def batch_of(split: list[ct_common.Series], items, rng: np.random.Generator):
    images, targets = [], []
    for i, k in items:
        image = split[i].images[k].astype(np.float32)[None]
        target = split[i].lung_input[k].astype(np.float32)[None] / 255.0
        if rng.random() < 0.5:
            image, target = image[:, :, ::-1], target[:, :, ::-1]
        images.append(np.ascontiguousarray(image))
        targets.append(np.ascontiguousarray(target))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on soft (area fraction) targets plus a soft Dice term."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    soft_dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + soft_dice


def predict(model: nn.Module, series: ct_common.Series, batch: int = 32) -> np.ndarray:
    return shared.predict(model, series.images[:, None], batch)[:, 0]


def onnx_predict(session, series: ct_common.Series, batch: int = 32) -> np.ndarray:
    return shared.onnx_outputs(session, series.images[:, None], batch, ["mask"])[0][:, 0]


def to_source(probabilities: np.ndarray, rows: int) -> np.ndarray:
    """Input-grid probabilities (slices, 160, 160) resampled to the source grid (bilinear over
    the whole image, as Letterbox.map_to_source does for an unpadded square image)."""
    out = np.empty((len(probabilities), rows, rows), np.float32)
    for k, plane in enumerate(probabilities):
        image = Image.fromarray(plane.astype(np.float32), mode="F")
        out[k] = np.asarray(image.resize((rows, rows), Image.Resampling.BILINEAR))
    return out


def series_dice(probabilities: np.ndarray, series: ct_common.Series, threshold: float) -> float:
    return evaluation.dice(to_source(probabilities, series.rows) >= threshold, series.lung())


def train(net, split, validation, epochs, batch, steps) -> tuple[float, int]:
    rng = np.random.default_rng(1)
    items = slice_items(split)
    optimiser, schedule = shared.adamw_one_cycle(net.parameters(), 3e-3, epochs * steps)
    export = MaskExport(net)

    def train_epoch() -> float:
        total = 0.0
        for _ in range(steps):
            picks = [items[i] for i in rng.integers(0, len(items), batch)]
            images, targets = batch_of(split, picks, rng)
            loss = loss_fn(net(images), targets)
            shared.optimise(optimiser, schedule, loss)
            total += loss.item()
        return total / steps

    def validate() -> tuple[float, str]:
        dices = [series_dice(predict(export, s), s, THRESHOLD) for s in validation]
        mean = float(np.mean(dices))
        return mean, f"validation Dice {mean:.4f}"

    best = shared.fit(net, epochs, train_epoch, validate, shared.BestEpoch(initial=-1.0))
    return best.score, best.epoch


def export_onnx(net: LungUNet, path: Path) -> None:
    """ONNX opset 17: input ``image`` [N,1,160,160]; output ``mask`` [N,1,160,160]."""
    shared.export_onnx(MaskExport(net), path, ct_common.slice_spec(1).shape, ["mask"])


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=100, n_validation=16, n_heldout=24, epochs=4, batch=16,
        per_epoch=("--steps", 60, "batches per epoch"),
    )  # fmt: skip
    args = parser.parse_args()

    started = shared.start_run(args.out)
    splits = ct_common.load_splits(args.n_train, args.n_validation, args.n_heldout, args.workers)
    print(f"data ready ({time.monotonic() - started:.0f} s)", flush=True)
    net = LungUNet()
    best_dice, best_epoch = train(
        net, splits["train"], splits["validation"], args.epochs, args.batch, args.steps
    )
    onnx_path = args.out / f"{STEM}.onnx"
    export_onnx(net, onnx_path)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    export = MaskExport(net).eval()
    dices, difference = [], 0.0
    for series in splits["heldout"]:
        probabilities = onnx_predict(session, series)
        difference = max(difference, float(np.abs(probabilities - predict(export, series)).max()))
        dices.append(series_dice(probabilities, series, THRESHOLD))
    shared.require_agreement(difference, "ONNX and torch disagree on held-out series")
    low, high = evaluation.mean_confidence_interval(dices)
    metrics: dict[str, object] = {
        "heldout_dice_mean": float(np.mean(dices)),
        "heldout_dice_ci_low": low,
        "heldout_dice_ci_high": high,
        "heldout_dice_ci_method": "normal approximation 95% over series",
        "heldout_dice_min": float(np.min(dices)),
        "heldout_dice_scope": "3D per series at source resolution, threshold 0.5",
        "heldout_scans": len(dices),
        "heldout_slices_per_scan": len(splits["heldout"][0].images),
        "heldout_seed_start": ct_common.SPLIT_SEEDS["heldout"],
        "validation_dice_mean": best_dice,
        "validation_scans": len(splits["validation"]),
        "validation_seed_start": ct_common.SPLIT_SEEDS["validation"],
        "onnx_torch_max_abs_difference": difference,
    }
    training = ct_common.training_table(
        started,
        n_train=len(splits["train"]),
        train_seed_start=ct_common.SPLIT_SEEDS["train"],
        torch_seed=0,
        numpy_seed=1,
        epochs=args.epochs,
        best_epoch=best_epoch,
        steps_per_epoch=args.steps,
        batch=args.batch,
    )
    description = (
        "Lung segmentation for chest CT, one axial slice at a time (lung window), small U-Net. "
        "Trained only on synthetic chest CT phantoms (dicomnode.synth.ct); Dice is measured on "
        f"held-out phantoms, not patients. {ct_common.RESEARCH_DEMO}"
    )
    shared.write_card(
        args.out / f"{STEM}.toml",
        "train_ct_lung_seg.py",
        {
            "model": {
                "name": MODEL_NAME,
                "version": MODEL_VERSION,
                "task": "segmentation",
                "onnx": f"{STEM}.onnx",
                "description": description,
            },
            "input": ct_common.input_table(ct_common.slice_spec(1)),
            "outputs": [{"name": "mask", "kind": "mask"}],
            "labels": [shared.label_table(LUNG_CODE, "lung", THRESHOLD)],
            "select": ct_common.select_table(),
            "results": {"produce": ["seg"]},
            "metrics": metrics,
            "training": training,
        },
    )
    shared.print_summary(
        {"metrics": metrics, "training": training},
        f"{onnx_path} ({onnx_path.stat().st_size} bytes) and {STEM}.toml",
    )


if __name__ == "__main__":
    main()
