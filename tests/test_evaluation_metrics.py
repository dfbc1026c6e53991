"""Evaluation metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.evaluation.metrics import (
    CaseDetections,
    auc_confidence_interval,
    dice,
    froc,
    match_points,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
    youden_threshold,
)


def test_auc_counts_ordered_pairs_and_ties() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(labels, np.array([0.9, 0.8, 0.1, 0.2])) == pytest.approx(0.0)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc(np.array([1, 1]), np.array([0.2, 0.3]))


def test_delong_interval_contains_auc_and_narrows_with_more_cases() -> None:
    rng = np.random.default_rng(0)
    small_labels = rng.integers(0, 2, 40)
    large_labels = rng.integers(0, 2, 4000)
    small = auc_confidence_interval(small_labels, small_labels + rng.normal(0, 0.8, 40))
    large = auc_confidence_interval(large_labels, large_labels + rng.normal(0, 0.8, 4000))
    assert small[0] < large[0] < large[1] < small[1]
    auc = roc_auc(large_labels, large_labels + rng.normal(0, 0.8, 4000))
    assert large[1] - large[0] < 0.05 and 0.7 < auc < 0.85


def test_roc_curve_and_operating_point() -> None:
    labels = np.array([0, 0, 1, 1])
    fpr, tpr, thresholds = roc_curve(labels, np.array([0.1, 0.4, 0.35, 0.8]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thresholds[0] == np.inf
    assert sensitivity_specificity(labels, np.array([0.1, 0.4, 0.35, 0.8]), 0.3) == (1.0, 0.5)


def test_youden_threshold_sits_in_the_gap() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    threshold = youden_threshold(labels, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]))
    assert 0.3 < threshold < 0.7
    assert threshold == pytest.approx(0.5, abs=0.01)


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


def test_froc_counts_each_lesion_once_per_case() -> None:
    cases = [
        # lesion 0 hit twice (0.9, 0.6), one FP at 0.8
        CaseDetections(np.array([0.9, 0.8, 0.6]), np.array([0, -1, 0]), n_lesions=2),
        # lesion 0 found at 0.7, FP at 0.3
        CaseDetections(np.array([0.7, 0.3]), np.array([0, -1]), n_lesions=1),
    ]
    curve = froc(cases)
    assert curve.sensitivity_at(0.0) == pytest.approx(1 / 3)
    assert curve.sensitivity_at(0.5) == pytest.approx(2 / 3)
    assert curve.sensitivity_at(1.0) == pytest.approx(2 / 3)
    assert curve.threshold_at(0.5) == pytest.approx(0.7)
    assert 0 < curve.cpm() <= 1


def test_match_points_uses_radius_and_nearest() -> None:
    truth = np.array([[10.0, 10.0], [30.0, 30.0]])
    hits = match_points(np.array([[11, 10], [29, 31], [50, 50]]), truth, np.array([3.0, 3.0]))
    assert hits.tolist() == [0, 1, -1]


def test_match_points_with_no_lesions_or_no_detections() -> None:
    assert match_points(np.array([[1.0, 2.0]]), np.empty((0,)), np.empty((0,))).tolist() == [-1]
    assert match_points(np.empty((0, 2)), np.array([[1.0, 2.0]]), np.array([3.0])).tolist() == []
