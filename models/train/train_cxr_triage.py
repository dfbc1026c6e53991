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

import argparse
import json
import time
from pathlib import Path

import cxr_common as common
import numpy as np
from torch import nn

MODEL_NAME = "cxr-triage-demo"
MODEL_VERSION = "1.0.0"
STEM = "cxr_triage_demo"
SHAPE = (1, 224, 224)
ABNORMAL = ("263654008", "SCT", "Abnormal")
OUTPUTS = ["probability", "heatmap"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder for ONNX + card")
    parser.add_argument("--n-train", type=int, default=2000, help="phantoms (all views)")
    parser.add_argument("--n-validation", type=int, default=400)
    parser.add_argument("--n-heldout", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="phantom generator processes")
    args = parser.parse_args()

    started = time.monotonic()
    common.set_deterministic()
    args.out.mkdir(parents=True, exist_ok=True)
    train = common.prepared_split("train", args.n_train, SHAPE, args.workers).frontal()
    validation = common.prepared_split("validation", args.n_validation, SHAPE, args.workers)
    validation = validation.frontal()
    heldout = common.prepared_split("heldout", args.n_heldout, SHAPE, args.workers).frontal()
    spec = common.zscore_spec(train, SHAPE)
    targets = train.abnormal()[:, None]
    print(f"train {len(targets)} frontal phantoms, {int(targets.sum())} abnormal", flush=True)

    net = common.CamNet(common.plain_features((12, 24, 48, 64, 96)), 96, 1)

    def validate(model: nn.Module) -> tuple[float, float]:
        p = np.clip(common.predict(model, validation.images, spec, "sigmoid")[:, 0], 1e-7, 1 - 1e-7)
        t = validation.abnormal()
        loss = float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean())
        return common.auc(p, t), loss

    best_score, best_epoch, _ = common.train(
        net, train.images, targets, spec, loss_fn=nn.BCEWithLogitsLoss(), validate=validate,
        epochs=args.epochs, batch=args.batch,
    )  # fmt: skip
    validation_scores = common.predict(net, validation.images, spec, "sigmoid")[:, 0]
    threshold = common.youden(validation_scores, validation.abnormal())

    onnx_path = args.out / f"{STEM}.onnx"
    common.export_onnx(common.CamExport(net, "sigmoid"), onnx_path, spec, OUTPUTS)
    probability, _ = common.onnx_outputs(onnx_path, heldout.images, spec, OUTPUTS)
    scores = probability[:, 0]
    difference = float(
        np.abs(scores - common.predict(net, heldout.images, spec, "sigmoid")[:, 0]).max()
    )
    if difference > 1e-4:
        raise SystemExit(f"ONNX and torch disagree on held-out phantoms by {difference:.2e}")

    labels = heldout.abnormal()
    metrics: dict[str, object] = {
        **common.binary_metrics("", scores, labels, threshold),
        "auc_ci_method": "DeLong 95%",
        "heldout_n": len(labels),
        "heldout_prevalence": float(labels.mean()),
        "heldout_seed_start": common.SPLIT_SEEDS["heldout"],
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
    code, scheme, meaning = ABNORMAL
    training = common.training_table(
        started,
        n_train=len(targets),
        train_seed_start=common.SPLIT_SEEDS["train"],
        epochs=args.epochs,
        best_epoch=best_epoch,
        batch=args.batch,
    )
    card_path = args.out / f"{STEM}.toml"
    common.write_card(
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
            "labels": [
                {
                    "index": 0,
                    "code_value": code,
                    "code_scheme": scheme,
                    "code_meaning": meaning,
                    "threshold": threshold,
                    "critical": False,
                    "truth": "abnormal",
                }
            ],
            "select": {"modalities": ["DX", "CR"], "body_parts": ["CHEST"], "views": ["PA", "AP"]},
            "metrics": metrics,
            "training": training,
        },
    )
    print(json.dumps({"metrics": metrics, "training": training}, indent=2, default=str))
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) and {card_path}")


if __name__ == "__main__":
    main()
