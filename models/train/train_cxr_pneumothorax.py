"""Train the demo pneumothorax classifier on synthetic chest phantoms and export it to ONNX.

Run from the repository root (about 15-20 minutes on 2 CPU cores):

    python models/train/train_cxr_pneumothorax.py --out models

Phantoms come from ``dicomnode.synth.cxr.make_cxr`` and go through a DICOM write/read round
trip and ``dicomnode.pipeline.preprocess.prepare_input`` with the card's InputSpec, the same
preprocessing the node applies at inference. Train, validation and held-out test phantoms use
disjoint seed ranges. The card (TOML) is written with the metrics measured in this run.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.pool
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shared
import torch
from cxr_common import input_table, select_table, zscore_spec
from torch import nn

from dicomnode.evaluation import metrics as evaluation
from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.synth.cxr import make_cxr

MODEL_NAME = "cxr-pneumothorax-demo"
MODEL_VERSION = "1.1.0"
STEM = "cxr_pneumothorax_demo"
INPUT_SHAPE = (1, 256, 256)
# Rows of the phantoms, drawn per seed (columns 0.85-1.15 x rows): the model sees radiographs
# of many sizes, downsampled more or less to its input, whose noise and sharpness differ.
# Version 1.0.0 saw 512 x 512 only, and its specificity fell to 0.6 at 256 rows and to 0
# at 320 (every image positive), its sensitivity to 0.8 at 1024.
PHANTOM_ROWS = (320, 384, 448, 512, 640, 768, 1024)
# Held out as well: radiographs at a detector's full size, larger than any trained on.
LARGE_ROWS = 2048
LARGE_SEED_START = 1_500_000
TRAIN_SEED_START = 0
VALIDATION_SEED_START = 500_000
HELDOUT_SEED_START = 1_000_000
PNEUMOTHORAX_CODE = ("36118008", "SCT", "Pneumothorax")


@dataclass
class Split:
    """Prepared model inputs of one seed range with their labels and pneumothorax sides."""

    images: np.ndarray  # N x C x H x W float16
    labels: np.ndarray  # N, 0/1
    sides: list[str | None]
    rows: np.ndarray  # N, the phantoms' rows


def phantom_shape(seed: int) -> tuple[int, int, str, str]:
    """Rows, columns, view and photometric interpretation of the seed's phantom."""
    rng = np.random.default_rng([seed, 36118008])
    rows = int(rng.choice(PHANTOM_ROWS))
    columns = round(rows * rng.uniform(0.85, 1.15))
    view = "AP" if rng.random() < 0.35 else "PA"
    photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
    return rows, columns, view, photometric


def phantom_input(job: tuple[int, bool, dict, int]) -> tuple[np.ndarray, str | None, int]:
    """Make one phantom, round-trip it through DICOM bytes and prepare it as the node would.
    ``rows`` 0: the seed's own size (``phantom_shape``); else square phantoms of that size."""
    seed, pneumothorax, spec_fields, rows = job
    if rows:
        columns, view, photometric = rows, "PA", "MONOCHROME2"
    else:
        rows, columns, view, photometric = phantom_shape(seed)
    ds, truth = make_cxr(
        seed,
        pneumothorax=pneumothorax,
        size=rows,
        columns=columns,
        view=view,
        photometric=photometric,
    )
    sample, _ = prepare_input(shared.round_trip(ds), InputSpec(**spec_fields))
    return sample.astype(np.float16), truth.side, rows


def make_split(
    pool: multiprocessing.pool.Pool, seed_start: int, n: int, spec: InputSpec, rows: int = 0
) -> Split:
    """Phantoms with seeds seed_start.. ; odd seeds carry a pneumothorax (50 % prevalence).
    ``rows`` 0: each seed's own size; else all square phantoms of that many rows."""
    seeds = range(seed_start, seed_start + n)
    jobs = [(seed, seed % 2 == 1, spec.model_dump(), rows) for seed in seeds]
    results = pool.map(phantom_input, jobs, chunksize=4 if rows > 1024 else 16)
    return Split(
        images=np.stack([image for image, _, _ in results]),
        labels=np.array([seed % 2 for seed in seeds], dtype=np.float32),
        sides=[side for _, side, _ in results],
        rows=np.array([size for _, _, size in results]),
    )


def _block(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    ]


class PneumothoraxNet(nn.Module):
    """Small CNN ending in global average pooling and one linear unit, so the CAM is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            *_block(16, 32),
            nn.MaxPool2d(2),
            *_block(32, 64),
            nn.MaxPool2d(2),
            *_block(64, 96),
            *_block(96, 128),
        )
        self.classifier = nn.Linear(128, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logit per image (N x 1)."""
        return self.classifier(self.features(image).mean(dim=(2, 3)))


class ExportWrapper(nn.Module):
    """ONNX graph: sigmoid probability and the class-activation map.

    The CAM is the linear layer applied at every position of the last feature maps (weights and
    bias), so its spatial mean equals the logit.
    """

    def __init__(self, net: PneumothoraxNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.features(image)
        weight = self.net.classifier.weight.view(1, -1, 1, 1)
        cam = (features * weight).sum(dim=1, keepdim=True) + self.net.classifier.bias.view(
            1, 1, 1, 1
        )
        probability = torch.sigmoid(cam.mean(dim=(2, 3)))
        return probability, cam


def bce(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities."""
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def predict(net: PneumothoraxNet, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Sigmoid probabilities of the network in eval mode."""
    return shared.predict(nn.Sequential(net, nn.Sigmoid()), images, batch)[:, 0]


def train(
    net: PneumothoraxNet, train_split: Split, validation: Split, epochs: int, batch: int
) -> tuple[float, int]:
    """Train with AdamW and a one-cycle schedule; keep the epoch with the best validation AUC
    (ties broken by the lower validation loss)."""
    generator = torch.Generator().manual_seed(1)
    steps = epochs * math.ceil(len(train_split.labels) / batch)
    optimiser, schedule = shared.adamw_one_cycle(net.parameters(), 3e-3, steps)
    loss_fn = nn.BCEWithLogitsLoss()

    def train_epoch() -> float:
        order = torch.randperm(len(train_split.labels), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            images = torch.from_numpy(train_split.images[index].astype(np.float32))
            # Mirror half the batch: the finding may be on either side, anatomy mirrored too.
            flip = torch.rand(len(index), generator=generator) < 0.5
            images[flip] = images[flip].flip(-1)
            labels = torch.from_numpy(train_split.labels[index]).unsqueeze(1)
            loss = loss_fn(net(images), labels)
            shared.optimise(optimiser, schedule, loss)
            total += loss.item() * len(index)
        return total / len(order)

    def validate() -> tuple[tuple[float, float], str]:
        validation_probabilities = predict(net, validation.images)
        validation_auc = evaluation.roc_auc(validation.labels, validation_probabilities)
        validation_loss = bce(validation_probabilities, validation.labels)
        report = f"validation AUC {validation_auc:.4f} loss {validation_loss:.4f}"
        return (validation_auc, -validation_loss), report

    best = shared.BestEpoch(initial=(-1.0, -math.inf))
    shared.fit(net, epochs, train_epoch, validate, best)
    return best.score[0], best.epoch


def export_onnx(net: PneumothoraxNet, path: Path) -> None:
    """ONNX opset 17: input ``image`` [N,1,256,256]; outputs ``probability`` and ``cam``."""
    shared.export_onnx(
        ExportWrapper(net), path, INPUT_SHAPE, ["probability", "cam"], ignore=DeprecationWarning
    )


def onnx_outputs(path: Path, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and CAMs from onnxruntime on the CPU."""
    probabilities, cams = shared.onnx_outputs(path, images, batch, ["probability", "cam"])
    return probabilities[:, 0], cams[:, 0]


def cam_side_agreement(cams: np.ndarray, split: Split) -> float:
    """Fraction of positives whose CAM peak lies on the pneumothorax side (image left = R)."""
    hits = []
    for cam, label, side in zip(cams, split.labels, split.sides, strict=True):
        if label != 1:
            continue
        col = np.unravel_index(np.argmax(cam), cam.shape)[1]
        peak_side = "R" if col < cam.shape[1] / 2 else "L"
        hits.append(peak_side == side)
    return float(np.mean(hits))


def write_card(
    path: Path, spec: InputSpec, metrics: dict, training: dict, threshold: float
) -> None:
    """The model card with this run's preprocessing, threshold and measured metrics."""
    description = (
        "Pneumothorax classifier for PA/AP chest radiographs with a class-activation map. "
        "Trained only on synthetic chest phantoms (dicomnode.synth.cxr); metrics are on held-out "
        "phantoms, not patients. Research demo, not for clinical use."
    )
    shared.write_card(
        path,
        "train_cxr_pneumothorax.py",
        {
            "model": {
                "name": MODEL_NAME,
                "version": MODEL_VERSION,
                "task": "classification",
                "onnx": f"{STEM}.onnx",
                "description": description,
            },
            "input": input_table(spec),
            "outputs": [
                {"name": "probability", "kind": "probabilities"},
                {"name": "cam", "kind": "heatmap"},
            ],
            "labels": [
                shared.label_table(PNEUMOTHORAX_CODE, "pneumothorax", threshold, critical=True)
            ],
            "select": select_table(),
            "metrics": metrics,
            "training": training,
        },
        quote_nonfinite=False,
    )


def operating_point(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    """AUC, sensitivity and specificity at ``threshold``."""
    predicted = probabilities >= threshold
    return {
        "auc": evaluation.roc_auc(labels, probabilities),
        "sensitivity": float(predicted[labels == 1].mean()),
        "specificity": float((~predicted[labels == 0]).mean()),
        "n": len(labels),
    }


def by_size(split: Split, probabilities: np.ndarray, threshold: float, sizes: list[int]) -> dict:
    """Held-out metrics of each group of phantom rows (``sizes``: the groups' upper bounds)."""
    groups = {}
    lower = 0
    for upper in sizes:
        chosen = (split.rows > lower) & (split.rows <= upper)
        point = operating_point(split.labels[chosen], probabilities[chosen], threshold)
        for key, value in point.items():
            groups[f"heldout_rows_{lower + 1}_{upper}_{key}"] = value
        lower = upper
    return groups


def input_spec(pool: multiprocessing.pool.Pool, n: int) -> InputSpec:
    """The z-score InputSpec: mean and standard deviation of unit-normalised inputs over ``n``
    (at most 256) training phantoms."""
    unit = InputSpec(shape=INPUT_SHAPE, normalisation="unit")
    return zscore_spec(make_split(pool, TRAIN_SEED_START, n, unit).images, INPUT_SHAPE)


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=3000, n_validation=500, n_heldout=600, epochs=20, batch=32
    )
    parser.add_argument(
        "--n-large", type=int, default=100, help=f"held-out phantoms of {LARGE_ROWS} rows"
    )
    args = parser.parse_args()

    started = shared.start_run(args.out)

    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        spec = input_spec(pool, 64)
        print(f"input z-score mean {spec.mean} std {spec.std}", flush=True)
        splits = {}
        for name, seed_start, n in (
            ("train", TRAIN_SEED_START, args.n_train),
            ("validation", VALIDATION_SEED_START, args.n_validation),
            ("heldout", HELDOUT_SEED_START, args.n_heldout),
        ):
            splits[name] = make_split(pool, seed_start, n, spec)
            print(f"{name}: {n} phantoms ({time.monotonic() - started:.0f} s)", flush=True)
        large = make_split(pool, LARGE_SEED_START, args.n_large, spec, rows=LARGE_ROWS)
        print(f"large: {args.n_large} phantoms ({time.monotonic() - started:.0f} s)", flush=True)

    net = PneumothoraxNet()
    best_validation_auc, best_epoch = train(
        net, splits["train"], splits["validation"], args.epochs, args.batch
    )
    validation_probabilities = predict(net, splits["validation"].images)
    # Rounded as the card stores it, so the reported operating point is the card's.
    threshold = float(
        f"{evaluation.youden_threshold(splits['validation'].labels, validation_probabilities):.6g}"
    )

    onnx_path = args.out / f"{STEM}.onnx"
    export_onnx(net, onnx_path)
    heldout = splits["heldout"]
    torch_probabilities = predict(net, heldout.images)
    probabilities, cams = onnx_outputs(onnx_path, heldout.images)
    max_difference = float(np.abs(probabilities - torch_probabilities).max())
    shared.require_agreement(max_difference, "ONNX and torch disagree on held-out phantoms")

    heldout_auc = evaluation.roc_auc(heldout.labels, probabilities)
    ci_low, ci_high = evaluation.auc_confidence_interval(heldout.labels, probabilities)
    predicted = probabilities >= threshold
    sensitivity = float(predicted[heldout.labels == 1].mean())
    specificity = float((~predicted[heldout.labels == 0]).mean())
    large_probabilities, _ = onnx_outputs(onnx_path, large.images)
    large_point = operating_point(large.labels, large_probabilities, threshold)
    seconds = round(time.monotonic() - started)
    metrics = {
        "heldout_auc": heldout_auc,
        "heldout_auc_ci_low": ci_low,
        "heldout_auc_ci_high": ci_high,
        "heldout_auc_ci_method": "DeLong 95%",
        "heldout_n": len(heldout.labels),
        "heldout_prevalence": float(heldout.labels.mean()),
        "heldout_seed_start": HELDOUT_SEED_START,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "threshold": threshold,
        "threshold_method": "Youden J on validation phantoms",
        "validation_auc": best_validation_auc,
        "validation_n": len(splits["validation"].labels),
        "validation_seed_start": VALIDATION_SEED_START,
        **by_size(heldout, probabilities, threshold, [448, 640, 1024]),
        **{f"heldout_rows_{LARGE_ROWS}_{key}": value for key, value in large_point.items()},
        "heldout_rows_2048_seed_start": LARGE_SEED_START,
        "cam_peak_on_pneumothorax_side": cam_side_agreement(cams, heldout),
        "onnx_torch_max_abs_difference": max_difference,
    }
    training = {
        "n_train": len(splits["train"].labels),
        "train_seed_start": TRAIN_SEED_START,
        "epochs": args.epochs,
        "best_epoch": best_epoch,
        "batch": args.batch,
        "seconds": seconds,
        "torch": torch.__version__,
        "phantom_rows": ", ".join(map(str, PHANTOM_ROWS)),
        "phantom_columns": "0.85-1.15 x rows",
        "data": "dicomnode.synth.cxr.make_cxr, odd seeds with pneumothorax, PA 65 % / AP 35 %, "
        "MONOCHROME1 30 %",
    }
    card_path = args.out / f"{STEM}.toml"
    write_card(card_path, spec, metrics, training, threshold)  # loaded back as the node does
    shared.print_summary(
        {"metrics": metrics, "training": training},
        f"{onnx_path} ({onnx_path.stat().st_size} bytes) and {card_path}",
    )


if __name__ == "__main__":
    main()
