"""Train the demo CXR view classifier (PA / AP / lateral router) and export it to ONNX.

Run from the repository root (about 1.5 minutes on 2 CPU cores once the phantoms are cached;
rendering the 3000 phantoms of the three splits takes about 5 minutes more, once):

    python models/train/train_cxr_view.py --out models

A router card ([model] sets = "view"): it runs on every DX/CR chest radiograph, whatever its
ViewPosition says, and its top label's fact_value (PA, AP, LATERAL) routes the other models.
Softmax over the three views; the card records held-out accuracy, per-view one-vs-rest AUC with
DeLong 95 % CI and the confusion counts.
"""

from __future__ import annotations

from pathlib import Path

import cxr_common as common
import numpy as np
import shared
from torch import nn

MODEL_NAME = "cxr-view-demo"
MODEL_VERSION = "1.0.0"
STEM = "cxr_view_demo"
SHAPE = (1, 224, 224)
# View -> DICOM CID 4010 (DX View) SNOMED CT code and meaning.
VIEW_CODES = {
    "PA": ("272479007", "postero-anterior"),
    "AP": ("399348003", "antero-posterior"),
    "LATERAL": ("399067008", "lateral"),
}
OUTPUTS = ["probabilities"]


def view_index(split: common.Split) -> np.ndarray:
    return np.array([common.VIEWS.index(v) for v in split.views], dtype=np.int64)


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=2000, n_validation=400, n_heldout=600, epochs=8, batch=32
    )
    args = parser.parse_args()

    started = shared.start_run(args.out)
    train, validation, heldout = common.load_splits(
        args.n_train, args.n_validation, args.n_heldout, SHAPE, args.workers
    )
    spec = common.zscore_spec(train.images, SHAPE)
    targets = view_index(train)
    validation_targets = view_index(validation)
    print(
        f"train views {dict(zip(common.VIEWS, np.bincount(targets, minlength=3), strict=True))}",
        flush=True,
    )

    net = common.CamNet(common.plain_features((8, 16, 32, 48, 64)), 64, len(common.VIEWS))

    def validate(model: nn.Module) -> tuple[float, float]:
        p = common.predict(model, validation.images, spec, "softmax")
        picked = np.clip(p[np.arange(len(p)), validation_targets], 1e-7, 1.0)
        accuracy = float((p.argmax(axis=1) == validation_targets).mean())
        return accuracy, float(-np.log(picked).mean())

    best_score, best_epoch, _ = common.train(
        net, train.images, targets, spec, loss_fn=nn.CrossEntropyLoss(), validate=validate,
        epochs=args.epochs, batch=args.batch,
    )  # fmt: skip

    onnx_path = args.out / f"{STEM}.onnx"
    (probabilities,), difference = common.export_checked(
        net, onnx_path, spec, OUTPUTS, heldout.images, "softmax", with_cam=False
    )
    shared.require_agreement(difference, "ONNX and torch disagree on held-out phantoms")

    truth = view_index(heldout)
    predicted = probabilities.argmax(axis=1)
    metrics: dict[str, object] = {
        "accuracy": float((predicted == truth).mean()),
        "heldout_n": len(truth),
        "heldout_seed_start": common.SPLIT_SEEDS["heldout"],
        "auc_ci_method": "DeLong 95%, one view against the other two",
        "validation_accuracy": best_score,
        "validation_n": len(validation_targets),
        "validation_seed_start": common.SPLIT_SEEDS["validation"],
    }
    for index, view in enumerate(common.VIEWS):
        is_view = (truth == index).astype(np.float32)
        low, high = common.auc_ci(probabilities[:, index], is_view)
        metrics[f"auc_{view}"] = common.auc(probabilities[:, index], is_view)
        metrics[f"auc_{view}_ci_low"] = low
        metrics[f"auc_{view}_ci_high"] = high
        metrics[f"n_{view}"] = int(is_view.sum())
        metrics[f"recall_{view}"] = float((predicted[truth == index] == index).mean())
    for i, actual in enumerate(common.VIEWS):
        for j, called in enumerate(common.VIEWS):
            if i != j:
                metrics[f"confusion_{actual}_called_{called}"] = int(
                    ((truth == i) & (predicted == j)).sum()
                )
    metrics["onnx_torch_max_abs_difference"] = difference

    description = (
        "View classifier (PA / AP / lateral) for chest radiographs, used as a router: its top "
        "view replaces the image's ViewPosition for the other models' selection rules. Trained "
        "only on synthetic chest phantoms (dicomnode.synth.cxr); metrics are on held-out "
        f"phantoms, not patients. {common.RESEARCH_DEMO}"
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
                "sets": "view",
            },
            "input": common.input_table(spec),
            "outputs": [{"name": "probabilities", "kind": "probabilities"}],
            "labels": [
                {
                    "index": i,
                    "code_value": VIEW_CODES[view][0],
                    "code_scheme": "SCT",
                    "code_meaning": VIEW_CODES[view][1],
                    "threshold": 0.5,
                    "critical": False,
                    "fact_value": view,
                    "truth": f"view:{view}",
                }
                for i, view in enumerate(common.VIEWS)
            ],
            "select": common.select_table(views=()),
            "results": {"produce": ["sr"]},
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
