"""Synthetic chest CT series: valid CT Image Storage, consistent geometry, honest truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dciodvfy import dciodvfy_errors
from pydicom.pixels import apply_modality_lut

from dicomnode.cli.main import main
from dicomnode.synth.ct import (
    CT_IMAGE_STORAGE,
    make_ct_series,
    parse_range,
    read_truth,
    write_dataset,
)

SMALL = {"rows": 96, "slices": 20, "slice_thickness": 5.0}


@pytest.fixture(scope="module")
def series():
    return make_ct_series(7, rows=128, slices=32, slice_thickness=2.5, nodules=(3, 4))


def test_slices_are_valid_ct_images(series) -> None:
    datasets, _ = series
    assert all(ds.SOPClassUID == CT_IMAGE_STORAGE for ds in datasets)
    assert dciodvfy_errors(datasets[len(datasets) // 2]) == []
    ds = datasets[0]
    assert (ds.Modality, ds.BodyPartExamined, ds.RescaleType) == ("CT", "CHEST", "HU")
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (-600.0, 1500.0)
    assert len({d.SOPInstanceUID for d in datasets}) == len(datasets)
    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    assert [d.InstanceNumber for d in datasets] == list(range(1, len(datasets) + 1))


def test_image_plane_steps_along_z_by_the_spacing(series) -> None:
    datasets, truth = series
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    assert [float(v) for v in datasets[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert np.allclose(positions[:, :2], positions[0, :2])
    steps = np.diff(positions[:, 2])
    assert np.allclose(steps, 2.5, atol=1e-3)
    assert float(datasets[0].SliceThickness) == 2.5 == truth.slice_thickness_mm
    assert float(datasets[0].SpacingBetweenSlices) == 2.5 == truth.spacing_between_slices_mm
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    assert spacing[0] == spacing[1] == pytest.approx(truth.pixel_spacing_mm, abs=1e-4)
    assert truth.lung.shape == truth.nodule_labels.shape == (32, 128, 128)


def test_nodule_voxel_centre_matches_its_millimetres_and_its_mask(series) -> None:
    datasets, truth = series
    assert len(truth.nodules) >= 3
    origin = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    spacing = float(datasets[0].PixelSpacing[0])
    for nodule in truth.nodules:
        k, row, col = nodule.center_voxel
        x, y, z = nodule.center_mm
        assert x == pytest.approx(origin[0] + col * spacing, abs=0.01)
        assert y == pytest.approx(origin[1] + row * spacing, abs=0.01)
        assert z == pytest.approx(origin[2] + k * 2.5, abs=0.01)
        assert 3.0 <= nodule.diameter_mm <= 30.0
        voxels = np.argwhere(truth.nodule_labels == nodule.label)
        assert len(voxels) > 0
        centroid = voxels.mean(axis=0)
        # The mask's centroid is the nodule centre (edge nodules are clipped by the slab).
        if 2 < k < 29:
            assert abs(centroid[0] - k) < max(1.0, 0.25 * nodule.diameter_mm / 2.5)
        assert abs(centroid[1] - row) < max(1.0, 0.25 * nodule.diameter_mm / spacing)
        assert abs(centroid[2] - col) < max(1.0, 0.25 * nodule.diameter_mm / spacing)
        # Dense against the lung around it: the nodule is visible in the pixels.
        hu = apply_modality_lut(datasets[round(k)].pixel_array, datasets[round(k)])
        assert hu[round(row), round(col)] > -700


def test_hounsfield_units_of_lung_air_and_tissue(series) -> None:
    datasets, truth = series
    volume = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in datasets])
    lung = truth.lung & (truth.nodule_labels == 0)
    assert lung.mean() > 0.05
    assert -900 < np.median(volume[lung]) < -780
    assert np.median(volume[:, :4, :4]) == pytest.approx(-1000, abs=30)  # air at the corner
    assert np.percentile(volume, 99.9) > 300  # bone
    # Lung texture and vessels: not one flat value.
    assert volume[lung].std() > 25


def test_same_seed_same_series_and_different_seeds_differ() -> None:
    first, first_truth = make_ct_series(3, **SMALL)
    second, second_truth = make_ct_series(3, **SMALL)
    other, _ = make_ct_series(4, **SMALL)
    assert [d.PixelData for d in first] == [d.PixelData for d in second]
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in second]
    assert first_truth == second_truth
    assert np.array_equal(first_truth.lung, second_truth.lung)
    assert np.array_equal(first_truth.nodule_labels, second_truth.nodule_labels)
    assert first[0].PixelData != other[0].PixelData
    assert first[0].StudyInstanceUID != other[0].StudyInstanceUID


def test_low_dose_is_noisier_and_thickness_is_honoured() -> None:
    def air_noise(datasets) -> float:
        volume = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in datasets])
        return float(volume[:, :6, :].std())

    standard, standard_truth = make_ct_series(9, **SMALL)
    low, low_truth = make_ct_series(9, **SMALL, dose="low")
    assert low_truth.noise_hu > 2 * standard_truth.noise_hu
    assert air_noise(low) > 2 * air_noise(standard)
    thin, thin_truth = make_ct_series(9, rows=96, slices=8, slice_thickness=1.25, noise_hu=0.0)
    assert float(thin[0].SliceThickness) == 1.25 and thin_truth.noise_hu == 0.0
    assert air_noise(thin) < 3


def test_nodule_count_and_size_options() -> None:
    _, none = make_ct_series(2, **SMALL, nodules=(0, 0))
    assert none.nodules == () and not none.nodule_labels.any()
    _, big = make_ct_series(
        2, rows=96, slices=40, slice_thickness=5.0, nodules=(3, 3), nodule_diameter_mm=(15, 20)
    )
    assert len(big.nodules) == 3
    assert all(15 <= n.diameter_mm <= 20 for n in big.nodules)
    assert parse_range("2..5", int) == (2, 5) and parse_range("4", float) == (4.0, 4.0)
    with pytest.raises(ValueError):
        make_ct_series(2, **SMALL, nodules=(3, 1))


def test_write_and_read_truth(tmp_path: Path) -> None:
    jsonl = write_dataset(tmp_path, 2, 11, **SMALL)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["series_dir"] for line in lines] == ["ct_00000011", "ct_00000012"]
    assert set(lines[0]) >= {
        "series_dir",
        "study_instance_uid",
        "series_instance_uid",
        "slice_thickness_mm",
        "pixel_spacing_mm",
        "noise_hu",
        "nodules",
        "masks",
    }
    records = read_truth(tmp_path)
    assert len(records) == 2
    record = records[0]
    assert len(record.slice_paths()) == 20
    lung, labels = record.load_masks()
    assert lung.shape == labels.shape == (20, 96, 96) and lung.dtype == bool
    for nodule in record.nodules:
        assert (labels == nodule.label).any()


def test_cli_writes_a_ct_data_set(tmp_path: Path) -> None:
    code = main(
        [
            "synth",
            "ct",
            "--n",
            "1",
            "--out",
            str(tmp_path),
            "--seed",
            "21",
            "--rows",
            "80",
            "--slices",
            "6",
            "--slice-thickness",
            "5",
            "--nodules",
            "0..1",
            "--dose",
            "low",
        ]
    )
    assert code == 0
    (record,) = read_truth(tmp_path)
    assert record.rows == 80 and record.slices == 6 and record.slice_thickness_mm == 5.0
    assert len(record.slice_paths()) == 6
