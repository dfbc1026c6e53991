"""The committed CT demo models (nodule detector, lung segmentation): cards, ONNX interfaces,
and real runs through the node's own pipeline (series order, 2.5D stacks, boxes merged across
slices, segment probabilities on the source grid) on freshly generated phantom series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from dicomnode.config import InferenceSettings
from dicomnode.evaluation import metrics as evaluation
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline.analyse import StageTimes
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.tasks import run_model
from dicomnode.synth.ct import make_ct_series

MODELS = Path(__file__).resolve().parents[1] / "models"
LUNG_CARD = MODELS / "ct_lung_seg_demo.toml"


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"], InferenceSettings(intra_op_threads=2))


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


def test_lung_onnx_agrees_with_card(lung_card: ModelCard) -> None:
    out = _run_random(lung_card, lung_card.output("mask").name)
    assert out.shape == (2, len(lung_card.labels), 160, 160)
    assert out.min() >= 0.0 and out.max() <= 1.0


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
    assert dice >= 0.85, f"lung Dice {dice:.3f} on seed {seed}"
    # Outside the body the model must not claim lung.
    assert not segment.mask[:, :2, :].any() and not segment.mask[:, -2:, :].any()
