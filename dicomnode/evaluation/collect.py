"""From a model's output on some cases to per-case values, one collector per kind of task.

Each collector takes the :class:`dicomnode.findings.ModelRun` of ``run_model`` on a batch of
cases, maps its images back to the ground truth by SOP Instance UID, keeps only small per-case
values (scores, Dice, detections, distances, errors) and summarises them at the end.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.evaluation import dataset, metrics, summary
from dicomnode.evaluation.dataset import Case
from dicomnode.findings import Finding, ModelRun
from dicomnode.models.registry import Label, ModelCard
from dicomnode.pipeline.presentation_values import presentation_pixels

# A detection hits a lesion when its centre is within the lesion's radius, at least this many mm
# (so that 3-5 mm nodules are not held to sub-pixel aim).
MIN_HIT_RADIUS_MM = 5.0

Frames = dict[str, tuple[Case, int]]  # SOP Instance UID -> (case, index of its file in the case)


def truth_key(label: Label) -> str:
    """The label's ground-truth key; for a card without one, its code meaning in lower case
    (e.g. "Pneumothorax" -> "pneumothorax")."""
    return label.truth or label.code_meaning.strip().lower()


def label_name(label: Label) -> str:
    return truth_key(label)


def _finding(findings: list[Finding], label: Label) -> Finding | None:
    return next(
        (
            f
            for f in findings
            if f.concept.value == label.code_value and f.concept.scheme == label.code_scheme
        ),
        None,
    )


def _case_of(frames: Frames, ds: object) -> tuple[Case, int]:
    uid = str(getattr(ds, "SOPInstanceUID", ""))
    if uid not in frames:
        raise KeyError(f"the model returned an image (SOP Instance {uid}) the truth does not know")
    return frames[uid]


def _cxr(case: Case, task: str):
    if case.cxr is None:
        raise ValueError(f"{task} evaluation needs chest X-ray data (dicomnode synth cxr)")
    return case.cxr


class ScoreCollector:
    """Classification, multi-label, ensemble and view routers: one score per image and label."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.router = card.model.sets == "view"
        self.scores: dict[int, list[float]] = {label.index: [] for label in card.labels}
        self.truth: dict[int, list[bool]] = {label.index: [] for label in card.labels}
        self.views: list[str] = []
        self.predicted_views: list[str] = []

    def add(self, run: ModelRun, frames: Frames) -> None:
        for item in run.images:
            case, _ = _case_of(frames, item.source)
            record = _cxr(case, self.card.model.task)
            best: tuple[float, str] = (-math.inf, "")
            for label in self.card.labels:
                finding = _finding(item.findings, label)
                if finding is None:
                    raise ValueError(
                        f"{self.card.model.name}: no {label.code_meaning} finding on {case.key}"
                    )
                self.scores[label.index].append(finding.probability)
                self.truth[label.index].append(dataset.label_truth(record, truth_key(label)))
                best = max(best, (finding.probability, label.fact_value.upper()))
            if self.router:
                self.views.append(record.view.upper())
                self.predicted_views.append(best[1])

    def result(self) -> dict:
        labels = {
            label_name(label): {
                "code": f"{label.code_scheme} {label.code_value} {label.code_meaning}",
                "truth": truth_key(label),
                **summary.scores_summary(
                    np.array(self.truth[label.index], dtype=bool),
                    np.array(self.scores[label.index]),
                    label.threshold,
                ),
            }
            for label in self.card.labels
        }
        result: dict[str, object] = {"labels": labels, "mean_auc": summary.mean_auc(labels)}
        if self.router:
            classes = [label.fact_value.upper() for label in self.card.labels]
            result.update(summary.confusion_summary(self.views, self.predicted_views, classes))
        return result


class SegmentationCollector:
    """Segmentation: Dice per image (CXR) or per series in 3-D (CT) and label."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.dice: dict[int, list[float]] = {label.index: [] for label in card.labels}
        self.unit = "image"

    def add(self, run: ModelRun, frames: Frames) -> None:
        for segmentation in run.segmentations:
            located = [_case_of(frames, ds) for ds in segmentation.sources]
            case = located[0][0]
            if any(other.key != case.key for other, _ in located):
                raise ValueError(f"{self.card.model.name}: a segmentation spans several cases")
            order = [index for _, index in located]
            for label in self.card.labels:
                segment = next(
                    (s for s in segmentation.segments if s.concept == label.concept), None
                )
                if segment is None:
                    raise ValueError(f"{self.card.model.name}: no segment {label.code_meaning}")
                if case.ct is not None:
                    self.unit = "series (3-D)"
                    truth = dataset.ct_mask(case.ct, truth_key(label))[order]
                else:
                    truth = dataset.cxr_mask(_cxr(case, "segmentation"), truth_key(label))[None]
                self.dice[label.index].append(metrics.dice(segment.mask, truth))

    def result(self) -> dict:
        return {
            "labels": {
                label_name(label): {
                    "truth": truth_key(label),
                    "threshold": label.threshold,
                    **summary.dice_summary(self.dice[label.index], self.unit),
                }
                for label in self.card.labels
            }
        }


def group_candidates(
    points: np.ndarray, scores: np.ndarray, radii: np.ndarray, slice_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice detections (z, y, x in mm, score, in-plane radius mm) merged into 3-D
    candidates: in descending score, a detection joins the first candidate whose centre is
    within the candidate's radius (at least MIN_HIT_RADIUS_MM) in plane and which reaches
    within one slice of it in z; a candidate's centre is the score-weighted mean of its
    detections and its score the highest. Returns (centres (n, 3), scores (n,))."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    margin_z = slice_mm * 1.01
    candidates: list[dict[str, float]] = []
    for i in order:
        z, y, x = (float(v) for v in points[i])
        score, radius = float(scores[i]), float(radii[i])
        # In z first: most candidates are on other slices (a scan's detector gives thousands
        # of low-scoring boxes), and the comparison costs less than the distance.
        for c in candidates:
            if not c["z0"] - margin_z <= z <= c["z1"] + margin_z:
                continue
            if math.hypot(y - c["y"], x - c["x"]) <= max(c["radius"], MIN_HIT_RADIUS_MM):
                weight = c["weight"] + score
                for key, value in (("z", z), ("y", y), ("x", x)):
                    c[key] = (c[key] * c["weight"] + value * score) / weight
                c.update(weight=weight, z0=min(c["z0"], z), z1=max(c["z1"], z))
                c["radius"] = max(c["radius"], radius)
                break
        else:
            candidates.append(
                {
                    "score": score,
                    "z": z,
                    "y": y,
                    "x": x,
                    "z0": z,
                    "z1": z,
                    "radius": radius,
                    "weight": score,
                }
            )
    centres = np.array([[c["z"], c["y"], c["x"]] for c in candidates]).reshape(-1, 3)
    return centres, np.array([c["score"] for c in candidates], dtype=np.float64)


def _hits(points: np.ndarray, truth: np.ndarray, radii: np.ndarray) -> np.ndarray:
    if len(truth) == 0 or len(points) == 0:
        return np.full(len(points), -1, dtype=np.int64)
    return metrics.match_points(points, truth, radii)


class DetectionCollector:
    """Detection: FROC cases per image (CXR, in source pixels) or per scan (CT, 3-D in mm)."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.cases: dict[int, list[metrics.CaseDetections]] = {lb.index: [] for lb in card.labels}
        self.unit = "image"

    def add(self, run: ModelRun, frames: Frames) -> None:
        by_case: dict[str, list[tuple[int, object, list[Finding]]]] = {}
        cases: dict[str, Case] = {}
        for item in run.images:
            case, index = _case_of(frames, item.source)
            cases[case.key] = case
            by_case.setdefault(case.key, []).append((index, item.source, item.findings))
        for key, items in by_case.items():
            for label in self.card.labels:
                if cases[key].ct is not None:
                    self.unit = "scan"
                    self.cases[label.index].append(self._ct_case(cases[key], items, label))
                else:
                    _, source, findings = items[0]
                    self.cases[label.index].append(
                        self._cxr_case(cases[key], source, findings, label)
                    )

    def _cxr_case(
        self, case: Case, source: object, findings: list[Finding], label: Label
    ) -> metrics.CaseDetections:
        record = _cxr(case, "detection")
        boxes = [f for f in findings if f.box is not None and f.concept == label.concept]
        truth = np.array(record.boxes_of(truth_key(label)), dtype=np.float64).reshape(-1, 4)
        row_mm, col_mm = dataset.pixel_spacing_mm(source)
        centres = np.array(
            [((f.box[1] + f.box[3]) / 2, (f.box[0] + f.box[2]) / 2) for f in boxes]
        ).reshape(-1, 2)
        truth_centres = np.stack(
            [(truth[:, 0] + truth[:, 2]) / 2, (truth[:, 1] + truth[:, 3]) / 2], 1
        )
        radii = np.maximum(
            (truth[:, 2:4] - truth[:, 0:2]).max(axis=1, initial=0) / 2,
            MIN_HIT_RADIUS_MM / min(row_mm, col_mm),
        )
        scores = np.array([f.probability for f in boxes], dtype=np.float64)
        return metrics.CaseDetections(scores, _hits(centres, truth_centres, radii), len(truth))

    def _ct_case(
        self, case: Case, items: list[tuple[int, object, list[Finding]]], label: Label
    ) -> metrics.CaseDetections:
        record = case.ct
        assert record is not None
        spacing, slice_mm = record.pixel_spacing_mm, record.spacing_between_slices_mm
        points, scores, radii = [], [], []
        for index, _, findings in items:
            for f in findings:
                if f.box is None or f.concept != label.concept:
                    continue
                col = (f.box[0] + f.box[2]) / 2 - 0.5
                row = (f.box[1] + f.box[3]) / 2 - 0.5
                points.append((index * slice_mm, row * spacing, col * spacing))
                scores.append(f.probability)
                radii.append((f.box[2] - f.box[0]) / 2 * spacing)
        centres, candidate_scores = group_candidates(
            np.array(points, dtype=np.float64).reshape(-1, 3),
            np.array(scores, dtype=np.float64),
            np.array(radii, dtype=np.float64),
            slice_mm,
        )
        nodules = record.nodules
        truth = np.array(
            [
                (
                    n.center_voxel[0] * slice_mm,
                    n.center_voxel[1] * spacing,
                    n.center_voxel[2] * spacing,
                )
                for n in nodules
            ],
            dtype=np.float64,
        ).reshape(-1, 3)
        radii_mm = np.array([max(n.diameter_mm / 2, MIN_HIT_RADIUS_MM) for n in nodules])
        hits = _hits(centres, truth, radii_mm)
        return metrics.CaseDetections(candidate_scores, hits, len(truth))

    def result(self) -> dict:
        return {
            "hit_rule": (
                "detection centre within the lesion radius (at least "
                f"{MIN_HIT_RADIUS_MM:g} mm); CT: per-slice boxes merged into 3-D candidates"
            ),
            "labels": {
                label_name(label): {
                    "truth": truth_key(label),
                    **summary.froc_summary(self.cases[label.index], label.threshold, self.unit),
                }
                for label in self.card.labels
            },
        }


class LandmarkCollector:
    """Landmarks: presence score per image, and the distance error where present."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.present: dict[int, list[bool]] = {label.index: [] for label in card.labels}
        self.scores: dict[int, list[float]] = {label.index: [] for label in card.labels}
        self.distances: dict[int, list[float]] = {label.index: [] for label in card.labels}

    def add(self, run: ModelRun, frames: Frames) -> None:
        for item in run.images:
            case, _ = _case_of(frames, item.source)
            record = _cxr(case, "landmark")
            row_mm, col_mm = dataset.pixel_spacing_mm(item.source)
            for label in self.card.labels:
                finding = _finding(item.findings, label)
                if finding is None or finding.point is None:
                    raise ValueError(f"{self.card.model.name}: no {label.code_meaning} point")
                self.scores[label.index].append(finding.probability)
                truth = record.landmarks.get(truth_key(label))
                self.present[label.index].append(truth is not None)
                if truth is not None:
                    col, row = finding.point
                    self.distances[label.index].append(
                        math.hypot((row - truth[0]) * row_mm, (col - truth[1]) * col_mm)
                    )

    def result(self) -> dict:
        return {
            "labels": {
                label_name(label): {
                    "truth": truth_key(label),
                    **summary.landmark_summary(
                        np.array(self.present[label.index], dtype=bool),
                        np.array(self.scores[label.index]),
                        label.threshold,
                        self.distances[label.index],
                    ),
                }
                for label in self.card.labels
            }
        }


def with_pixels(ds: pydicom.Dataset, stored: np.ndarray) -> pydicom.Dataset:
    """A copy of ``ds`` whose pixels are ``stored`` (same stored-value scale, photometric and
    window), uncompressed."""
    copied = copy.deepcopy(ds)
    dtype = ds.pixel_array.dtype
    copied.PixelData = np.asarray(stored).astype(dtype).tobytes()
    if getattr(copied, "file_meta", None) is not None:
        copied.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return copied


class ImageCollector:
    """Image-to-image: MAE and PSNR (0..1 presentation values, the card's window) of the
    derived image and of the input image against the truth image."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        keys = [label.truth for label in card.labels if label.truth]
        self.truth_key = keys[0] if keys else "soft_tissue"
        self.rows: dict[str, list[float]] = {
            key: [] for key in ("mae_output", "psnr_output", "mae_input", "psnr_input")
        }

    def _present(self, ds: pydicom.Dataset) -> np.ndarray:
        spec = self.card.input
        return presentation_pixels(ds, spec.window_percentiles, spec.window)

    def add(self, run: ModelRun, frames: Frames) -> None:
        for derived in run.derived:
            case, _ = _case_of(frames, derived.source)
            record = _cxr(case, "image-to-image")
            masks = record.masks()
            if self.truth_key not in masks:
                raise KeyError(f"{record.file}: the truth has no {self.truth_key!r} image")
            source = derived.source
            target = self._present(with_pixels(source, masks[self.truth_key]))
            output = self._present(with_pixels(source, derived.pixels))
            for name, candidate in (("output", output), ("input", self._present(source))):
                mae, psnr = summary.image_errors(candidate, target)
                self.rows[f"mae_{name}"].append(mae)
                self.rows[f"psnr_{name}"].append(psnr)

    def result(self) -> dict:
        return {
            "intensity_space": "0..1 presentation values (the card's window, MONOCHROME1 "
            "inverted), source pixels",
            "labels": {
                self.truth_key: {"truth": self.truth_key, **summary.image_summary(self.rows)}
            },
        }


def collector_for(card: ModelCard):
    """The collector of the card's task."""
    task = card.model.task
    if task in ("classification", "multi-label", "ensemble"):
        return ScoreCollector(card)
    return {
        "segmentation": SegmentationCollector,
        "detection": DetectionCollector,
        "landmark": LandmarkCollector,
        "image-to-image": ImageCollector,
    }[task](card)


def evaluation_kind(card: ModelCard) -> str:
    """The summary's kind: classification, router, segmentation, detection, landmark, image."""
    task = card.model.task
    if task in ("classification", "multi-label", "ensemble"):
        return "router" if card.model.sets == "view" else "classification"
    return "image" if task == "image-to-image" else task
