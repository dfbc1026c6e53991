"""The committed CT demo models (nodule detector, lung segmentation): cards, ONNX interfaces,
and real runs through the node's own pipeline (series order, 2.5D stacks, boxes merged across
slices, segment probabilities on the source grid) on freshly generated phantom series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from dciodvfy import dciodvfy_errors

from dicomnode.config import InferenceSettings
from dicomnode.evaluation import metrics as evaluation
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline.analyse import StageTimes
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.tasks import run_model
from dicomnode.synth.ct import make_ct_series

MODELS = Path(__file__).resolve().parents[1] / "models"
NODULE_CARD = MODELS / "ct_nodule_demo.toml"
LUNG_CARD = MODELS / "ct_lung_seg_demo.toml"
# Far from the training (0..), validation (500 000..) and held-out (1 000 000..) seed ranges.
FRESH_SEEDS = (7_100_001, 7_100_002, 7_100_003, 7_100_004)
HIT_RADIUS_MIN_MM = 5.0


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"], InferenceSettings(intra_op_threads=2))


@pytest.fixture(scope="module")
def nodule_card() -> ModelCard:
    return load_card(NODULE_CARD)


@pytest.fixture(scope="module")
def lung_card() -> ModelCard:
    return load_card(LUNG_CARD)


def _shuffled(datasets: list) -> list:
    """The slices in a scrambled order, as a C-STORE association may deliver them."""
    order = np.random.default_rng(0).permutation(len(datasets))
    return [datasets[i] for i in order]


def _session(card: ModelCard) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(
        str(card.onnx_path), options, providers=["CPUExecutionProvider"]
    )


# --- cards and interfaces ----------------------------------------------------------------------


def test_nodule_card(nodule_card: ModelCard) -> None:
    card = nodule_card
    assert card.model.name == "ct-nodule-demo" and card.model.task == "detection"
    assert "not for clinical use" in card.model.description.lower()
    assert card.input.shape == (3, 160, 160) and card.input.slices == 3
    assert card.input.window == (-600.0, 1500.0) and card.input.normalisation == "unit"
    assert card.select.modalities == ["CT"] and card.select.body_parts == ["CHEST"]
    (label,) = card.labels
    assert (label.index, label.code_value, label.code_scheme) == (0, "786838002", "SCT")
    assert label.truth == "nodule" and 0.0 < label.threshold < 1.0
    assert card.output("boxes") is not None and card.produces == ("sr", "overlay", "gsps", "kos")
    for key in (
        "heldout_sensitivity_at_1_fp_per_scan",
        "heldout_sensitivity_at_4_fp_per_scan",
        "heldout_cpm",
    ):
        assert 0.0 <= float(card.metrics[key]) <= 1.0
    assert card.onnx_path.stat().st_size < 10 * 1024 * 1024


def test_lung_card(lung_card: ModelCard) -> None:
    card = lung_card
    assert card.model.name == "ct-lung-seg-demo" and card.model.task == "segmentation"
    assert "not for clinical use" in card.model.description.lower()
    assert card.input.shape == (1, 160, 160) and card.input.slices == 1
    assert card.input.window == (-600.0, 1500.0)
    assert card.select.modalities == ["CT"] and card.select.body_parts == ["CHEST"]
    (label,) = card.labels
    assert (label.index, label.code_value, label.code_scheme) == (0, "39607008", "SCT")
    assert label.truth == "lung"
    assert card.output("mask") is not None and card.produces == ("seg",)
    low = float(card.metrics["heldout_dice_ci_low"])
    high = float(card.metrics["heldout_dice_ci_high"])
    assert low <= float(card.metrics["heldout_dice_mean"]) <= high
    assert card.onnx_path.stat().st_size < 10 * 1024 * 1024


def _run_random(card: ModelCard, output_name: str) -> np.ndarray:
    session = _session(card)
    (image,) = session.get_inputs()
    assert image.name == card.input.name and tuple(image.shape[1:]) == card.input.shape
    assert [o.name for o in session.get_outputs()] == [output_name]
    batch = np.random.default_rng(1).random((2, *card.input.shape), dtype=np.float32)
    (out,) = session.run(None, {image.name: batch})
    return out


def test_nodule_onnx_agrees_with_card(nodule_card: ModelCard) -> None:
    out = _run_random(nodule_card, nodule_card.output("boxes").name)
    assert out.ndim == 3 and out.shape[0] == 2 and out.shape[2] == 6
    assert np.all(out[..., 5] == 0) and np.all((out[..., 4] >= 0) & (out[..., 4] <= 1))
    assert np.all(out[..., 2] >= out[..., 0]) and np.all(out[..., 3] >= out[..., 1])


def test_lung_onnx_agrees_with_card(lung_card: ModelCard) -> None:
    out = _run_random(lung_card, lung_card.output("mask").name)
    assert out.shape == (2, len(lung_card.labels), 160, 160)
    assert out.min() >= 0.0 and out.max() <= 1.0


# --- nodule detection through the node's pipeline ----------------------------------------------


def _scan_findings(card: ModelCard, runtime: Runtime, seed: int, **options) -> tuple:
    """Findings of the node's detection run on one fresh series (slices delivered shuffled):
    scores, centres in patient mm, and the series' truth."""
    datasets, truth = make_ct_series(seed, rows=256, slices=32, **options)
    run = run_model(card, _shuffled(datasets), runtime, StageTimes())
    scores, centres = [], []
    for image in run.images:
        ds = image.source
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        spacing_row, spacing_col = (float(v) for v in ds.PixelSpacing)
        for finding in image.findings:
            col, row = finding.peak
            scores.append(finding.probability)
            centres.append(position + np.array([col * spacing_col, row * spacing_row, 0.0]))
    return np.asarray(scores), np.asarray(centres).reshape(-1, 3), truth


def test_nodule_detector_finds_nodules_on_fresh_series(
    nodule_card: ModelCard, runtime: Runtime
) -> None:
    cases = []
    for seed in FRESH_SEEDS:
        scores, centres, truth = _scan_findings(
            nodule_card, runtime, seed, nodules=(2, 4), nodule_diameter_mm=(6.0, 30.0)
        )
        truth_mm = np.array([n.center_mm for n in truth.nodules]).reshape(-1, 3)
        radii = np.array([max(n.diameter_mm / 2, HIT_RADIUS_MIN_MM) for n in truth.nodules])
        hits = evaluation.match_points(centres, truth_mm, radii)
        cases.append(evaluation.CaseDetections(scores, hits, len(truth.nodules)))
    curve = evaluation.froc(cases)
    n_nodules = sum(case.n_lesions for case in cases)
    assert n_nodules >= 8
    sensitivity = curve.sensitivity_at(4.0)
    print(
        f"fresh series: {n_nodules} nodules >= 6 mm, FROC",
        [(p, round(curve.sensitivity_at(p), 3)) for p in (0.5, 1, 2, 4, 8)],
    )
    assert sensitivity >= 0.6, f"sensitivity {sensitivity:.2f} at 4 FP/scan, {n_nodules} nodules"


def test_nodule_detector_is_quiet_on_nodule_free_series(
    nodule_card: ModelCard, runtime: Runtime
) -> None:
    threshold = nodule_card.labels[0].threshold
    positives = []
    for seed in FRESH_SEEDS[:2]:
        scores, _, truth = _scan_findings(nodule_card, runtime, seed, nodules=(0, 0))
        assert not truth.nodules
        positives.append(int((scores >= threshold).sum()))
    print("positive findings per nodule-free scan", positives)
    # The label threshold is the score at 1 FP/scan on validation series; a detector that
    # fires on vessels everywhere gives dozens per scan.
    assert sum(positives) <= 4 * len(positives), f"positives per nodule-free scan: {positives}"


# --- lung segmentation through the node's pipeline ---------------------------------------------


@pytest.mark.parametrize("seed, rows", [(7_200_001, 256), (7_200_002, 160)])
def test_lung_segmentation_dice_on_fresh_series(
    lung_card: ModelCard, runtime: Runtime, seed: int, rows: int
) -> None:
    datasets, truth = make_ct_series(seed, rows=rows, slices=24, slice_thickness=5.0)
    run = run_model(lung_card, _shuffled(datasets), runtime, StageTimes())
    (segmentation,) = run.segmentations
    assert [ds.SOPInstanceUID for ds in segmentation.sources] == [
        ds.SOPInstanceUID for ds in datasets
    ]
    (segment,) = segmentation.segments
    assert segment.probabilities.shape == truth.lung.shape == (24, rows, rows)
    assert segment.threshold == lung_card.labels[0].threshold
    dice = evaluation.dice(segment.mask, truth.lung)
    print(f"lung Dice {dice:.4f}")
    assert dice >= 0.85, f"lung Dice {dice:.3f} on seed {seed}"
    # Outside the body the model must not claim lung.
    assert not segment.mask[:, :2, :].any() and not segment.mask[:, -2:, :].any()


def test_ct_overlays_and_presentation_states_show_the_slice_in_the_cards_window(
    nodule_card: ModelCard, runtime: Runtime
) -> None:
    """A slice stored with a soft-tissue window gets its nodule overlay drawn in the card's
    lung window, the picture the model saw, not in its own (where the lung is black)."""
    from dicomnode.pipeline.outputs import result_objects

    datasets, _ = make_ct_series(FRESH_SEEDS[0], rows=160, slices=24, nodules=(3, 3))
    for ds in datasets:
        ds.WindowCenter, ds.WindowWidth = 40, 400
    run = run_model(nodule_card, datasets, runtime, StageTimes())
    objects = result_objects(run, nodule_card)
    overlays = [ds for kind, ds in objects if kind == "overlay"]
    assert overlays, "no nodule drawn on this series"
    centre, width = nodule_card.input.window
    for overlay in overlays:
        assert f"model's window (centre {centre:g}, width {width:g})" in str(
            overlay.DerivationDescription
        )
    # The presentation states show the boxes in the same window.
    states = [ds for kind, ds in objects if kind == "gsps"]
    assert len(states) == len(overlays)
    for state in states:
        (voi,) = state.SoftcopyVOILUTSequence
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (centre, width)
        assert dciodvfy_errors(state) == []
