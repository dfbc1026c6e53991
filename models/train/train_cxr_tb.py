"""Train the two members of the demo tuberculosis-pattern ensemble and write the ensemble card.

Run from the repository root (about 5 minutes on 2 CPU cores once the phantoms are cached):

    python models/train/train_cxr_tb.py --out models

Two differently built classifiers of the tuberculosis pattern (upper-lobe opacities and cavities)
on PA/AP phantoms, each exported to its own ONNX file with a member-only card
([model] standalone = false):

- cxr-tb-cnn-demo: plain CNN (conv blocks and max-pooling) at 224 px, z-score input;
- cxr-tb-resnet-demo: residual CNN with strided and dilated residual blocks at 256 px,
  'unit' (0..1) input.

cxr_tb_ensemble_demo.toml (task "ensemble", no ONNX of its own) averages their probabilities;
its threshold is Youden's J of the averaged score on validation phantoms. The card records the
held-out AUC (DeLong 95 % CI) of each member and of the ensemble. Its [input] repeats the first
member's shape because the schema requires one; the pipeline runs each member on its own input.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cxr_common as common
import numpy as np
import torch
from torch import nn

from dicomnode.models.registry import InputSpec

VERSION = "1.0.0"
ENSEMBLE_NAME = "cxr-tb-ensemble-demo"
ENSEMBLE_STEM = "cxr_tb_ensemble_demo"
TUBERCULOSIS = ("154283005", "SCT", "Pulmonary tuberculosis")
OUTPUTS = ["probability", "heatmap"]


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions (the second dilated) with an identity or 1x1 projection shortcut."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(
                channels_out, channels_out, 3, padding=dilation, dilation=dilation, bias=False
            ),
            nn.BatchNorm2d(channels_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def residual_features() -> nn.Sequential:
    """Stem (stride 4) then residual blocks: two strided, two dilated; output stride 16."""
    return nn.Sequential(
        nn.Conv2d(1, 12, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm2d(12),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        ResidualBlock(12, 24, stride=2, dilation=1),
        ResidualBlock(24, 48, stride=2, dilation=2),
        ResidualBlock(48, 64, stride=1, dilation=2),
        ResidualBlock(64, 64, stride=1, dilation=4),
    )


# name, file stem, input shape, normalisation, features, feature channels, description
MEMBERS = (
    (
        "cxr-tb-cnn-demo",
        "cxr_tb_cnn_demo",
        (1, 224, 224),
        "zscore",
        lambda: common.plain_features((12, 24, 48, 64, 96)),
        96,
        "plain CNN (conv blocks, max-pooling) at 224 px with z-score input",
    ),
    (
        "cxr-tb-resnet-demo",
        "cxr_tb_resnet_demo",
        (1, 256, 256),
        "unit",
        residual_features,
        64,
        "residual CNN (strided and dilated residual blocks) at 256 px with 0..1 input",
    ),
)


def train_member(
    args: argparse.Namespace, member: tuple, started: float
) -> tuple[dict[str, object], np.ndarray, np.ndarray]:
    """Train, export and card one member; returns its card sections, validation and held-out
    probabilities."""
    name, stem, shape, normalisation, features, channels, build = member
    train = common.prepared_split("train", args.n_train, shape, args.workers).frontal()
    validation = common.prepared_split("validation", args.n_validation, shape, args.workers)
    validation = validation.frontal()
    heldout = common.prepared_split("heldout", args.n_heldout, shape, args.workers).frontal()
    if normalisation == "zscore":
        spec = common.zscore_spec(train, shape)
    else:
        spec = InputSpec(shape=shape, normalisation="unit")
    targets = train.label("tuberculosis")[:, None]
    positives = float(targets.sum())
    print(f"{name}: train {len(targets)} frontal phantoms, {positives:.0f} TB", flush=True)
    pos_weight = torch.tensor([min(4.0, (len(targets) - positives) / max(positives, 1.0))])

    net = common.CamNet(features(), channels, 1)
    validation_labels = validation.label("tuberculosis")

    def validate(model: nn.Module) -> tuple[float, float]:
        p = np.clip(common.predict(model, validation.images, spec, "sigmoid")[:, 0], 1e-7, 1 - 1e-7)
        t = validation_labels
        loss = float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean())
        return common.auc(p, t), loss

    member_started = time.monotonic()
    best_score, best_epoch, _ = common.train(
        net, train.images, targets, spec, loss_fn=nn.BCEWithLogitsLoss(pos_weight=pos_weight),
        validate=validate, epochs=args.epochs, batch=args.batch,
    )  # fmt: skip
    validation_scores = common.predict(net, validation.images, spec, "sigmoid")[:, 0]
    threshold = common.youden(validation_scores, validation_labels)

    onnx_path = args.out / f"{stem}.onnx"
    common.export_onnx(common.CamExport(net, "sigmoid"), onnx_path, spec, OUTPUTS)
    probability, _ = common.onnx_outputs(onnx_path, heldout.images, spec, OUTPUTS)
    scores = probability[:, 0]
    difference = float(
        np.abs(scores - common.predict(net, heldout.images, spec, "sigmoid")[:, 0]).max()
    )
    if difference > 1e-4:
        raise SystemExit(f"{name}: ONNX and torch disagree by {difference:.2e}")
    labels = heldout.label("tuberculosis")
    metrics: dict[str, object] = {
        **common.binary_metrics("", scores, labels, threshold),
        "auc_ci_method": "DeLong 95%",
        "heldout_n": len(labels),
        "heldout_prevalence": float(labels.mean()),
        "heldout_seed_start": common.SPLIT_SEEDS["heldout"],
        "threshold": threshold,
        "threshold_method": "Youden J on validation phantoms",
        "validation_auc": best_score,
        "validation_n": len(validation_labels),
        "onnx_torch_max_abs_difference": difference,
    }
    code, scheme, meaning = TUBERCULOSIS
    sections: dict[str, object] = {
        "model": {
            "name": name,
            "version": VERSION,
            "task": "classification",
            "onnx": onnx_path.name,
            "standalone": False,
            "description": (
                f"Tuberculosis-pattern classifier, member of {ENSEMBLE_NAME} only: {build}. "
                "Trained only on synthetic chest phantoms (dicomnode.synth.cxr); metrics are on "
                f"held-out phantoms, not patients. {common.RESEARCH_DEMO}"
            ),
        },
        "input": common.input_table(spec),
        "outputs": [
            {"name": "probability", "kind": "probabilities"},
            {"name": "heatmap", "kind": "heatmap"},
        ],
        "labels": [
            {
                "index": 0,
                "code_value": code,
                "code_scheme": scheme,
                "code_meaning": meaning,
                "threshold": threshold,
                "critical": False,
                "truth": "tuberculosis",
            }
        ],
        "select": {"modalities": ["DX", "CR"], "body_parts": ["CHEST"], "views": ["PA", "AP"]},
        "metrics": metrics,
        "training": common.training_table(
            member_started,
            n_train=len(targets),
            train_seed_start=common.SPLIT_SEEDS["train"],
            epochs=args.epochs,
            best_epoch=best_epoch,
            batch=args.batch,
            architecture=build,
        ),
    }
    common.write_card(args.out / f"{stem}.toml", Path(__file__).name, sections)
    print(f"{name}: held-out AUC {metrics['auc']:.4f} ({time.monotonic() - started:.0f} s)")
    return sections, validation_scores, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder for ONNX + cards")
    parser.add_argument("--n-train", type=int, default=2000, help="phantoms (all views)")
    parser.add_argument("--n-validation", type=int, default=400)
    parser.add_argument("--n-heldout", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="phantom generator processes")
    args = parser.parse_args()

    started = time.monotonic()
    common.set_deterministic()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [train_member(args, member, started) for member in MEMBERS]

    # The same phantoms in the same order at every shape: the labels are shared.
    shape = MEMBERS[0][2]
    validation = common.prepared_split("validation", args.n_validation, shape).frontal()
    heldout = common.prepared_split("heldout", args.n_heldout, shape).frontal()
    validation_mean = np.mean([r[1] for r in results], axis=0)
    heldout_mean = np.mean([r[2] for r in results], axis=0)
    threshold = common.youden(validation_mean, validation.label("tuberculosis"))
    labels = heldout.label("tuberculosis")
    metrics: dict[str, object] = {
        **common.binary_metrics("", heldout_mean, labels, threshold),
        "auc_ci_method": "DeLong 95%",
        "heldout_n": len(labels),
        "heldout_prevalence": float(labels.mean()),
        "heldout_seed_start": common.SPLIT_SEEDS["heldout"],
        "threshold": threshold,
        "threshold_method": "Youden J of the mean member probability on validation phantoms",
        "validation_auc": common.auc(validation_mean, validation.label("tuberculosis")),
    }
    for (_, _, scores), member in zip(results, MEMBERS, strict=True):
        key = member[1].removeprefix("cxr_tb_").removesuffix("_demo")
        low, high = common.auc_ci(scores, labels)
        metrics[f"auc_member_{key}"] = common.auc(scores, labels)
        metrics[f"auc_member_{key}_ci_low"] = low
        metrics[f"auc_member_{key}_ci_high"] = high
    member_aucs = [common.auc(r[2], labels) for r in results]
    metrics["member_score_correlation"] = float(np.corrcoef(results[0][2], results[1][2])[0, 1])
    metrics["ensemble_auc_minus_best_member"] = metrics["auc"] - max(member_aucs)

    first = results[0][0]
    code, scheme, meaning = TUBERCULOSIS
    description = (
        "Tuberculosis-pattern ensemble for PA/AP chest radiographs: the mean probability of "
        f"{MEMBERS[0][0]} ({MEMBERS[0][6]}) and {MEMBERS[1][0]} ({MEMBERS[1][6]}). It runs no "
        "ONNX file of its own; each member runs on its own [input]; this card's [input] only "
        "repeats the first member's. Trained only on synthetic chest phantoms; metrics are on "
        f"held-out phantoms, not patients. {common.RESEARCH_DEMO}"
    )
    card_path = args.out / f"{ENSEMBLE_STEM}.toml"
    common.write_card(
        card_path,
        Path(__file__).name,
        {
            "model": {
                "name": ENSEMBLE_NAME,
                "version": VERSION,
                "task": "ensemble",
                "description": description,
            },
            "input": first["input"],
            "outputs": [{"name": "probability", "kind": "probabilities"}],
            "labels": [
                {
                    "index": 0,
                    "code_value": code,
                    "code_scheme": scheme,
                    "code_meaning": meaning,
                    "threshold": threshold,
                    "critical": False,
                    "truth": "tuberculosis",
                }
            ],
            "select": {"modalities": ["DX", "CR"], "body_parts": ["CHEST"], "views": ["PA", "AP"]},
            "ensemble": {"members": [m[0] for m in MEMBERS], "combine": "mean"},
            "metrics": metrics,
            "training": common.training_table(started, members=", ".join(m[0] for m in MEMBERS)),
        },
    )
    print(json.dumps({"metrics": metrics}, indent=2, default=str))
    print(f"wrote {card_path}")


if __name__ == "__main__":
    main()
