"""Per-task metric summaries (pure): per-case values in, a JSON-ready dict out.

Every number comes from :mod:`dicomnode.evaluation.metrics`, the functions the training
scripts used for the cards' held-out metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dicomnode.evaluation import metrics

# False positives per case at which FROC sensitivities are reported (and averaged for CPM).
FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Landmark distance a prediction must be within to count as found.
LANDMARK_HIT_MM = 10.0
PLURAL = {"image": "images", "series": "series"}


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def scores_summary(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """AUC with DeLong 95 % CI, sensitivity/specificity at ``threshold`` and the ROC curve;
    AUC fields are None when the truth has one class only."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    result: dict[str, object] = {
        "n": int(labels.size),
        "positives": int(labels.sum()),
        "threshold": float(threshold),
        "auc": None,
        "auc_ci_low": None,
        "auc_ci_high": None,
        "auc_ci_method": "DeLong 95%",
        "sensitivity": None,
        "specificity": None,
    }
    if labels.size == 0:
        return result
    predicted = scores >= threshold
    if labels.any():
        result["sensitivity"] = float(predicted[labels].mean())
    if (~labels).any():
        result["specificity"] = float((~predicted[~labels]).mean())
    if labels.any() and (~labels).any():
        low, high = metrics.auc_confidence_interval(labels, scores)
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
        result.update(
            auc=metrics.roc_auc(labels, scores),
            auc_ci_low=low,
            auc_ci_high=high,
            roc={
                "fpr": [round(float(v), 6) for v in fpr],
                "tpr": [round(float(v), 6) for v in tpr],
            },
        )
    return result


def mean_auc(per_label: dict[str, dict]) -> float | None:
    """Mean AUC over the labels whose AUC could be computed."""
    values = [v["auc"] for v in per_label.values() if v.get("auc") is not None]
    return float(np.mean(values)) if values else None


def confusion_summary(
    truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]
) -> dict:
    """Accuracy and confusion matrix (rows = truth, columns = prediction, in ``classes`` order;
    a prediction outside ``classes`` counts as wrong)."""
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for true, guess in zip(truth, predicted, strict=True):
        if true in index and guess in index:
            matrix[index[true], index[guess]] += 1
    n = len(truth)
    correct = sum(1 for true, guess in zip(truth, predicted, strict=True) if true == guess)
    per_class = {
        name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
        for name, i in index.items()
    }
    return {
        "n": n,
        "accuracy": float(correct / n) if n else None,
        "classes": list(classes),
        "confusion": matrix.tolist(),
        "confusion_layout": "rows = truth, columns = prediction",
        "recall_per_class": per_class,
    }


def dice_summary(values: Sequence[float], unit: str) -> dict:
    """Mean Dice with a normal-approximation 95 % CI, median and minimum over cases."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"n": 0, "unit": unit, "dice_mean": None}
    low, high = metrics.mean_confidence_interval(array)
    return {
        "n": int(array.size),
        "unit": unit,
        "dice_mean": float(array.mean()),
        "dice_ci_low": low,
        "dice_ci_high": high,
        "dice_ci_method": "normal approximation 95% of the per-case mean",
        "dice_median": float(np.median(array)),
        "dice_min": float(array.min()),
        "per_case": [round(float(v), 6) for v in array],
    }


def froc_summary(cases: Sequence[metrics.CaseDetections], threshold: float, unit: str) -> dict:
    """FROC sensitivities at FROC_RATES false positives per case, CPM, the curve, the
    operating point at ``threshold``, and a per-case AUC of the highest detection score."""
    n_lesions = sum(case.n_lesions for case in cases)
    result: dict[str, object] = {
        "n_cases": len(cases),
        "case_unit": unit,
        "n_lesions": int(n_lesions),
        "fp_rates": list(FROC_RATES),
    }
    if n_lesions == 0:
        result.update(sensitivities=None, cpm=None)
        return result
    curve = metrics.froc(cases)
    found, false_positives = 0, 0
    for case in cases:
        scores = np.asarray(case.scores, dtype=np.float64)
        hits = np.asarray(case.hits, dtype=np.int64)
        kept = scores >= threshold
        found += len(set(hits[kept & (hits >= 0)].tolist()))
        false_positives += int((kept & (hits < 0)).sum())
    result.update(
        sensitivities=[curve.sensitivity_at(rate) for rate in FROC_RATES],
        cpm=curve.cpm(FROC_RATES),
        curve={
            "fp_per_case": [round(float(v), 6) for v in curve.fp_per_case],
            "sensitivity": [round(float(v), 6) for v in curve.sensitivity],
        },
        threshold=float(threshold),
        sensitivity_at_threshold=found / n_lesions,
        fp_per_case_at_threshold=false_positives / len(cases),
    )
    for rate, value in zip(FROC_RATES, result["sensitivities"], strict=True):
        result[f"sensitivity_at_{rate:g}_fp"] = value
    has_lesion = np.array([case.n_lesions > 0 for case in cases])
    top = np.array([float(np.max(case.scores)) if len(case.scores) else 0.0 for case in cases])
    case_scores = scores_summary(has_lesion, top, threshold)
    case_scores.pop("roc", None)
    result["case_level"] = {"score": f"highest detection score per {unit}", **case_scores}
    return result


def landmark_summary(
    present: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    distances_mm: Sequence[float],
) -> dict:
    """Presence AUC/sensitivity/specificity and the distance error (mm) of the predicted point
    on images where the landmark is present: median, 90th percentile, fraction within 10 mm."""
    result = scores_summary(present, scores, threshold)
    result["presence_auc"] = result.pop("auc")
    result["presence_auc_ci_low"] = result.pop("auc_ci_low")
    result["presence_auc_ci_high"] = result.pop("auc_ci_high")
    distances = np.asarray(distances_mm, dtype=np.float64)
    result["n_distances"] = int(distances.size)
    if distances.size:
        result.update(
            distance_mm_median=float(np.median(distances)),
            distance_mm_p90=float(np.percentile(distances, 90)),
            distance_mm_mean=float(distances.mean()),
            within_10mm=float((distances <= LANDMARK_HIT_MM).mean()),
            distances_mm=[round(float(v), 3) for v in distances],
        )
    return result


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for data range 1."""
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def image_errors(candidate: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """MAE and PSNR (data range 1) of two 0..1 images of one shape."""
    candidate = np.asarray(candidate, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if candidate.shape != target.shape:
        raise ValueError(f"image shapes differ: {candidate.shape} vs {target.shape}")
    error = candidate - target
    return float(np.abs(error).mean()), psnr(float((error**2).mean()))


def image_summary(rows: dict[str, Sequence[float]]) -> dict:
    """Mean and 95 % CI of each per-image value (e.g. mae_output, psnr_input)."""
    result: dict[str, object] = {"n": len(next(iter(rows.values()), []))}
    for key, values in rows.items():
        array = np.asarray(values, dtype=np.float64)
        if array.size == 0:
            result[key] = None
            continue
        low, high = metrics.mean_confidence_interval(array)
        result[key] = float(array.mean())
        result[f"{key}_ci_low"] = low
        result[f"{key}_ci_high"] = high
    return result


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table_lines(result: dict) -> list[str]:
    """A short text table of an evaluation result (one line per label)."""
    lines = [
        f"{result['model']} {result['version']} [{result['task']}] on {result['n_cases']} "
        f"{PLURAL.get(result['case_unit'], result['case_unit'])} of {result['data']}"
    ]
    kind = result["evaluation"]
    if kind == "router":
        lines.append(f"  accuracy {_fmt(result['accuracy'])}  ({result['n_images']} images)")
    for name, item in result.get("labels", {}).items():
        if kind in ("classification", "router"):
            cells = (
                f"AUC {_fmt(item['auc'])} [{_fmt(item['auc_ci_low'])}, {_fmt(item['auc_ci_high'])}]"
                f"  sens {_fmt(item['sensitivity'])}  spec {_fmt(item['specificity'])}"
                f"  @{_fmt(item['threshold'])}  n={item['n']} pos={item['positives']}"
            )
        elif kind == "segmentation":
            cells = (
                f"Dice {_fmt(item['dice_mean'])} [{_fmt(item.get('dice_ci_low'))}, "
                f"{_fmt(item.get('dice_ci_high'))}]  n={item['n']} {item['unit']}"
            )
        elif kind == "detection":
            sens = item.get("sensitivities") or []
            at = "  ".join(f"{r:g}:{_fmt(s)}" for r, s in zip(item["fp_rates"], sens, strict=False))
            cells = f"CPM {_fmt(item.get('cpm'))}  sens@FP/{item['case_unit']} {at}"
        elif kind == "landmark":
            cells = (
                f"presence AUC {_fmt(item['presence_auc'])}"
                f"  median {_fmt(item.get('distance_mm_median'))} mm"
                f"  p90 {_fmt(item.get('distance_mm_p90'))} mm"
                f"  <=10 mm {_fmt(item.get('within_10mm'))}"
            )
        else:
            cells = "  ".join(
                f"{key} {_fmt(item.get(key))}"
                for key in ("mae_output", "psnr_output", "mae_input", "psnr_input")
            )
        lines.append(f"  {name}: {cells}")
    if result.get("mean_auc") is not None:
        lines.append(f"  mean AUC {_fmt(result['mean_auc'])}")
    return lines
