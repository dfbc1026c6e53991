"""Train the demo normal/abnormal CXR triage classifier (with a CAM) and export it to ONNX.

Run from the repository root (about 3 minutes on 2 CPU cores once the phantoms are cached;
rendering the 3000 phantoms of the three splits takes about 5 minutes more, once):

    python models/train/train_cxr_triage.py --out models

Abnormal = any finding of the phantoms except a tube. The network ends in global average
pooling and one linear unit; the ONNX graph outputs the probability and the class-activation
map. The threshold is Youden's J on validation phantoms; the card records the held-out AUC with
its DeLong 95 % CI, sensitivity and specificity, overall and per finding (sensitivity only).
"""

from __future__ import annotations

from pathlib import Path

import cxr_common as common
import shared
from torch import nn

MODEL_NAME = "cxr-triage-demo"
MODEL_VERSION = "1.0.0"
STEM = "cxr_triage_demo"
SHAPE = (1, 224, 224)
ABNORMAL = ("263654008", "SCT", "Abnormal")
OUTPUTS = ["probability", "heatmap"]


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=2000, n_validation=400, n_heldout=600, epochs=20, batch=32,
        n_train_help="phantoms (all views)",
    )  # fmt: skip
    args = parser.parse_args()

    started = shared.start_run(args.out)
    train, validation, heldout = common.load_splits(
        args.n_train, args.n_validation, args.n_heldout, SHAPE, args.workers, frontal=True
    )
    spec = common.zscore_spec(train.images, SHAPE)
    targets = train.abnormal()[:, None]
    print(f"train {len(targets)} frontal phantoms, {int(targets.sum())} abnormal", flush=True)

    net = common.CamNet(common.plain_features((12, 24, 48, 64, 96)), 96, 1)

    validate = common.auc_validation(validation.images, validation.abnormal(), spec)
    best_score, best_epoch, _ = common.train(
        net, train.images, targets, spec, loss_fn=nn.BCEWithLogitsLoss(), validate=validate,
        epochs=args.epochs, batch=args.batch,
    )  # fmt: skip
    validation_scores = common.predict(net, validation.images, spec, "sigmoid")[:, 0]
    threshold = common.youden(validation_scores, validation.abnormal())

    onnx_path = args.out / f"{STEM}.onnx"
    (probability, _), difference = common.export_checked(
        net, onnx_path, spec, OUTPUTS, heldout.images
    )
    shared.require_agreement(difference, "ONNX and torch disagree on held-out phantoms")
    scores = probability[:, 0]

    labels = heldout.abnormal()
    metrics: dict[str, object] = {
        **common.heldout_binary_metrics(scores, labels, threshold),
        "heldout_views": "PA and AP phantoms of the held-out mix",
        "threshold": threshold,
        "threshold_method": "Youden J on validation phantoms",
        "validation_auc": best_score,
        "validation_n": len(validation.abnormal()),
        "validation_seed_start": common.SPLIT_SEEDS["validation"],
    }
    # Which abnormal studies the triage misses, by finding present.
    predicted = scores >= threshold
    for name in common.FINDINGS:
        if name == "tube":
            continue
        present = heldout.label(name) == 1
        if present.any():
            metrics[f"sensitivity_{name}"] = float(predicted[present].mean())
    metrics["onnx_torch_max_abs_difference"] = difference

    description = (
        "Normal/abnormal triage of PA/AP chest radiographs (abnormal = any of pneumothorax, "
        "pleural effusion, consolidation, cardiomegaly, pulmonary edema, nodule, tuberculosis "
        "pattern; a tube alone is normal) with a class-activation map. Trained only on "
        "synthetic chest phantoms (dicomnode.synth.cxr); metrics are on held-out phantoms, not "
        f"patients. {common.RESEARCH_DEMO}"
    )
    training = common.training_table(
        started,
        n_train=len(targets),
        train_seed_start=common.SPLIT_SEEDS["train"],
        epochs=args.epochs,
        best_epoch=best_epoch,
        batch=args.batch,
    )
    card_path = args.out / f"{STEM}.toml"
    shared.write_card(
        card_path,
        Path(__file__).name,
        {
            "model": {
                "name": MODEL_NAME,
                "version": MODEL_VERSION,
                "task": "classification",
                "onnx": onnx_path.name,
                "description": description,
            },
            "input": common.input_table(spec),
            "outputs": [
                {"name": "probability", "kind": "probabilities"},
                {"name": "heatmap", "kind": "heatmap"},
            ],
            "labels": [shared.label_table(ABNORMAL, "abnormal", threshold)],
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
