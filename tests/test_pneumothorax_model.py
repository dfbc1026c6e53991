"""The committed demo pneumothorax model: its card loads and the ONNX file detects phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.synth.cxr import make_cxr

CARD = Path(__file__).resolve().parents[1] / "models" / "cxr_pneumothorax_demo.toml"
# Far from the training (0..), validation (500 000..) and held-out (1 000 000..) seed ranges.
FRESH_SEEDS = range(7_000_000, 7_000_040)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_card(CARD)


@pytest.fixture(scope="module")
def session(card: ModelCard) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])


def test_card_describes_the_model(card: ModelCard) -> None:
    assert card.model.name == "cxr-pneumothorax-demo" and card.model.task == "classification"
    assert "not for clinical use" in card.model.description
    assert card.input.shape == (1, 256, 256) and card.input.normalisation == "zscore"
    assert card.output("probabilities").name == "probability"
    assert card.output("heatmap").name == "cam"
    (label,) = card.labels
    assert (label.index, label.code_value, label.code_scheme) == (0, "36118008", "SCT")
    assert label.critical and 0.0 < label.threshold < 1.0
    assert label.threshold == card.metrics["threshold"]
    assert card.select.modalities == ["DX", "CR"] and card.select.views == ["PA", "AP"]
    assert card.metrics["heldout_n"] >= 500
    assert card.onnx_path.stat().st_size < 10 * 1024 * 1024


def test_onnx_interface(card: ModelCard, session: onnxruntime.InferenceSession) -> None:
    (image,) = session.get_inputs()
    assert image.name == card.input.name and image.shape[1:] == [1, 256, 256]
    assert [o.name for o in session.get_outputs()] == ["probability", "cam"]
    batch = np.zeros((3, 1, 256, 256), dtype=np.float32)
    probability, cam = session.run(None, {"image": batch})
    assert probability.shape == (3, 1) and cam.shape[:2] == (3, 1)


def test_detects_pneumothorax_on_fresh_phantoms(
    card: ModelCard, session: onnxruntime.InferenceSession
) -> None:
    samples, geometries, truths = [], [], []
    for seed in FRESH_SEEDS:
        ds, truth = make_cxr(seed, pneumothorax=seed % 2 == 1)
        sample, geometry = prepare_input(ds, card.input)
        samples.append(sample)
        geometries.append(geometry)
        truths.append(truth)
    probability, cam = session.run(["probability", "cam"], {"image": np.stack(samples)})
    labels = np.array([truth.pneumothorax for truth in truths], dtype=int)
    assert labels.sum() == 20
    auc = _auc(probability[:, 0], labels)
    assert auc >= 0.85, f"AUC {auc:.3f} on fresh phantoms"

    on_side = []
    for heat, geometry, truth in zip(cam[:, 0], geometries, truths, strict=True):
        if not truth.pneumothorax:
            continue
        heatmap = geometry.map_to_source(heat)
        _, peak_col = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        # PA view: the patient's right is the image's left half.
        peak_side = "R" if peak_col < heatmap.shape[1] / 2 else "L"
        on_side.append(peak_side == truth.side)
    assert np.mean(on_side) >= 0.75, f"CAM peak on the pneumothorax side in {np.mean(on_side):.0%}"
