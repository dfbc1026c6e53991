"""Synthetic chest phantoms: deterministic, valid DX For Presentation, honest ground truth."""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.pipeline.preprocess import presentation_pixels
from dicomnode.synth.cxr import DX_FOR_PRESENTATION, CxrTruth, make_cxr, write_dataset

DCIODVFY = Path("/usr/bin/dciodvfy")


def _dciodvfy_errors(ds: pydicom.Dataset, folder: Path) -> list[str]:
    if not DCIODVFY.is_file():
        pytest.skip("dciodvfy not found at /usr/bin/dciodvfy: install the Debian dicom3tools")
    path = folder / "phantom.dcm"
    ds.save_as(path, enforce_file_format=True)
    completed = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (completed.stdout + completed.stderr).splitlines() if "Error" in line]


def test_same_seed_gives_the_same_phantom() -> None:
    first, first_truth = make_cxr(11, pneumothorax=True, size=256)
    second, second_truth = make_cxr(11, pneumothorax=True, size=256)
    assert first.PixelData == second.PixelData
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first_truth == second_truth
    assert np.array_equal(first_truth.lung_mask, second_truth.lung_mask)


def test_different_seeds_differ() -> None:
    first, _ = make_cxr(1, pneumothorax=False, size=256)
    second, _ = make_cxr(2, pneumothorax=False, size=256)
    assert first.PixelData != second.PixelData
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.PatientID != second.PatientID


def test_identifiers_can_be_given() -> None:
    ds, _ = make_cxr(
        5,
        pneumothorax=False,
        size=128,
        patient_id="P1",
        accession_number="A1",
        study_instance_uid="1.2.3.4",
    )
    assert (ds.PatientID, ds.AccessionNumber, ds.StudyInstanceUID) == ("P1", "A1", "1.2.3.4")
    assert ds.SeriesInstanceUID != make_cxr(5, pneumothorax=False, size=128)[0].SeriesInstanceUID


def test_dx_attributes() -> None:
    ds, _ = make_cxr(3, pneumothorax=False, size=256)
    assert ds.SOPClassUID == DX_FOR_PRESENTATION
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("DX", "CHEST", "PA")
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.pixel_array.shape == (256, 256)
    assert int(ds.pixel_array.max()) <= 4095


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("pneumothorax", [False, True])
def test_dciodvfy_reports_no_errors(photometric: str, pneumothorax: bool, tmp_path: Path) -> None:
    ds, _ = make_cxr(21, pneumothorax=pneumothorax, size=256, photometric=photometric)
    assert _dciodvfy_errors(ds, tmp_path) == []


def test_pneumothorax_truth_lies_in_the_named_hemithorax() -> None:
    for seed in range(30, 36):
        _, truth = make_cxr(seed, pneumothorax=True, size=256)
        assert truth.pneumothorax and truth.side in ("L", "R") and truth.box is not None
        row0, col0, row1, col1 = truth.box
        assert 0 <= row0 < row1 <= 256 and 0 <= col0 < col1 <= 256
        centre_col = (col0 + col1) / 2
        # PA view read facing the patient: the patient's right is the image's left.
        assert (centre_col < 128) == (truth.side == "R")
    _, negative = make_cxr(30, pneumothorax=False, size=256)
    assert negative == CxrTruth(pneumothorax=False)


def test_global_brightness_does_not_give_the_label_away() -> None:
    means = {True: [], False: []}
    for seed in range(200, 240):
        positive = seed % 2 == 1
        ds, _ = make_cxr(seed, pneumothorax=positive, size=128)
        means[positive].append(float(presentation_pixels(ds).mean()))
    pos, neg = np.array(means[True]), np.array(means[False])
    auc = float((pos[:, None] > neg[None, :]).mean())
    assert 0.25 < auc < 0.75, f"mean brightness separates the classes (AUC {auc:.2f})"


def test_a_512_pixel_phantom_is_fast() -> None:
    make_cxr(0, pneumothorax=True)  # warm-up
    started = time.perf_counter()
    for seed in range(3):
        make_cxr(seed, pneumothorax=bool(seed % 2))
    assert (time.perf_counter() - started) / 3 < 0.5


def test_write_dataset(tmp_path: Path) -> None:
    csv_path = write_dataset(
        tmp_path / "phantoms", n=6, seed=40, pneumothorax_fraction=0.5, size=128
    )
    rows = list(csv.DictReader(csv_path.open()))
    files = sorted((tmp_path / "phantoms").glob("*.dcm"))
    assert len(files) == len(rows) == 6
    assert sum(int(row["pneumothorax"]) for row in rows) == 3
    for row in rows:
        ds = pydicom.dcmread(tmp_path / "phantoms" / row["file"])
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.StudyInstanceUID == row["study_instance_uid"]
        assert ds.PatientID == row["patient_id"]
        if row["pneumothorax"] == "1":
            assert row["side"] in ("L", "R") and len(row["box"].split()) == 4
        else:
            assert row["side"] == "" and row["box"] == ""


def test_synth_cxr_command_writes_files_and_ground_truth(tmp_path: Path) -> None:
    import csv
    import subprocess
    import sys

    out = tmp_path / "cxr"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomnode",
            "synth",
            "cxr",
            "--n",
            "4",
            "--out",
            str(out),
            "--seed",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((out / "ground_truth.csv").open()))
    assert len(rows) == 4
    assert sum(int(row["pneumothorax"]) for row in rows) == 2
    for row in rows:
        assert (out / row["file"]).is_file()
