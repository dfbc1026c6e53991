"""Model outputs -> findings: probabilities, decisions, heat maps in source pixels (pure)."""

from __future__ import annotations

import numpy as np

from dicomnode.findings import Finding
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.preprocess import Letterbox


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def normalise_map(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scale a class-activation map to 0..1 (a flat map becomes all zeros)."""
    heatmap = heatmap.astype(np.float32)
    low, high = float(heatmap.min()), float(heatmap.max())
    if high - low < 1e-12:
        return np.zeros_like(heatmap)
    return (heatmap - low) / (high - low)


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
        heatmap = peak = None
        if maps is not None:
            channel = maps[label.index] if maps.shape[0] > label.index else maps[0]
            heatmap = normalise_map(geometry.map_to_source(normalise_map(channel)))
            row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            peak = (float(col), float(row))
        findings.append(
            Finding(
                concept=label.concept,
                probability=float(scores[label.index]),
                threshold=label.threshold,
                critical=label.critical,
                peak=peak,
                heatmap=heatmap,
            )
        )
    return findings
