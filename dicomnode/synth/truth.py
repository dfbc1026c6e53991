"""Chest phantom data sets on disk: DICOM files with ground truth beside them, and a reader.

A folder written by ``write_dataset`` holds ``cxr_<seed>.dcm`` files and:

``ground_truth.csv``: one row per image with columns file, sop_instance_uid,
study_instance_uid, patient_id, pneumothorax (0/1), side (R/L or empty), box ("row0 col0 row1
col1" or empty: the pneumothorax), then view, modality and findings (space-separated names).

``ground_truth.jsonl``: one JSON object per line and image::

    {"file": "cxr_00000001.dcm",
     "sop_instance_uid": "...", "study_instance_uid": "...", "series_instance_uid": "...",
     "view": "PA" | "AP" | "LATERAL", "modality": "DX" | "CR",
     "rows": R, "columns": C,
     "labels": {"pneumothorax": 0|1, "effusion": 0|1, "consolidation": 0|1,
                "cardiomegaly": 0|1, "edema": 0|1, "nodule": 0|1, "tuberculosis": 0|1,
                "tube": 0|1},
     "boxes": [{"finding": "nodule", "box": [row0, col0, row1, col1]}, ...],
     "landmarks": {"tube_tip": [row, col]},
     "masks": "truth/cxr_00000001.npz"}

Boxes are half-open (row1/col1 exclusive) in source pixels: one per nodule, one per
pneumothorax, consolidation and tuberculosis region. Landmarks are (row, col) source pixels
(floats); "tube_tip" is present only when a tube is. ``masks`` names an ``.npz`` file relative to
the folder with boolean arrays (rows x columns) "lung" (both lungs: the segmentation target),
"heart", one per present finding region (e.g. "nodule", "effusion", "tube"), and a uint16 array
"soft_tissue": the same image rendered without bones (ribs, clavicles, scapulae, spine, sternum)
in the stored-value scale and photometric of the DICOM pixels (the bone-suppression target).
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.synth.cxr import FINDINGS, VIEWS, CxrTruth, make_cxr

CSV_NAME = "ground_truth.csv"
JSONL_NAME = "ground_truth.jsonl"
MASK_FOLDER = "truth"
CSV_COLUMNS = (
    "file",
    "sop_instance_uid",
    "study_instance_uid",
    "patient_id",
    "pneumothorax",
    "side",
    "box",
    "view",
    "modality",
    "findings",
)


@dataclass(frozen=True)
class CxrRecord:
    """One image of a phantom folder as ``ground_truth.jsonl`` describes it."""

    folder: Path
    file: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    view: str
    modality: str
    rows: int
    columns: int
    labels: dict[str, bool]
    boxes: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    landmarks: dict[str, tuple[float, float]] = field(default_factory=dict)
    masks_file: str | None = None

    @property
    def path(self) -> Path:
        """The DICOM file."""
        return self.folder / self.file

    @property
    def findings(self) -> set[str]:
        """Names of the findings present."""
        return {name for name, present in self.labels.items() if present}

    def boxes_of(self, finding: str) -> list[tuple[int, int, int, int]]:
        """The boxes of ``finding`` (row0, col0, row1, col1), half-open source pixels."""
        return [box for name, box in self.boxes if name == finding]

    def dataset(self) -> pydicom.Dataset:
        """The DICOM dataset, read from disk."""
        return pydicom.dcmread(self.path)

    def masks(self) -> dict[str, np.ndarray]:
        """Boolean masks by name and "soft_tissue" (stored values), read from the npz file."""
        if self.masks_file is None:
            return {}
        with np.load(self.folder / self.masks_file) as archive:
            return {name: archive[name] for name in archive.files}


def record_json(
    file: str, ds: pydicom.Dataset, truth: CxrTruth, masks_file: str | None
) -> dict[str, object]:
    """The ``ground_truth.jsonl`` object of one image."""
    return {
        "file": file,
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "study_instance_uid": str(ds.StudyInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "view": truth.view,
        "modality": str(ds.Modality),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "labels": {name: int(bool(truth.labels.get(name, False))) for name in FINDINGS},
        "boxes": [{"finding": name, "box": list(box)} for name, box in truth.boxes],
        "landmarks": {
            name: [round(v, 2) for v in point] for name, point in truth.landmarks.items()
        },
        "masks": masks_file,
    }


def save_masks(path: Path, truth: CxrTruth) -> None:
    """Write the truth's masks and soft-tissue image as a compressed npz file."""
    arrays: dict[str, np.ndarray] = {name: mask.astype(bool) for name, mask in truth.masks.items()}
    if truth.soft_tissue is not None:
        arrays["soft_tissue"] = truth.soft_tissue
    path.parent.mkdir(parents=True, exist_ok=True)
    # What np.savez_compressed writes, at deflate level 1 rather than 6: the noisy soft-tissue
    # image compresses ~1 % worse but 2.5 times faster (its level 6 took a quarter of a
    # 512-pixel phantom's time); np.load reads either.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def read_truth(folder: Path | str) -> list[CxrRecord]:
    """The records of ``ground_truth.jsonl`` in ``folder``, in file order."""
    folder = Path(folder)
    records = []
    with (folder / JSONL_NAME).open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                records.append(
                    CxrRecord(
                        folder=folder,
                        file=item["file"],
                        sop_instance_uid=item["sop_instance_uid"],
                        study_instance_uid=item["study_instance_uid"],
                        series_instance_uid=item["series_instance_uid"],
                        view=item["view"],
                        modality=item["modality"],
                        rows=int(item["rows"]),
                        columns=int(item["columns"]),
                        labels={name: bool(v) for name, v in item["labels"].items()},
                        boxes=[
                            (b["finding"], tuple(int(v) for v in b["box"])) for b in item["boxes"]
                        ],
                        landmarks={
                            name: (float(p[0]), float(p[1]))
                            for name, p in item.get("landmarks", {}).items()
                        },
                        masks_file=item.get("masks"),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{folder / JSONL_NAME}:{number}: bad record ({exc})") from exc
    return records


def _exact_labels(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``round(n * fraction)`` true values in a random order."""
    labels = np.zeros(n, dtype=bool)
    labels[: round(n * fraction)] = True
    rng.shuffle(labels)
    return labels


def plan_findings(
    n: int,
    seed: int,
    findings: Collection[str],
    prevalence: Mapping[str, float],
) -> list[set[str]]:
    """Per image, the findings drawn: each finding present in exactly round(n * prevalence)
    images, independently shuffled (deterministic for ``seed``)."""
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; known: {', '.join(FINDINGS)}")
    plan: list[set[str]] = [set() for _ in range(n)]
    for index, finding in enumerate(FINDINGS):
        if finding not in findings:
            continue
        fraction = float(prevalence.get(finding, 0.5))
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"prevalence of {finding} must be in 0..1, got {fraction}")
        # The pneumothorax keeps the original writer's stream, so old data sets stay the same.
        rng = np.random.default_rng([seed, 99] if finding == "pneumothorax" else [seed, 99, index])
        for image, present in enumerate(_exact_labels(n, fraction, rng)):
            if present:
                plan[image].add(finding)
    return plan


def _progress(iterable: range, enabled: bool, out: Path) -> Iterator[int]:
    if not enabled:
        return iter(iterable)
    from tqdm import tqdm

    return iter(tqdm(iterable, desc=f"phantoms -> {out}", unit="img"))


def write_dataset(
    out: Path,
    n: int,
    seed: int,
    pneumothorax_fraction: float = 0.5,
    size: int = 512,
    progress: bool = False,
    *,
    findings: Collection[str] = ("pneumothorax",),
    prevalence: float | Mapping[str, float] | None = None,
    views: Collection[str] = ("PA",),
    modality: str = "DX",
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    columns: int | None = None,
    transfer_syntax: str = "explicit",
    masks: bool = True,
) -> Path:
    """Write ``n`` phantoms (seeds ``seed``..``seed+n-1``) and their ground truth; return the CSV.

    Each of ``findings`` appears in exactly round(n * prevalence) images (``prevalence`` one
    number or per finding; the pneumothorax defaults to ``pneumothorax_fraction``, others to
    0.5). Views are spread evenly over ``views``; ``photometric`` "mixed" alternates
    MONOCHROME1 and MONOCHROME2 at random.
    """
    if not 0.0 <= pneumothorax_fraction <= 1.0:
        raise ValueError(f"pneumothorax_fraction must be in 0..1, got {pneumothorax_fraction}")
    views = tuple(views)
    if not views or set(views) - set(VIEWS):
        raise ValueError(f"views must be among {', '.join(VIEWS)}, got {views}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "mixed"):
        raise ValueError(
            f"photometric must be MONOCHROME1, MONOCHROME2 or mixed, not {photometric!r}"
        )
    rates: dict[str, float] = {"pneumothorax": pneumothorax_fraction}
    if isinstance(prevalence, int | float):
        rates.update(dict.fromkeys(FINDINGS, float(prevalence)))
    elif prevalence is not None:
        rates.update({name: float(value) for name, value in prevalence.items()})
    plan = plan_findings(n, seed, findings, rates)
    view_of = np.resize(np.array(views), n)
    np.random.default_rng([seed, 98]).shuffle(view_of)
    inverted = _exact_labels(n, 0.5, np.random.default_rng([seed, 97]))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / CSV_NAME
    with csv_path.open("w", newline="") as csv_handle, (out / JSONL_NAME).open("w") as jsonl:
        writer = csv.writer(csv_handle)
        writer.writerow(CSV_COLUMNS)
        for index in _progress(range(n), progress, out):
            image_seed = seed + index
            if photometric == "mixed":
                polarity = "MONOCHROME1" if inverted[index] else "MONOCHROME2"
            else:
                polarity = photometric
            ds, truth = make_cxr(
                image_seed,
                findings=plan[index],
                view=str(view_of[index]),
                modality=modality,
                bits=bits,
                size=size,
                columns=columns,
                photometric=polarity,
                transfer_syntax=transfer_syntax,
            )
            name = f"cxr_{image_seed:08d}.dcm"
            ds.save_as(out / name, enforce_file_format=True)
            masks_file = None
            if masks:
                masks_file = f"{MASK_FOLDER}/cxr_{image_seed:08d}.npz"
                save_masks(out / masks_file, truth)
            box = " ".join(str(v) for v in truth.box) if truth.box else ""
            writer.writerow(
                [
                    name,
                    ds.SOPInstanceUID,
                    ds.StudyInstanceUID,
                    ds.PatientID,
                    int(truth.pneumothorax),
                    truth.side or "",
                    box,
                    truth.view,
                    ds.Modality,
                    " ".join(sorted(f for f, present in truth.labels.items() if present)),
                ]
            )
            jsonl.write(json.dumps(record_json(name, ds, truth, masks_file)) + "\n")
    return csv_path
