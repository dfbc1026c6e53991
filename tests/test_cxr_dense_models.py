"""The committed dense CXR demo models: lung segmentation (and bone suppression).

Each ONNX file is opened as the node opens it (``load_session`` against its card) and run on
fresh frontal phantoms (seeds far from the training, validation and held-out ranges) after a
DICOM round trip and ``prepare_input`` with its card's input spec; outputs are mapped back to
source pixels with the node's postprocessing. Floors sit well above what a trivial output scores
and below the held-out metrics on the cards.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.evaluation.metrics import dice
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline.postprocess import mask_maps
from dicomnode.pipeline.preprocess import Letterbox, prepare_input
from dicomnode.pipeline.runtime import load_session
from dicomnode.synth.cxr import make_cxr

MODELS = Path(__file__).resolve().parents[1] / "models"
FRESH_SEED = 9_300_000
N_PHANTOMS = 8
# (findings, view) of the fresh phantoms: normals and the findings that change the lung fields.
JOBS: tuple[tuple[tuple[str, ...], str], ...] = (
    ((), "PA"),
    ((), "AP"),
    (("effusion",), "PA"),
    (("consolidation",), "AP"),
    (("pneumothorax",), "PA"),
    (("cardiomegaly", "tube"), "AP"),
    (("nodule", "edema"), "PA"),
    ((), "AP"),
)

# The card reports held-out Dice 0.98 on 300 phantoms; a constant mean-lung-shape mask ~0.83.
LUNG_MEAN_DICE_FLOOR = 0.93
LUNG_IMAGE_DICE_FLOOR = 0.85


class Phantom:
    """A fresh frontal phantom after a DICOM round trip, with its truth."""

    def __init__(self, index: int) -> None:
        rng = np.random.default_rng([FRESH_SEED, index])
        findings, view = JOBS[index]
        rows = int(rng.choice([288, 352, 416]))
        ds, self.truth = make_cxr(
            FRESH_SEED + index,
            findings=findings,
            view=view,
            modality="DX" if index % 2 else "CR",
            bits=int(rng.choice([8, 10, 12, 16])),
            size=rows,
            columns=round(rows * rng.uniform(0.85, 1.15)),
            photometric="MONOCHROME1" if index % 3 == 0 else "MONOCHROME2",
        )
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        self.ds = pydicom.dcmread(buffer)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [Phantom(index) for index in range(N_PHANTOMS)]


def _card(stem: str) -> ModelCard:
    return load_card(MODELS / f"{stem}.toml")


def _run(
    card: ModelCard, phantoms: list[Phantom]
) -> tuple[dict[str, np.ndarray], list[Letterbox]]:
    """One batched run of the card's ONNX file over the phantoms, as the node prepares them."""
    session = load_session(card, ["CPUExecutionProvider"])
    prepared = [prepare_input(p.ds, card.input) for p in phantoms]
    batch = np.stack([sample for sample, _ in prepared])
    names = [o.name for o in card.outputs]
    outputs = dict(zip(names, session.run(names, {card.input.name: batch}), strict=True))
    return outputs, [geometry for _, geometry in prepared]


def _check_card(card: ModelCard, task: str) -> None:
    assert card.model.task == task
    assert RESEARCH_DEMO_NOTICE in card.model.description
    assert card.select.modalities == ["DX", "CR"]
    assert card.select.body_parts == ["CHEST"]
    assert card.select.views == ["PA", "AP"]
    assert card.onnx_path.stat().st_size < 10 * 2**20


# --- lung segmentation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lung_card() -> ModelCard:
    return _card("cxr_lung_seg_demo")


def test_lung_seg_card_and_onnx_shapes_agree(lung_card: ModelCard, phantoms: list[Phantom]):
    _check_card(lung_card, "segmentation")
    assert [o.kind for o in lung_card.outputs] == ["mask"]
    assert [label.truth for label in lung_card.labels] == ["lung"]
    assert lung_card.labels[0].code_value == "39607008"
    assert lung_card.produces == ("seg",)
    outputs, _ = _run(lung_card, phantoms[:2])
    mask = outputs[lung_card.outputs[0].name]
    _, rows, cols = lung_card.input.shape
    # (N, L, h, w) over the model input: one map per label, a whole fraction of the input.
    assert mask.shape[:2] == (2, len(lung_card.labels))
    assert rows % mask.shape[2] == 0 and cols % mask.shape[3] == 0
    assert rows // mask.shape[2] == cols // mask.shape[3]
    assert mask.min() >= 0.0 and mask.max() <= 1.0


def test_lung_seg_dice_on_fresh_phantoms(lung_card: ModelCard, phantoms: list[Phantom]):
    outputs, geometries = _run(lung_card, phantoms)
    threshold = lung_card.labels[0].threshold
    scores = []
    for index, (phantom, geometry) in enumerate(zip(phantoms, geometries, strict=True)):
        probability = mask_maps(lung_card, outputs, index, geometry)[0]
        truth = phantom.truth.masks["lung"]
        assert probability.shape == truth.shape
        scores.append(dice(probability >= threshold, truth))
    scores = np.array(scores)
    assert scores.min() > LUNG_IMAGE_DICE_FLOOR, scores
    assert scores.mean() > LUNG_MEAN_DICE_FLOOR, scores
    # Not a fixed shape: the masks follow each image (left-right mirrored images swap them).
    mirrored = phantoms[0].ds.copy()
    pixels = mirrored.pixel_array[:, ::-1].copy()
    mirrored.PixelData = pixels.tobytes()
    sample, geometry = prepare_input(mirrored, lung_card.input)
    session = load_session(lung_card, ["CPUExecutionProvider"])
    mask = session.run(None, {lung_card.input.name: sample[None]})[0]
    flipped = mask_maps(lung_card, {lung_card.outputs[0].name: mask}, 0, geometry)[0]
    truth = phantoms[0].truth.masks["lung"]
    assert dice(flipped >= threshold, truth[:, ::-1]) > dice(flipped >= threshold, truth) + 0.1
