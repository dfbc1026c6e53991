"""Evaluation metrics for the model zoo (pure numpy): ROC/AUC with DeLong confidence
intervals, operating points, Dice, and FROC for detectors.

Training scripts and ``dicomnode models eval`` use the same functions, so a card's metrics and
a re-evaluation are computed identically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_Z = {0.90: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}


def _as_arrays(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if labels.all() or not labels.any():
        raise ValueError("AUC needs at least one positive and one negative case")
    return labels, scores


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney statistic; ties count one half)."""
    labels, scores = _as_arrays(labels, scores)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1.0, counts)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_confidence_interval(
    labels: np.ndarray, scores: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """DeLong confidence interval of the AUC (normal approximation, clipped to 0..1)."""
    labels, scores = _as_arrays(labels, scores)
    if level not in _Z:
        raise ValueError(f"level must be one of {sorted(_Z)}, got {level}")
    pos, neg = scores[labels], scores[~labels]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    area = float(kernel.mean())
    v10 = kernel.mean(axis=1)
    v01 = kernel.mean(axis=0)
    variance = 0.0
    if pos.size > 1:
        variance += float(v10.var(ddof=1)) / pos.size
    if neg.size > 1:
        variance += float(v01.var(ddof=1)) / neg.size
    half = _Z[level] * math.sqrt(max(variance, 0.0))
    return max(0.0, area - half), min(1.0, area + half)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending; the curve
    starts at (0, 0) with threshold +inf."""
    labels, scores = _as_arrays(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / labels.sum()]
    fpr = np.r_[0.0, fps / (~labels).sum()]
    return fpr, tpr, np.r_[np.inf, scores[distinct]]


def sensitivity_specificity(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Sensitivity and specificity of ``score >= threshold``."""
    labels, scores = _as_arrays(labels, scores)
    predicted = scores >= threshold
    return float(predicted[labels].mean()), float((~predicted[~labels]).mean())


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1, halfway (in logit space for
    probabilities) between the two scores it separates, not at a score's edge."""
    labels, scores = _as_arrays(labels, scores)
    probabilities = bool(scores.min() >= 0.0 and scores.max() <= 1.0)
    values = np.unique(scores)
    if probabilities:
        clipped = np.clip(values, 1e-7, 1 - 1e-7)
        values = np.log(clipped / (1 - clipped))
    candidates = np.r_[values[0] - 1.0, (values[:-1] + values[1:]) / 2, values[-1] + 1.0]
    if probabilities:
        candidates = 1 / (1 + np.exp(-candidates))
    predicted = scores[None, :] >= candidates[:, None]
    sensitivity = predicted[:, labels].mean(axis=1)
    specificity = (~predicted[:, ~labels]).mean(axis=1)
    return float(candidates[np.argmax(sensitivity + specificity - 1)])


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {truth.shape}")
    total = int(predicted.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(predicted, truth).sum()) / total


def mean_confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Normal-approximation confidence interval of a mean (e.g. per-case Dice)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        mean = float(array.mean()) if array.size else float("nan")
        return mean, mean
    half = _Z[level] * float(array.std(ddof=1)) / math.sqrt(array.size)
    return float(array.mean() - half), float(array.mean() + half)


@dataclass(frozen=True)
class CaseDetections:
    """One case (image or scan) for FROC: detection scores, which true lesion each detection
    hits (-1 = false positive), and how many true lesions the case has."""

    scores: np.ndarray
    hits: np.ndarray
    n_lesions: int


@dataclass(frozen=True)
class FrocCurve:
    """Sensitivity against mean false positives per case, thresholds descending."""

    fp_per_case: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray

    def sensitivity_at(self, fp_per_case: float) -> float:
        """Best sensitivity with at most ``fp_per_case`` false positives per case."""
        allowed = self.fp_per_case <= fp_per_case + 1e-12
        return float(self.sensitivity[allowed].max()) if allowed.any() else 0.0

    def threshold_at(self, fp_per_case: float) -> float:
        """Lowest threshold with at most ``fp_per_case`` false positives per case."""
        allowed = np.flatnonzero(self.fp_per_case <= fp_per_case + 1e-12)
        return float(self.thresholds[allowed[-1]]) if allowed.size else float("inf")

    def cpm(self, points: Sequence[float] = (0.125, 0.25, 0.5, 1, 2, 4, 8)) -> float:
        """Competition performance metric: mean sensitivity at the given FP rates."""
        return float(np.mean([self.sensitivity_at(p) for p in points]))


def froc(cases: Sequence[CaseDetections]) -> FrocCurve:
    """FROC curve over cases; a lesion hit by several detections counts once (at the highest
    of their scores), extra detections on a found lesion are neither hits nor FPs."""
    total_lesions = sum(case.n_lesions for case in cases)
    if not cases or total_lesions == 0:
        raise ValueError("FROC needs at least one case with a true lesion")
    scores: list[float] = []
    kinds: list[int] = []  # 1 = first hit of a lesion, 0 = false positive
    for case_index, case in enumerate(cases):
        case_scores = np.asarray(case.scores, dtype=np.float64).ravel()
        case_hits = np.asarray(case.hits, dtype=np.int64).ravel()
        best: dict[int, float] = {}
        for score, hit in zip(case_scores, case_hits, strict=True):
            if hit < 0:
                scores.append(float(score))
                kinds.append(0)
            elif hit >= case.n_lesions:
                raise ValueError(f"case {case_index}: hit {hit} but {case.n_lesions} lesions")
            else:
                best[int(hit)] = max(best.get(int(hit), -np.inf), float(score))
        for score in best.values():
            scores.append(score)
            kinds.append(1)
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    sorted_kinds = np.asarray(kinds)[order]
    if sorted_scores.size == 0:
        return FrocCurve(np.zeros(1), np.zeros(1), np.array([np.inf]))
    distinct = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    hits = np.cumsum(sorted_kinds)[distinct]
    fps = np.cumsum(1 - sorted_kinds)[distinct]
    return FrocCurve(
        fp_per_case=np.r_[0.0, fps / len(cases)],
        sensitivity=np.r_[0.0, hits / total_lesions],
        thresholds=np.r_[np.inf, sorted_scores[distinct]],
    )


def match_points(predicted: np.ndarray, truth: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each predicted point (rows of coordinates, any dimension), the index of the nearest
    true lesion whose radius contains it, or -1."""
    predicted = np.asarray(predicted, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if truth.size == 0 or predicted.size == 0:  # before reshaping: (0, -1) has no shape
        return np.full(len(predicted), -1, dtype=np.int64)
    predicted = predicted.reshape(len(predicted), -1)
    truth = truth.reshape(len(truth), -1)
    radii = np.asarray(radii, dtype=np.float64).ravel()
    distances = np.linalg.norm(predicted[:, None, :] - truth[None, :, :], axis=2)
    inside = distances <= radii[None, :]
    nearest = np.where(inside, distances, np.inf).argmin(axis=1)
    return np.where(inside.any(axis=1), nearest, -1).astype(np.int64)
