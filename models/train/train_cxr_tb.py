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
import time
from pathlib import Path

import cxr_common as common
import numpy as np
import shared
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
    train, validation, heldout = common.load_splits(
        args.n_train, args.n_validation, args.n_heldout, shape, args.workers, frontal=True
    )
    if normalisation == "zscore":
        spec = common.zscore_spec(train.images, shape)
    else:
        spec = InputSpec(shape=shape, normalisation="unit")
    targets = train.label("tuberculosis")[:, None]
    positives = float(targets.sum())
    print(f"{name}: train {len(targets)} frontal phantoms, {positives:.0f} TB", flush=True)
    pos_weight = torch.tensor([min(4.0, (len(targets) - positives) / max(positives, 1.0))])

    net = common.CamNet(features(), channels, 1)
    validation_labels = validation.label("tuberculosis")
    validate = common.auc_validation(validation.images, validation_labels, spec)

    member_started = time.monotonic()
    best_score, best_epoch, _ = common.train(
        net, train.images, targets, spec, loss_fn=nn.BCEWithLogitsLoss(pos_weight=pos_weight),
        validate=validate, epochs=args.epochs, batch=args.batch,
    )  # fmt: skip
    validation_scores = common.predict(net, validation.images, spec, "sigmoid")[:, 0]
    threshold = common.youden(validation_scores, validation_labels)

    onnx_path = args.out / f"{stem}.onnx"
    (probability, _), difference = common.export_checked(
        net, onnx_path, spec, OUTPUTS, heldout.images
    )
    shared.require_agreement(difference, f"{name}: ONNX and torch disagree")
    scores = probability[:, 0]
    labels = heldout.label("tuberculosis")
    metrics: dict[str, object] = {
        **common.heldout_binary_metrics(scores, labels, threshold),
        "threshold": threshold,
        "threshold_method": "Youden J on validation phantoms",
        "validation_auc": best_score,
        "validation_n": len(validation_labels),
        "onnx_torch_max_abs_difference": difference,
    }
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
        "labels": [shared.label_table(TUBERCULOSIS, "tuberculosis", threshold)],
        "select": common.select_table(),
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
    shared.write_card(args.out / f"{stem}.toml", Path(__file__).name, sections)
    print(f"{name}: held-out AUC {metrics['auc']:.4f} ({time.monotonic() - started:.0f} s)")
    return sections, validation_scores, scores


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=2000, n_validation=400, n_heldout=600, epochs=14, batch=32,
        out_help="folder for ONNX + cards", n_train_help="phantoms (all views)",
    )  # fmt: skip
    args = parser.parse_args()

    started = shared.start_run(args.out)
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
        **common.heldout_binary_metrics(heldout_mean, labels, threshold),
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
    description = (
        "Tuberculosis-pattern ensemble for PA/AP chest radiographs: the mean probability of "
        f"{MEMBERS[0][0]} ({MEMBERS[0][6]}) and {MEMBERS[1][0]} ({MEMBERS[1][6]}). It runs no "
        "ONNX file of its own; each member runs on its own [input]; this card's [input] only "
        "repeats the first member's. Trained only on synthetic chest phantoms; metrics are on "
        f"held-out phantoms, not patients. {common.RESEARCH_DEMO}"
    )
    card_path = args.out / f"{ENSEMBLE_STEM}.toml"
    shared.write_card(
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
            "labels": [shared.label_table(TUBERCULOSIS, "tuberculosis", threshold)],
            "select": common.select_table(),
            "ensemble": {"members": [m[0] for m in MEMBERS], "combine": "mean"},
            "metrics": metrics,
            "training": common.training_table(started, members=", ".join(m[0] for m in MEMBERS)),
        },
    )
    shared.print_summary({"metrics": metrics}, str(card_path))


if __name__ == "__main__":
    main()
