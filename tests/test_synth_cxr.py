"""Synthetic chest phantoms: deterministic, valid DX For Presentation, honest ground truth."""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.pipeline.presentation_values import presentation_pixels
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


# --- views, modalities, encodings, findings and ground-truth files ---------------------------

# A covering set of (view, modality, bits, photometric, transfer syntax).
COMBINATIONS = [
    ("PA", "DX", 12, "MONOCHROME2", "explicit"),
    ("PA", "CR", 8, "MONOCHROME1", "jpeg-baseline"),
    ("PA", "DX", 16, "MONOCHROME1", "jpeg2000"),
    ("AP", "DX", 8, "MONOCHROME2", "jpeg-baseline"),
    ("AP", "CR", 10, "MONOCHROME2", "explicit"),
    ("AP", "DX", 14, "MONOCHROME1", "jpeg2000"),
    ("LATERAL", "DX", 9, "MONOCHROME1", "explicit"),
    ("LATERAL", "CR", 16, "MONOCHROME2", "jpeg2000"),
    ("LATERAL", "DX", 8, "MONOCHROME2", "jpeg-baseline"),
    ("LATERAL", "CR", 12, "MONOCHROME1", "explicit"),
]


@pytest.mark.parametrize(("view", "modality", "bits", "photometric", "syntax"), COMBINATIONS)
def test_each_acquisition_is_valid_dicom_that_decodes(
    view: str, modality: str, bits: int, photometric: str, syntax: str, tmp_path: Path
) -> None:
    from dciodvfy import dciodvfy_errors

    from dicomnode.synth.cxr import CR_IMAGE, FINDINGS, TRANSFER_SYNTAXES

    acquisition = {
        "findings": FINDINGS,
        "view": view,
        "modality": modality,
        "bits": bits,
        "photometric": photometric,
        "size": 160,
        "columns": 128 if view == "LATERAL" else None,
    }
    ds, truth = make_cxr(17, transfer_syntax=syntax, **acquisition)
    assert dciodvfy_errors(ds) == []
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    assert back.SOPClassUID == (DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE)
    assert (back.BitsStored, back.BitsAllocated) == (bits, 8 if bits == 8 else 16)
    assert back.PhotometricInterpretation == photometric
    pixels = back.pixel_array
    assert pixels.shape == (truth.masks["lung"].shape) == (160, 128 if view == "LATERAL" else 160)
    assert int(pixels.max()) < 2**bits and float(pixels.std()) > 0.02 * 2**bits
    # The lossless syntaxes give back the stored values; JPEG baseline is close.
    reference = make_cxr(17, **acquisition)[0].pixel_array.astype(float)
    error = np.abs(pixels.astype(float) - reference)
    if syntax == "jpeg-baseline":
        assert back.LossyImageCompression == "01" and error.mean() < 3
    else:
        assert error.max() == 0
    assert back.ViewPosition == {"PA": "PA", "AP": "AP", "LATERAL": "LL"}[view]


def test_jpeg_baseline_needs_8_bits() -> None:
    with pytest.raises(ValueError, match="8-bit samples only"):
        make_cxr(1, size=96, bits=12, transfer_syntax="jpeg-baseline")
    with pytest.raises(ValueError, match=r"8\.\.16"):
        make_cxr(1, size=96, bits=7)


def test_findings_and_views_are_deterministic() -> None:
    from dicomnode.synth.cxr import FINDINGS

    for view in ("PA", "AP", "LATERAL"):
        first, first_truth = make_cxr(8, findings=FINDINGS, view=view, size=128)
        second, second_truth = make_cxr(8, findings=FINDINGS, view=view, size=128)
        assert first.PixelData == second.PixelData
        assert first_truth == second_truth
        assert first_truth.boxes and "tube_tip" in first_truth.landmarks
        for name, mask in first_truth.masks.items():
            assert np.array_equal(mask, second_truth.masks[name]), name
        assert np.array_equal(first_truth.soft_tissue, second_truth.soft_tissue)
        other, _ = make_cxr(9, findings=FINDINGS, view=view, size=128)
        assert other.PixelData != first.PixelData


PAINTED = ("effusion", "consolidation", "edema", "nodule", "tuberculosis", "tube")


@pytest.mark.parametrize("view", ["PA", "AP", "LATERAL"])
@pytest.mark.parametrize("finding", PAINTED)
def test_a_finding_changes_the_image_where_its_mask_says(view: str, finding: str) -> None:
    changed_inside, textures = [], []
    for seed in (3, 4):
        plain, plain_truth = make_cxr(seed, view=view, size=192)
        ds, truth = make_cxr(seed, findings=[finding], view=view, size=192)
        assert truth.labels[finding] and not plain_truth.labels[finding]
        assert sum(truth.labels.values()) == 1
        mask = truth.masks[finding]
        assert mask.shape == (192, 192) and mask.dtype == bool and mask.any()
        diff = np.abs(ds.pixel_array.astype(float) - plain.pixel_array.astype(float))
        # Everything the finding changed lies in (or just around) its region.
        near = mask.copy()
        for _ in range(6):
            near = near | np.roll(near, 1, 0) | np.roll(near, -1, 0)
            near = near | np.roll(near, 1, 1) | np.roll(near, -1, 1)
        assert diff[~near].mean() < 0.5, f"{finding} changed the image outside its mask"
        changed_inside.append(diff[mask].mean())
        textures.append(ds.pixel_array[mask].std())
        if finding in ("nodule", "consolidation", "tuberculosis"):
            assert any(name == finding for name, _ in truth.boxes)
            for name, (row0, col0, row1, col1) in truth.boxes:
                assert mask[row0:row1, col0:col1].any(), name
        if finding == "tube":
            row, col = truth.landmarks["tube_tip"]
            assert 0 <= row < 192 and 0 <= col < 192
            assert mask[
                max(int(row) - 3, 0) : int(row) + 4, max(int(col) - 3, 0) : int(col) + 4
            ].any()
    assert np.mean(changed_inside) > 8, f"{finding}: mean change {np.mean(changed_inside):.1f}"
    assert min(textures) > 2, f"{finding} is a flat patch"


def test_cardiomegaly_has_a_cardiothoracic_ratio_above_one_half() -> None:
    def ratio(truth: CxrTruth) -> float:
        heart_cols = np.flatnonzero(truth.masks["heart"].any(axis=0))
        lung_cols = np.flatnonzero(truth.masks["lung"].any(axis=0))
        return (heart_cols[-1] - heart_cols[0]) / (lung_cols[-1] - lung_cols[0])

    normal = [ratio(make_cxr(seed, size=128)[1]) for seed in range(6)]
    big = [ratio(make_cxr(seed, findings=["cardiomegaly"], size=128)[1]) for seed in range(6)]
    assert max(normal) < 0.5 < min(big)
    _, truth = make_cxr(0, findings=["cardiomegaly"], size=128)
    assert np.array_equal(truth.masks["cardiomegaly"], truth.masks["heart"])


def test_lateral_view_has_its_own_shape() -> None:
    for seed in range(3):
        _, pa = make_cxr(seed, size=128)
        lateral_ds, lateral = make_cxr(seed, view="LATERAL", size=128)
        middle = slice(40, 80)
        # PA: two lungs either side of the mediastinum; lateral: one lung field across the middle.
        assert not pa.masks["lung"][middle, 62:66].any()
        assert lateral.masks["lung"][30:62, 60:68].mean() > 0.8
        assert lateral_ds.PatientOrientation == ["P", "F"]
        # The spine lies behind (image right): bones dominate the right third's difference.
        bones = lateral_ds.pixel_array.astype(float) - lateral.soft_tissue.astype(float)
        assert bones[:, 85:].mean() > 2 * bones[:, :42].mean()


def test_soft_tissue_image_lacks_only_the_bones() -> None:
    for view in ("PA", "AP", "LATERAL"):
        ds, truth = make_cxr(6, view=view, size=128, photometric="MONOCHROME1")
        pixels = ds.pixel_array.astype(int)
        soft = truth.soft_tissue.astype(int)
        assert soft.shape == pixels.shape
        # MONOCHROME1: bone is dark (low values); removing it raises them.
        assert (soft - pixels).mean() > 2
        assert np.array_equal(soft[:4, :4], pixels[:4, :4])  # air outside the body


def test_random_findings() -> None:
    from dicomnode.synth.cxr import FINDINGS, random_findings

    rng = np.random.default_rng(0)
    draws = [random_findings(rng, 0.3) for _ in range(400)]
    rates = {f: np.mean([f in d for d in draws]) for f in FINDINGS}
    assert all(0.2 < rate < 0.4 for rate in rates.values()), rates
    assert random_findings(rng, {"nodule": 1.0}) == {"nodule"}
    assert random_findings(rng, 0.0) == set()
    with pytest.raises(ValueError):
        random_findings(rng, {"nodule": 2.0})


def test_ground_truth_files_are_written_and_read_back(tmp_path: Path) -> None:
    import json

    from dicomnode.synth.cxr import FINDINGS
    from dicomnode.synth.truth import read_truth

    write_dataset(
        tmp_path,
        n=6,
        seed=70,
        size=96,
        findings=FINDINGS,
        prevalence=0.5,
        views=("PA", "AP", "LATERAL"),
        photometric="mixed",
    )
    records = read_truth(tmp_path)
    lines = (tmp_path / "ground_truth.jsonl").read_text().splitlines()
    assert len(records) == len(lines) == 6
    assert sorted(r.view for r in records) == ["AP", "AP", "LATERAL", "LATERAL", "PA", "PA"]
    for finding in FINDINGS:
        assert sum(r.labels[finding] for r in records) == 3
    rows = {row["file"]: row for row in csv.DictReader((tmp_path / "ground_truth.csv").open())}
    for record, line in zip(records, lines, strict=True):
        item = json.loads(line)
        assert set(item) == {
            "file", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "view",
            "modality", "rows", "columns", "labels", "boxes", "landmarks", "masks",
        }  # fmt: skip
        ds = record.dataset()
        assert ds.SOPInstanceUID == record.sop_instance_uid == rows[record.file]["sop_instance_uid"]
        assert ds.SeriesInstanceUID == record.series_instance_uid
        assert int(rows[record.file]["pneumothorax"]) == record.labels["pneumothorax"]
        masks = record.masks()
        assert masks["lung"].shape == (record.rows, record.columns) and masks["lung"].any()
        assert masks["soft_tissue"].shape == ds.pixel_array.shape
        for finding in record.findings - {"cardiomegaly"}:
            assert masks[finding].any(), finding
        for finding, (row0, col0, row1, col1) in record.boxes:
            assert 0 <= row0 < row1 <= record.rows and 0 <= col0 < col1 <= record.columns
            assert record.labels[finding]
        assert record.labels["nodule"] == bool(record.boxes_of("nodule"))
        assert ("tube_tip" in record.landmarks) == record.labels["tube"]
        # make_cxr gives the same image in-process.
        again, truth = make_cxr(
            int(record.file[4:12]),
            findings=record.findings,
            view=record.view,
            size=96,
            photometric=ds.PhotometricInterpretation,
        )
        assert again.PixelData == ds.PixelData
        # ... and the masks file holds its truth exactly.
        assert set(masks) == {*truth.masks, "soft_tissue"}
        assert np.array_equal(masks["soft_tissue"], truth.soft_tissue)
        assert all(np.array_equal(masks[name], truth.masks[name]) for name in truth.masks)


def test_non_square_and_3000_pixel_phantoms() -> None:
    ds, truth = make_cxr(2, size=160, columns=128, findings=["nodule", "tube"])
    assert ds.pixel_array.shape == (160, 128) and truth.masks["nodule"].shape == (160, 128)
    started = time.perf_counter()
    big, big_truth = make_cxr(2, size=3000, findings=["nodule", "effusion"], view="AP")
    elapsed = time.perf_counter() - started
    assert big.pixel_array.shape == (3000, 3000) and big_truth.masks["lung"].shape == (3000, 3000)
    assert float(big.ImagerPixelSpacing[0]) == pytest.approx(430 / 3000, rel=1e-4)
    assert elapsed < 60


def test_a_256_pixel_phantom_with_findings_is_fast() -> None:
    from dicomnode.synth.cxr import FINDINGS

    make_cxr(0, size=256)
    started = time.perf_counter()
    for seed in range(10):
        make_cxr(seed, size=256, findings=FINDINGS[seed % len(FINDINGS) :][:2])
    # About 30 ms on an idle core; the bound leaves room for a loaded shared machine.
    assert (time.perf_counter() - started) / 10 < 0.2


def test_synth_cxr_command_with_options(tmp_path: Path) -> None:
    import sys

    from dicomnode.synth.truth import read_truth

    out = tmp_path / "cxr"
    command = [sys.executable, "-m", "dicomnode", "synth", "cxr", "--n", "3", "--out", str(out)]
    options = [
        "--seed", "11", "--views", "PA,LATERAL", "--modality", "CR", "--bits", "8",
        "--transfer-syntax", "jpeg-baseline", "--findings", "nodule,tube", "--prevalence",
        "nodule=1,tube=0", "--size", "96", "--columns", "80", "--photometric", "mixed",
    ]  # fmt: skip
    result = subprocess.run(command + options, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = read_truth(out)
    assert len(records) == 3 and {r.view for r in records} == {"PA", "LATERAL"}
    assert all(r.labels["nodule"] and not r.labels["tube"] for r in records)
    for record in records:
        ds = record.dataset()
        assert ds.Modality == "CR" and ds.pixel_array.shape == (96, 80)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    bad = subprocess.run(
        [*command, "--bits", "12", "--transfer-syntax", "jpeg-baseline"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "8-bit samples only" in bad.stderr
