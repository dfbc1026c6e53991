"""The committed CXR localisation demo models (nodule boxes, tube tip landmark): their cards,
their ONNX interfaces, and what they find on fresh phantoms when run as the node runs them
(DICOM round trip, prepare_input, onnxruntime, the node's postprocess back to source pixels)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import pydicom
import pytest

from dicomnode.evaluation.metrics import CaseDetections, froc, match_points, roc_auc
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline.letterbox import Letterbox
from dicomnode.pipeline.postprocess import detection_findings, landmark_findings
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.synth.cxr import CxrTruth, make_cxr

MODELS = Path(__file__).resolve().parents[1] / "models"
NODULE_CARD = MODELS / "cxr_nodule_demo.toml"
TIP_CARD = MODELS / "cxr_tube_tip_demo.toml"
# Far from the training (10 000 000..), validation (11 000 000..) and held-out (12 000 000..)
# seed ranges of models/train/train_cxr_nodule.py.
FRESH_SEEDS = range(13_000_000, 13_000_048)
# A detection hits a nodule when its centre lies within the nodule's radius, at least 5 mm.
MIN_HIT_RADIUS_MM = 5.0


@dataclass
class Phantom:
    ds: pydicom.Dataset
    truth: CxrTruth
    spacing_mm: tuple[float, float]  # rows, columns


def _round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    """Fresh frontal phantoms: nodules in every second, a tube in two of three, varied
    acquisitions and a pleural effusion or consolidation now and then."""
    out = []
    for n, seed in enumerate(FRESH_SEEDS):
        findings = ["nodule"] if n % 2 == 0 else []
        findings += ["tube"] if n % 3 != 2 else []
        findings += [("effusion", "consolidation", "edema")[n % 3]] if n % 5 == 4 else []
        ds, truth = make_cxr(
            seed,
            findings=findings,
            view="AP" if n % 4 in (1, 2) else "PA",
            modality=("DX", "CR")[n % 3 == 0],
            bits=(12, 10, 14, 16, 8)[n % 5],
            size=(448, 512, 384)[n % 3],
            columns=(448, 480, 400)[n % 3],
            photometric="MONOCHROME1" if n % 4 == 3 else "MONOCHROME2",
        )
        ds = _round_trip(ds)
        spacing = ds.get("PixelSpacing") or ds.ImagerPixelSpacing
        out.append(Phantom(ds, truth, (float(spacing[0]), float(spacing[1]))))
    return out


def _run(card: ModelCard, phantoms: list[Phantom]) -> tuple[dict[str, np.ndarray], list[Letterbox]]:
    """The model's outputs on the phantoms, prepared as the node prepares them."""
    prepared = [prepare_input(p.ds, card.input) for p in phantoms]
    session = onnxruntime.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])
    batch = np.stack([sample for sample, _ in prepared])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {card.input.name: batch}), strict=True)), [
        geometry for _, geometry in prepared
    ]


@pytest.fixture(scope="module")
def nodule_card() -> ModelCard:
    return load_card(NODULE_CARD)


@pytest.fixture(scope="module")
def tip_card() -> ModelCard:
    return load_card(TIP_CARD)


def _common_card_checks(card: ModelCard) -> None:
    assert "not for clinical use" in card.model.description
    assert card.input.shape == (1, 384, 384)
    assert card.input.normalisation == "zscore"
    assert card.select.modalities == ["DX", "CR"] and card.select.body_parts == ["CHEST"]
    assert card.select.views == ["PA", "AP"]
    assert card.metrics["heldout_n"] >= 300
    assert card.onnx_path.stat().st_size < 10 * 1024 * 1024
    (label,) = card.labels
    assert label.index == 0 and label.code_scheme == "SCT" and label.code_value.isdigit()
    assert 0.0 < label.threshold < 1.0 and label.threshold == card.metrics["threshold"]


def test_nodule_card(nodule_card: ModelCard) -> None:
    _common_card_checks(nodule_card)
    assert nodule_card.model.name == "cxr-nodule-demo" and nodule_card.model.task == "detection"
    assert [(o.name, o.kind) for o in nodule_card.outputs] == [("boxes", "boxes")]
    (label,) = nodule_card.labels
    assert (label.code_value, label.truth) == ("786838002", "nodule")
    for rate in ("0_125", "0_25", "0_5", "1", "2", "4", "8"):
        assert 0.0 <= nodule_card.metrics[f"froc_sensitivity_at_{rate}_fp"] <= 1.0
    assert 0.0 < nodule_card.metrics["cpm"] <= 1.0 and nodule_card.metrics["image_auc"] > 0.5


def test_tip_card(tip_card: ModelCard) -> None:
    _common_card_checks(tip_card)
    assert tip_card.model.name == "cxr-tube-tip-demo" and tip_card.model.task == "landmark"
    assert [(o.name, o.kind) for o in tip_card.outputs] == [("landmarks", "landmarks")]
    (label,) = tip_card.labels
    assert label.truth == "tube_tip"
    assert tip_card.metrics["presence_auc"] > 0.5
    assert 0 < tip_card.metrics["tip_distance_median_mm"] <= tip_card.metrics["tip_distance_p90_mm"]


@pytest.mark.parametrize(("card_path", "shape"), [(NODULE_CARD, (10, 6)), (TIP_CARD, (1, 3))])
def test_onnx_interface(card_path: Path, shape: tuple[int, int]) -> None:
    card = load_card(card_path)
    session = onnxruntime.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == card.input.name and image.shape[1:] == list(card.input.shape)
    (output,) = session.get_outputs()
    assert output.name == card.outputs[0].name
    (result,) = session.run(None, {"image": np.zeros((3, *card.input.shape), np.float32)})
    assert result.shape == (3, *shape)
    # Coordinates lie on the model input, scores are probabilities.
    score = result[..., -2] if shape[1] == 6 else result[..., 2]
    assert np.all((score >= 0) & (score <= 1))
    assert np.all((result[..., :2] >= -0.5) & (result[..., :2] <= card.input.shape[-1]))


def _nodules_in_source(truth: CxrTruth) -> tuple[np.ndarray, np.ndarray]:
    """Centres (col, row) and radii (pixels) of the phantom's nodules on the source grid."""
    boxes = np.array([box for name, box in truth.boxes if name == "nodule"], float).reshape(-1, 4)
    centres = np.stack([(boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2], 1)
    return centres - 0.5, (boxes[:, 2:4] - boxes[:, 0:2]).max(axis=1, initial=0) / 2


def _nodule_cases(
    card: ModelCard, phantoms: list[Phantom], outputs: dict[str, np.ndarray], geometries: list
) -> list[CaseDetections]:
    cases = []
    for index, phantom in enumerate(phantoms):
        findings = detection_findings(card, outputs, index, geometries[index])
        centres, radii = _nodules_in_source(phantom.truth)
        radii = np.maximum(radii, MIN_HIT_RADIUS_MM / min(phantom.spacing_mm))
        peaks = np.array([f.peak for f in findings], float).reshape(-1, 2)
        if len(centres) and len(peaks):
            hits = match_points(peaks, centres, radii)
        else:
            hits = np.full(len(peaks), -1)
        cases.append(CaseDetections(np.array([f.probability for f in findings]), hits, len(radii)))
    return cases


def test_nodule_detector_on_fresh_phantoms(nodule_card: ModelCard, phantoms: list[Phantom]) -> None:
    outputs, geometries = _run(nodule_card, phantoms)
    cases = _nodule_cases(nodule_card, phantoms, outputs, geometries)
    curve = froc(cases)
    assert curve.sensitivity_at(1.0) >= 0.5, curve.sensitivity_at(1.0)
    assert curve.sensitivity_at(4.0) >= 0.6, curve.sensitivity_at(4.0)
    has_nodule = np.array([c.n_lesions > 0 for c in cases])
    image_scores = np.array([c.scores.max(initial=0.0) for c in cases])
    assert roc_auc(has_nodule, image_scores) >= 0.8

    # The same detections on the wrong images find far fewer nodules: the bounds above need
    # boxes in the right places, not just many boxes.
    shuffled = {"boxes": np.roll(outputs["boxes"], 1, axis=0)}
    wrong = froc(_nodule_cases(nodule_card, phantoms, shuffled, geometries))
    assert wrong.sensitivity_at(1.0) < curve.sensitivity_at(1.0) - 0.2


def _tips(
    card: ModelCard, phantoms: list[Phantom], outputs: dict[str, np.ndarray], geometries: list
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whether each phantom has a tube, the tip scores, and the tip distances in mm of those
    with a tube (the node's landmark finding against the truth, in source pixels)."""
    present, scores, distances = [], [], []
    for index, phantom in enumerate(phantoms):
        (finding,) = landmark_findings(card, outputs, index, geometries[index])
        tip = phantom.truth.landmarks.get("tube_tip")
        present.append(tip is not None)
        scores.append(finding.probability)
        if tip is not None:
            col, row = finding.point
            row_mm, col_mm = phantom.spacing_mm
            distances.append(float(np.hypot((col - tip[1]) * col_mm, (row - tip[0]) * row_mm)))
    return np.array(present), np.array(scores), np.array(distances)


def test_tube_tip_on_fresh_phantoms(tip_card: ModelCard, phantoms: list[Phantom]) -> None:
    outputs, geometries = _run(tip_card, phantoms)
    present, scores, distances = _tips(tip_card, phantoms, outputs, geometries)
    assert 20 <= present.sum() < len(phantoms)
    assert roc_auc(present, scores) >= 0.95
    assert float(np.median(distances)) <= 5.0, np.median(distances)
    assert float(np.mean(distances <= 10.0)) >= 0.85

    # Tips found on other phantoms are far from these phantoms' tips.
    rolled = {"landmarks": np.roll(outputs["landmarks"], 1, axis=0)}
    _, _, wrong = _tips(tip_card, phantoms, rolled, geometries)
    assert float(np.median(wrong)) > 2 * float(np.median(distances)) + 5.0
