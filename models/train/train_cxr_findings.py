"""Train the demo multi-finding CXR classifier with class-activation maps and export it to ONNX.

Run from the repository root (about 4-5 minutes on 2 CPU cores once the phantoms are cached):

    python models/train/train_cxr_findings.py --out models

One sigmoid output per finding of the phantoms (the tube is left to the landmark model, nodules
to the nodule detector): the
network ends in global average pooling and one linear layer, and the ONNX graph also outputs
the class-activation maps (the linear layer applied at every feature position). Per-label
thresholds are Youden's J on validation phantoms; the card records held-out AUC with DeLong 95 %
CI, sensitivity, specificity and how often the CAM peak lies inside the finding's region.
"""

from __future__ import annotations

from pathlib import Path

import cxr_common as common
import numpy as np
import shared
import torch
from torch import nn

MODEL_NAME = "cxr-findings-demo"
MODEL_VERSION = "1.0.0"
STEM = "cxr_findings_demo"
SHAPE = (1, 256, 256)
# Finding -> (SNOMED CT code, meaning, critical). Nodules are left to cxr-nodule-demo (a
# detector at higher resolution): at 256 px this classifier reached only AUC 0.63 for them.
LABELS: dict[str, tuple[str, str, bool]] = {
    "pneumothorax": ("36118008", "Pneumothorax", True),
    "effusion": ("60046008", "Pleural effusion", True),
    "consolidation": ("95436008", "Lung consolidation", True),
    "cardiomegaly": ("8186001", "Cardiomegaly", False),
    "edema": ("19242006", "Pulmonary edema", True),
    "tuberculosis": ("154283005", "Pulmonary tuberculosis", False),
}
OUTPUTS = ["probabilities", "heatmap"]


def label_matrix(split: common.Split) -> np.ndarray:
    """N x len(LABELS) float targets."""
    return np.stack([split.label(name) for name in LABELS], axis=1)


def mean_auc(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean per-label AUC over the labels that have positives and negatives."""
    values = [
        common.auc(probabilities[:, i], targets[:, i])
        for i in range(targets.shape[1])
        if 0 < targets[:, i].sum() < len(targets)
    ]
    return float(np.mean(values)) if values else 0.0


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=2000, n_validation=400, n_heldout=600, epochs=16, batch=32,
        n_train_help="phantoms (all views)",
    )  # fmt: skip
    args = parser.parse_args()

    started = shared.start_run(args.out)
    train, validation, heldout = common.load_splits(
        args.n_train, args.n_validation, args.n_heldout, SHAPE, args.workers, frontal=True
    )
    spec = common.zscore_spec(train.images, SHAPE)
    targets = label_matrix(train)
    validation_targets = label_matrix(validation)
    positives = targets.sum(axis=0)
    counts = dict(zip(LABELS, positives.astype(int).tolist(), strict=True))
    print(f"train {len(targets)} frontal phantoms, positives {counts}", flush=True)

    # Rarer findings weigh more so that every label is learnt (capped at 4).
    pos_weight = torch.tensor(
        np.clip((len(targets) - positives) / np.maximum(positives, 1), 1.0, 4.0),
        dtype=torch.float32,
    )
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    net = common.CamNet(common.plain_features((16, 32, 48, 64, 96)), 96, len(LABELS))

    def validate(model: nn.Module) -> tuple[float, float]:
        probabilities = common.predict(model, validation.images, spec, "sigmoid")
        loss = common.bce(probabilities, validation_targets)
        return mean_auc(probabilities, validation_targets), loss

    best_score, best_epoch, _ = common.train(
        net, train.images, targets, spec, loss_fn=loss_fn, validate=validate,
        epochs=args.epochs, batch=args.batch,
    )  # fmt: skip
    validation_probabilities = common.predict(net, validation.images, spec, "sigmoid")
    thresholds = {
        name: common.youden(validation_probabilities[:, i], validation_targets[:, i])
        for i, name in enumerate(LABELS)
    }

    onnx_path = args.out / f"{STEM}.onnx"
    (probabilities, heatmaps), difference = common.export_checked(
        net, onnx_path, spec, OUTPUTS, heldout.images
    )
    shared.require_agreement(difference, "ONNX and torch disagree on held-out phantoms")

    heldout_targets = label_matrix(heldout)
    metrics: dict[str, object] = {
        "heldout_n": len(heldout_targets),
        "heldout_seed_start": common.SPLIT_SEEDS["heldout"],
        "heldout_views": "PA and AP phantoms of the held-out mix",
        "heldout_mean_auc": mean_auc(probabilities, heldout_targets),
        "auc_ci_method": "DeLong 95%",
        "threshold_method": "Youden J per label on validation phantoms",
        "validation_mean_auc": best_score,
        "validation_n": len(validation_targets),
        "validation_seed_start": common.SPLIT_SEEDS["validation"],
        "cam_localisation_method": "fraction of held-out positives with a region whose CAM peak "
        "lies inside the finding's region (mask, or box where the truth has boxes)",
    }
    for i, name in enumerate(LABELS):
        metrics.update(
            common.binary_metrics(
                name, probabilities[:, i], heldout_targets[:, i], thresholds[name]
            )
        )
        finding = common.FINDINGS.index(name)
        located = (heldout_targets[:, i] == 1) & heldout.has_region[:, finding]
        if located.any():
            hits = common.cam_peak_in_region(
                heatmaps[located, i], heldout.regions[located, finding]
            )
            metrics[f"cam_localisation_{name}"] = float(hits.mean())
            metrics[f"cam_localisation_{name}_n"] = int(located.sum())
    metrics["onnx_torch_max_abs_difference"] = difference

    description = (
        "Multi-finding classifier for PA/AP chest radiographs (pneumothorax, pleural effusion, "
        "consolidation, cardiomegaly, pulmonary edema, tuberculosis pattern; nodules are left to "
        "cxr-nodule-demo) with one "
        "class-activation map per finding. Trained only on synthetic chest phantoms "
        "(dicomnode.synth.cxr); metrics are on held-out phantoms, not patients. "
        + common.RESEARCH_DEMO
    )
    labels = [
        shared.label_table((code, "SCT", meaning), name, thresholds[name], critical, index=i)
        for i, (name, (code, meaning, critical)) in enumerate(LABELS.items())
    ]
    training = common.training_table(
        started,
        n_train=len(targets),
        train_seed_start=common.SPLIT_SEEDS["train"],
        epochs=args.epochs,
        best_epoch=best_epoch,
        batch=args.batch,
        loss="BCE with positive weights (negatives/positives, capped at 4)",
    )
    card_path = args.out / f"{STEM}.toml"
    shared.write_card(
        card_path,
        Path(__file__).name,
        {
            "model": {
                "name": MODEL_NAME,
                "version": MODEL_VERSION,
                "task": "multi-label",
                "onnx": onnx_path.name,
                "description": description,
            },
            "input": common.input_table(spec),
            "outputs": [
                {"name": "probabilities", "kind": "probabilities"},
                {"name": "heatmap", "kind": "heatmap"},
            ],
            "labels": labels,
            "select": common.select_table(),
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
