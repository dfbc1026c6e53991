"""Model outputs -> findings: probabilities, decisions, heat maps in source pixels (pure)."""

from __future__ import annotations

import functools

import numpy as np

from dicomnode.findings import Finding
from dicomnode.models.registry import Label, ModelCard
from dicomnode.pipeline.letterbox import Letterbox


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def normalise_map(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scale a class-activation map to 0..1 (a flat map becomes all zeros), as a new
    float32 array."""
    scaled = np.array(heatmap, dtype=np.float32)
    low, high = float(scaled.min()), float(scaled.max())
    if high - low < 1e-12:
        return np.zeros_like(scaled)
    scaled -= low
    scaled /= np.float32(high - low)
    return scaled


def source_heatmap(model_map: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """A class-activation map over the model input as a 0..1 map over the source image."""
    return normalise_map(geometry.map_to_source(normalise_map(model_map)))


def classification_findings(
    card: ModelCard, outputs: dict[str, np.ndarray], index: int, geometry: Letterbox
) -> list[Finding]:
    """Findings of sample ``index`` of a batch for a (multi-label) classification card."""
    probabilities_spec = card.output("probabilities")
    logits_spec = card.output("logits")
    if probabilities_spec is not None:
        scores = np.asarray(outputs[probabilities_spec.name][index], dtype=np.float64).ravel()
    elif logits_spec is not None:
        scores = _sigmoid(np.asarray(outputs[logits_spec.name][index], dtype=np.float64).ravel())
    else:
        raise ValueError(f"{card.model.name}: card declares no probabilities or logits output")
    heatmap_spec = card.output("heatmap")
    maps = outputs[heatmap_spec.name][index] if heatmap_spec is not None else None
    findings = []
    for label in card.labels:
        if label.index >= scores.size:
            raise ValueError(
                f"{card.model.name}: label index {label.index} outside the {scores.size} outputs"
            )
        deferred = None
        if maps is not None:
            channel = maps[label.index] if maps.shape[0] > label.index else maps[0]
            deferred = functools.partial(source_heatmap, channel, geometry)
        findings.append(
            Finding(
                concept=label.concept,
                probability=float(scores[label.index]),
                threshold=label.threshold,
                critical=label.critical,
                deferred_heatmap=deferred,
            )
        )
    return findings


def _label(card: ModelCard, index: int) -> Label | None:
    return next((label for label in card.labels if label.index == index), None)


def detection_findings(
    card: ModelCard, outputs: dict[str, np.ndarray], index: int, geometry: Letterbox
) -> list[Finding]:
    """Boxes of sample ``index`` with score >= the output's min_score, in source pixels
    (col0, row0, col1, row1), highest score first."""
    spec = card.output("boxes")
    if spec is None:
        raise ValueError(f"{card.model.name}: card declares no boxes output")
    rows = np.asarray(outputs[spec.name][index], dtype=np.float64).reshape(-1, 6)
    source_rows, source_cols = geometry.source_shape
    findings = []
    for x0, y0, x1, y1, score, label_index in rows[np.argsort(-rows[:, 4], kind="stable")]:
        label = _label(card, int(np.rint(label_index)))
        if score < spec.min_score or label is None:
            continue
        top, left = geometry.to_source(y0 - 0.5, x0 - 0.5)
        bottom, right = geometry.to_source(y1 - 0.5, x1 - 0.5)
        box = (
            float(np.clip(left + 0.5, 0, source_cols)),
            float(np.clip(top + 0.5, 0, source_rows)),
            float(np.clip(right + 0.5, 0, source_cols)),
            float(np.clip(bottom + 0.5, 0, source_rows)),
        )
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            continue
        findings.append(
            Finding(
                concept=label.concept,
                probability=float(score),
                threshold=label.threshold,
                critical=label.critical,
                peak=((box[0] + box[2]) / 2 - 0.5, (box[1] + box[3]) / 2 - 0.5),
                box=box,
            )
        )
    return findings


def landmark_findings(
    card: ModelCard, outputs: dict[str, np.ndarray], index: int, geometry: Letterbox
) -> list[Finding]:
    """One finding per label: the landmark's (column, row) in source pixels and its score."""
    spec = card.output("landmarks")
    if spec is None:
        raise ValueError(f"{card.model.name}: card declares no landmarks output")
    points = np.asarray(outputs[spec.name][index], dtype=np.float64).reshape(-1, 3)
    source_rows, source_cols = geometry.source_shape
    findings = []
    for label in card.labels:
        if label.index >= len(points):
            raise ValueError(
                f"{card.model.name}: label index {label.index} outside the {len(points)} landmarks"
            )
        x, y, score = points[label.index]
        row, col = geometry.to_source(y, x)
        point = (float(np.clip(col, 0, source_cols - 1)), float(np.clip(row, 0, source_rows - 1)))
        findings.append(
            Finding(
                concept=label.concept,
                probability=float(np.clip(score, 0.0, 1.0)),
                threshold=label.threshold,
                critical=label.critical,
                peak=point,
                point=point,
            )
        )
    return findings


def mask_maps(
    card: ModelCard, outputs: dict[str, np.ndarray], index: int, geometry: Letterbox
) -> dict[int, np.ndarray]:
    """Per label index, the segment's probabilities (0..1) resampled to the source grid."""
    spec = card.output("mask")
    if spec is None:
        raise ValueError(f"{card.model.name}: card declares no mask output")
    maps = np.asarray(outputs[spec.name][index], dtype=np.float32)
    result = {}
    for label in card.labels:
        if label.index >= maps.shape[0]:
            raise ValueError(
                f"{card.model.name}: label index {label.index} outside the {maps.shape[0]} masks"
            )
        result[label.index] = np.clip(geometry.map_to_source(maps[label.index]), 0.0, 1.0)
    return result


def _image_output(card: ModelCard, outputs: dict[str, np.ndarray], index: int) -> np.ndarray:
    """Sample ``index`` of the card's image output in 0..1 presentation units."""
    spec = card.output("image")
    if spec is None:
        raise ValueError(f"{card.model.name}: card declares no image output")
    return _unnormalised(card, np.asarray(outputs[spec.name][index], dtype=np.float32)[0])


def image_presentation(
    card: ModelCard, outputs: dict[str, np.ndarray], index: int, geometry: Letterbox
) -> np.ndarray:
    """An image-to-image output as 0..1 presentation values over the source grid (the card's
    input normalisation inverted). The node writes derived images with ``image_correction``,
    which keeps the source's detail finer than the model's grid."""
    return np.clip(geometry.map_to_source(_image_output(card, outputs, index)), 0.0, 1.0)


def image_correction(
    card: ModelCard,
    outputs: dict[str, np.ndarray],
    index: int,
    geometry: Letterbox,
    model_input: np.ndarray,
) -> np.ndarray:
    """What an image-to-image model changed (output minus the input it saw, in 0..1
    presentation units) resampled to the source grid; 0 outside the image."""
    image = _image_output(card, outputs, index)
    given = _unnormalised(card, np.asarray(model_input, dtype=np.float32)[0])
    return geometry.map_to_source(image - given)


def _unnormalised(card: ModelCard, image: np.ndarray) -> np.ndarray:
    if card.input.normalisation == "zscore":
        return image * np.float32(card.input.std) + np.float32(card.input.mean)
    return image
