"""The committed CXR demo classifiers (triage, findings with CAM, view router, TB ensemble).

Each ONNX file is opened as the node opens it (``load_session`` against its card) and run on a
fresh set of small phantoms (seeds far from the training, validation and held-out ranges) after
``prepare_input`` with its card's input spec. Each model must beat a floor well above chance (a
constant output scores AUC 0.5 and fails) and below the metrics its card reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.evaluation.metrics import roc_auc
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.pipeline.sessions import load_session
from dicomnode.synth.cxr import FINDINGS as PHANTOM_FINDINGS
from dicomnode.synth.cxr import make_cxr

MODELS = Path(__file__).resolve().parents[1] / "models"
# The phantom findings but the tube (a device, not a finding the classifiers are asked about).
FINDINGS = tuple(f for f in PHANTOM_FINDINGS if f != "tube")
# The findings model's labels: nodules are left to cxr-nodule-demo (nodule phantoms stay in the
# set as abnormal studies and as negatives of every findings label).
FINDINGS_LABELS = tuple(f for f in FINDINGS if f != "nodule")
FRESH_SEED = 9_100_000
PER_FINDING = 5
NORMALS = 10
LATERALS = 10
SIZE = 320

# Floors on the fresh phantoms (the cards report the held-out metrics on 500+ phantoms).
TRIAGE_AUC_FLOOR = 0.75
FINDINGS_MEAN_AUC_FLOOR = 0.75
FINDING_AUC_FLOOR = 0.6
CAM_LOCALISATION_FLOOR = 0.5
VIEW_ACCURACY_FLOOR = 0.8
TB_AUC_FLOOR = 0.7


class Phantom:
    """A fresh phantom: its dataset, truth and what the test expects of it."""

    def __init__(self, index: int, findings: tuple[str, ...], view: str) -> None:
        rng = np.random.default_rng([FRESH_SEED, index])
        self.ds, self.truth = make_cxr(
            FRESH_SEED + index,
            findings=findings,
            view=view,
            modality="DX" if index % 2 else "CR",
            bits=int(rng.choice([8, 10, 12, 16])),
            size=SIZE,
            columns=int(SIZE * rng.uniform(0.85, 1.15)),
            photometric="MONOCHROME1" if index % 3 == 0 else "MONOCHROME2",
        )
        self.findings = set(findings) - {"tube"}
        self.view = view


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    """Frontal phantoms with each finding alone, normals (some with a tube), and laterals."""
    jobs: list[tuple[tuple[str, ...], str]] = []
    for finding in FINDINGS:
        jobs += [((finding,), "PA" if k % 2 else "AP") for k in range(PER_FINDING)]
    jobs += [(("tube",) if k % 3 == 0 else (), "PA" if k % 2 else "AP") for k in range(NORMALS)]
    jobs += [((FINDINGS[k % len(FINDINGS)],) if k % 2 else (), "LATERAL") for k in range(LATERALS)]
    return [Phantom(i, findings, view) for i, (findings, view) in enumerate(jobs)]


@pytest.fixture(scope="module")
def frontal(phantoms: list[Phantom]) -> list[Phantom]:
    return [p for p in phantoms if p.view != "LATERAL"]


def _card(stem: str) -> ModelCard:
    return load_card(MODELS / f"{stem}.toml")


def _run(card: ModelCard, phantoms: list[Phantom]) -> tuple[dict[str, np.ndarray], list]:
    """The card's outputs by name over the phantoms, and their letterbox geometries."""
    session = load_session(card, ["CPUExecutionProvider"])
    prepared = [prepare_input(p.ds, card.input) for p in phantoms]
    batch = np.stack([sample for sample, _ in prepared])
    names = [o.name for o in card.outputs]
    outputs = dict(zip(names, session.run(names, {card.input.name: batch}), strict=True))
    return outputs, [geometry for _, geometry in prepared]


STEMS = (
    "cxr_triage_demo",
    "cxr_findings_demo",
    "cxr_view_demo",
    "cxr_tb_cnn_demo",
    "cxr_tb_resnet_demo",
)


@pytest.mark.parametrize("stem", STEMS)
def test_card_and_onnx_agree(stem: str) -> None:
    card = _card(stem)
    session = load_session(card, ["CPUExecutionProvider"])
    assert RESEARCH_DEMO_NOTICE in card.model.description
    assert card.onnx_path.stat().st_size < 10 * 1024 * 1024
    assert card.select.modalities == ["DX", "CR"] and card.select.body_parts == ["CHEST"]
    assert [label.index for label in card.labels] == list(range(len(card.labels)))
    assert all(label.truth for label in card.labels)
    assert all(0.0 < label.threshold < 1.0 for label in card.labels)
    # Dynamic batch: three images in, three rows out.
    batch = np.zeros((3, *card.input.shape), dtype=np.float32)
    outputs = session.run([o.name for o in card.outputs], {card.input.name: batch})
    for spec, value in zip(card.outputs, outputs, strict=True):
        assert value.shape[:2] == (3, len(card.labels)), spec.name
        if spec.kind == "heatmap":
            assert value.ndim == 4


def test_triage_separates_abnormal_from_normal(frontal: list[Phantom]) -> None:
    card = _card("cxr_triage_demo")
    assert card.model.task == "classification" and card.select.views == ["PA", "AP"]
    (label,) = card.labels
    assert (label.code_value, label.truth, label.critical) == ("263654008", "abnormal", False)
    outputs, _ = _run(card, frontal)
    abnormal = np.array([bool(p.findings) for p in frontal])
    auc = roc_auc(abnormal, outputs["probability"][:, 0])
    assert auc >= TRIAGE_AUC_FLOOR, f"triage AUC {auc:.3f} on fresh phantoms"
    assert card.metrics["auc"] > TRIAGE_AUC_FLOOR


def test_findings_per_label_auc(frontal: list[Phantom]) -> None:
    card = _card("cxr_findings_demo")
    assert card.model.task == "multi-label"
    assert [label.truth for label in card.labels] == list(FINDINGS_LABELS)
    critical = {label.truth for label in card.labels if label.critical}
    assert critical == {"pneumothorax", "effusion", "consolidation", "edema"}
    assert all(label.code_scheme == "SCT" for label in card.labels)
    outputs, _ = _run(card, frontal)
    probabilities = outputs["probabilities"]
    aucs = {}
    for label in card.labels:
        present = np.array([label.truth in p.findings for p in frontal])
        aucs[label.truth] = roc_auc(present, probabilities[:, label.index])
        assert card.metrics[f"auc_{label.truth}"] > FINDING_AUC_FLOOR
    assert min(aucs.values()) >= FINDING_AUC_FLOOR, aucs
    assert np.mean(list(aucs.values())) >= FINDINGS_MEAN_AUC_FLOOR, aucs


def test_findings_cam_peaks_on_the_finding(frontal: list[Phantom]) -> None:
    """For positives whose truth has a region mask, the label's CAM (mapped back to the source
    image as the node maps it) peaks inside that region, within one CAM cell."""
    card = _card("cxr_findings_demo")
    outputs, geometries = _run(card, frontal)
    heatmaps = outputs["heatmap"]
    hits = []
    for index, (phantom, geometry) in enumerate(zip(frontal, geometries, strict=True)):
        for label in card.labels:
            mask = phantom.truth.masks.get(label.truth)
            if label.truth not in phantom.findings or mask is None or not mask.any():
                continue
            cam = heatmaps[index, label.index]
            source = geometry.map_to_source(cam)
            peak = np.array(np.unravel_index(np.argmax(source), source.shape))
            tolerance = 0.5 * card.input.shape[1] / cam.shape[0] / geometry.scale
            distance = np.sqrt(((np.argwhere(mask) - peak) ** 2).sum(axis=1)).min()
            hits.append(distance <= tolerance)
    assert len(hits) >= 3 * PER_FINDING
    assert np.mean(hits) >= CAM_LOCALISATION_FLOOR, f"{np.mean(hits):.2f} of {len(hits)}"


def test_view_router_separates_pa_ap_lateral(phantoms: list[Phantom]) -> None:
    card = _card("cxr_view_demo")
    assert card.model.sets == "view" and card.select.views == []
    assert card.produces == ("sr",)
    views = [label.fact_value for label in sorted(card.labels, key=lambda label: label.index)]
    assert views == ["PA", "AP", "LATERAL"]
    codes = {label.fact_value: label.code_value for label in card.labels}
    assert codes == {"PA": "272479007", "AP": "399348003", "LATERAL": "399067008"}
    outputs, _ = _run(card, phantoms)
    probabilities = outputs["probabilities"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    called = np.array(views)[probabilities.argmax(axis=1)]
    truth = np.array([p.view for p in phantoms])
    accuracy = float((called == truth).mean())
    assert accuracy >= VIEW_ACCURACY_FLOOR, f"view accuracy {accuracy:.2f}"
    for view in views:
        assert (called[truth == view] == view).mean() >= 0.6, view
    assert card.metrics["accuracy"] > VIEW_ACCURACY_FLOOR


def test_tuberculosis_ensemble_and_members(frontal: list[Phantom]) -> None:
    ensemble = load_card(MODELS / "cxr_tb_ensemble_demo.toml")
    assert ensemble.model.task == "ensemble" and not ensemble.model.onnx
    assert ensemble.ensemble is not None and ensemble.ensemble.combine == "mean"
    (label,) = ensemble.labels
    assert (label.code_value, label.truth) == ("154283005", "tuberculosis")
    present = np.array(["tuberculosis" in p.findings for p in frontal])
    member_scores = []
    cards = {card.model.name: card for card in map(_card, STEMS[3:])}
    assert sorted(ensemble.ensemble.members) == sorted(cards)
    for name in ensemble.ensemble.members:
        card = cards[name]
        assert card.model.standalone is False
        outputs, _ = _run(card, frontal)
        scores = outputs["probability"][:, 0]
        assert roc_auc(present, scores) >= TB_AUC_FLOOR, name
        member_scores.append(scores)
    # The two members are built differently (input size or normalisation differ).
    first, second = (cards[name].input for name in ensemble.ensemble.members)
    assert (first.shape, first.normalisation) != (second.shape, second.normalisation)
    auc = roc_auc(present, np.mean(member_scores, axis=0))
    assert auc >= TB_AUC_FLOOR, f"ensemble AUC {auc:.3f}"
    assert ensemble.metrics["auc"] > TB_AUC_FLOOR
