"""Synthetic evaluation data on disk: a folder written by ``dicomnode synth cxr`` or
``dicomnode synth ct`` (or a folder of such folders), as cases with their ground truth.

A case is what the node analyses together: one chest X-ray image, or one CT series (its slices
in file order, which is slice order). Truth is looked up by SOP Instance UID.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom

from dicomnode.synth import ct as synth_ct
from dicomnode.synth import truth as synth_truth

JSONL = "ground_truth.jsonl"
# Findings that make a chest X-ray "abnormal" (a tube or catheter is not a finding).
NOT_ABNORMAL = frozenset({"tube"})

Kind = Literal["cxr", "ct"]


@dataclass(frozen=True)
class Case:
    """One unit of analysis: a CXR image (``cxr`` set) or a CT series (``ct`` set)."""

    key: str  # SOP Instance UID (CXR) or Series Instance UID (CT)
    paths: tuple[Path, ...]
    cxr: synth_truth.CxrRecord | None = None
    ct: synth_ct.CtRecord | None = None


@dataclass
class EvalData:
    """The cases of an evaluation data set and what kind of data they are."""

    kind: Kind
    folder: Path
    cases: list[Case] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return sum(len(case.paths) for case in self.cases)


def _parts(folder: Path) -> list[Path]:
    """The data-set folders: ``folder`` itself, or its sub-folders holding ground truth."""
    if (folder / JSONL).is_file():
        return [folder]
    parts = sorted(p for p in folder.iterdir() if (p / JSONL).is_file()) if folder.is_dir() else []
    if not parts:
        raise FileNotFoundError(
            f"{folder}: no {JSONL} here or in its sub-folders; expected a folder written by "
            "'dicomnode synth cxr' or 'dicomnode synth ct'"
        )
    return parts


def _kind_of(part: Path) -> Kind:
    with (part / JSONL).open() as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if "series_dir" in record:
                    return "ct"
                if "file" in record and "labels" in record:
                    return "cxr"
                raise ValueError(f"{part / JSONL}: neither a CXR nor a CT ground-truth record")
    raise ValueError(f"{part / JSONL} is empty")


def load_data(folder: Path | str) -> EvalData:
    """Read the ground truth of a synthetic data set (one kind of data only)."""
    folder = Path(folder)
    parts = _parts(folder)
    kinds = {part: _kind_of(part) for part in parts}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"{folder}: mixes CXR and CT data sets ({sorted(set(kinds.values()))})")
    kind = next(iter(kinds.values()))
    data = EvalData(kind=kind, folder=folder)
    for part in parts:
        if kind == "cxr":
            for record in synth_truth.read_truth(part):
                data.cases.append(Case(record.sop_instance_uid, (record.path,), cxr=record))
        else:
            for record in synth_ct.read_truth(part):
                paths = tuple(record.slice_paths())
                if not paths:
                    raise FileNotFoundError(f"{record.folder}: no slices (*.dcm)")
                data.cases.append(Case(record.series_instance_uid, paths, ct=record))
    return data


def read_images(case: Case) -> list[pydicom.Dataset]:
    """The case's DICOM data sets, in file order; checks they are the ones the truth names."""
    images = [pydicom.dcmread(path) for path in case.paths]
    if case.cxr is not None and str(images[0].SOPInstanceUID) != case.key:
        raise ValueError(
            f"{case.paths[0]}: SOP Instance UID {images[0].SOPInstanceUID} is not the "
            f"{case.key} of the ground truth"
        )
    if case.ct is not None:
        wrong = [
            p for p, ds in zip(case.paths, images, strict=True) if ds.SeriesInstanceUID != case.key
        ]
        if wrong:
            raise ValueError(f"{wrong[0]}: not in series {case.key} of the ground truth")
    return images


def batches(cases: list[Case], size: int) -> Iterator[list[Case]]:
    """Cases in groups of at most ``size`` (CT series always one at a time)."""
    step = 1 if any(case.ct is not None for case in cases) else max(1, size)
    for start in range(0, len(cases), step):
        yield cases[start : start + step]


def label_truth(record: synth_truth.CxrRecord, key: str) -> bool:
    """Whether a CXR has what a card label's ``truth`` key names: a finding ("pneumothorax"),
    "abnormal" (any finding but a tube), "view:PA", or a landmark ("tube_tip")."""
    if key == "abnormal":
        return any(present for name, present in record.labels.items() if name not in NOT_ABNORMAL)
    if key.startswith("view:"):
        return record.view.upper() == key.partition(":")[2].upper()
    if key in record.labels:
        return bool(record.labels[key])
    if key == "tube_tip":
        return key in record.landmarks
    raise KeyError(
        f"truth key {key!r} is not in the CXR ground truth (findings "
        f"{', '.join(sorted(record.labels))}, 'abnormal', 'view:PA|AP|LATERAL', 'tube_tip')"
    )


def cxr_mask(record: synth_truth.CxrRecord, key: str) -> np.ndarray:
    """A CXR truth mask ("lung", "heart", a finding region) as booleans (rows x columns)."""
    masks = record.masks()
    if key in masks:
        return np.asarray(masks[key], dtype=bool)
    if key in record.labels and not record.labels[key]:
        return np.zeros((record.rows, record.columns), dtype=bool)
    raise KeyError(f"{record.folder / (record.masks_file or '?')}: no mask {key!r}")


def ct_mask(record: synth_ct.CtRecord, key: str) -> np.ndarray:
    """A CT truth mask, (slices, rows, cols) in file order: "lung" or "nodule"/"nodules"."""
    lung, nodules = record.load_masks()
    if key == "lung":
        return lung
    if key in ("nodule", "nodules"):
        return nodules > 0
    raise KeyError(f"truth key {key!r}: CT ground truth has masks 'lung' and 'nodule'")


def pixel_spacing_mm(ds: pydicom.Dataset) -> tuple[float, float]:
    """Row and column spacing in mm (PixelSpacing, else ImagerPixelSpacing)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing:
        raise ValueError(f"SOP Instance {ds.get('SOPInstanceUID', '?')} has no pixel spacing")
    return float(spacing[0]), float(spacing[1])
