"""A series split into stacks of one geometry before 2.5D stacking and SEG (a localiser or an
image of another orientation or size never joins the axial volume), 2.5D neighbours chosen by
distance at the stack's nominal spacing (gaps of missing slices, duplicate positions), with the
real CT demo models and dciodvfy on what they produce."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dciodvfy import dciodvfy_errors
from pydicom.uid import generate_uid

from dicomnode.config import InferenceSettings
from dicomnode.findings import CodedConcept, Finding, ImageFindings
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline.analyse import StageTimes
from dicomnode.pipeline.outputs import result_objects
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.series import stacks_in_order
from dicomnode.pipeline.tasks import merge_across_slices, run_model
from dicomnode.synth.ct import make_ct_series

MODELS = Path(__file__).resolve().parents[1] / "models"
SPACING = 2.5


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"], InferenceSettings(intra_op_threads=1))


@pytest.fixture(scope="module")
def nodule_card() -> ModelCard:
    return load_card(MODELS / "ct_nodule_demo.toml")


@pytest.fixture(scope="module")
def lung_card() -> ModelCard:
    return load_card(MODELS / "ct_lung_seg_demo.toml")


def _axial(slices: int = 12, rows: int = 64, seed: int = 3) -> list[pydicom.Dataset]:
    images, _ = make_ct_series(
        seed, rows=rows, slices=slices, slice_thickness=SPACING, nodules=(0, 0)
    )
    for ds in images:
        ds.BodyPartExamined = "CHEST"
    return images


def _copy(ds: pydicom.Dataset, instance_number: int) -> pydicom.Dataset:
    other = copy.deepcopy(ds)
    other.SOPInstanceUID = generate_uid()
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    other.InstanceNumber = instance_number
    return other


def _localiser(ds: pydicom.Dataset, columns: int) -> pydicom.Dataset:
    """A coronal LOCALIZER of the same series (and frame of reference) as the axial ``ds``,
    at slice position 0 (inside the axial volume's range when sorted along its normal)."""
    localiser = _copy(ds, 1)
    localiser.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localiser.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    localiser.ImagePositionPatient = [-200, 0, 200]
    localiser.Rows, localiser.Columns = int(ds.Rows), columns
    projection = np.tile(np.linspace(500, 2500, columns), (int(ds.Rows), 1)).astype(np.uint16)
    localiser.PixelData = projection.tobytes()
    return localiser


def _z(images: list[pydicom.Dataset]) -> list[float]:
    return [round(float(ds.ImagePositionPatient[2]), 2) for ds in images]


# --- splitting a series into stacks ------------------------------------------------------------


def test_localisers_of_the_same_and_another_size_stay_out_of_the_axial_stack() -> None:
    axial = _axial(slices=20, rows=160)
    same, wide = _localiser(axial[10], 160), _localiser(axial[4], 320)
    stacks, notes = stacks_in_order([same, *axial[::-1], wide])
    (stack,) = stacks
    assert [ds.SOPInstanceUID for ds in stack.images] == [ds.SOPInstanceUID for ds in axial]
    assert stack.volume and stack.spacing == pytest.approx(SPACING)
    (note,) = notes
    assert "21 images" not in note and "22 images" in note and "3 stacks" in note
    assert "axial 160x160 20 images" in note
    assert (
        "coronal 160x160 1 image (left out" in note and "coronal 160x320 1 image (left out" in note
    )
    assert str(axial[0].PatientName) not in note and str(axial[0].PatientID) not in note


def test_a_series_of_two_volumes_keeps_both_and_few_images_of_another_kind_stay() -> None:
    """Two volumes in one series (another frame of reference) are two stacks; a series whose
    stacks are all small (two localisers alone) keeps them, each on its own."""
    first = _axial(slices=6, seed=4)
    second = [_copy(ds, 100 + i) for i, ds in enumerate(_axial(slices=4, seed=4))]
    for ds in second:
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    stacks, _ = stacks_in_order(second + first)
    assert [len(stack) for stack in stacks] == [6, 4]
    assert {ds.FrameOfReferenceUID for ds in stacks[1].images} == {"1.2.826.0.1.3680043.8.498.1"}

    lateral = _localiser(first[0], 64)
    lateral.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    stacks, notes = stacks_in_order([_localiser(first[0], 64), lateral])
    assert [len(stack) for stack in stacks] == [1, 1] and "left out" not in notes[0]


def test_orientation_within_tolerance_is_one_stack() -> None:
    axial = _axial(slices=8)
    for index, ds in enumerate(axial):
        ds.ImageOrientationPatient = [1, 1e-4 * index, 0, 0, 1, -1e-4 * index]
    ((stack,), notes) = stacks_in_order(axial)
    assert len(stack) == 8 and notes == []


def test_radiographs_without_a_plane_are_ordered_by_instance_number_and_never_dropped() -> None:
    axial = _axial(slices=3)
    images = []
    for number, ds in zip((3, 1, 2), axial, strict=True):
        image = _copy(ds, number)
        image.Modality = "DX"  # a projection: its Image Plane attributes make no volume
        image.ImagePositionPatient = [0, 0, 0]
        images.append(image)
    ((stack,), notes) = stacks_in_order(images)
    assert not stack.volume and stack.spacing is None and notes == []
    assert [int(ds.InstanceNumber) for ds in stack.images] == [1, 2, 3]


# --- 2.5D neighbours by distance ---------------------------------------------------------------


def test_neighbours_are_at_the_nominal_spacing_across_gaps() -> None:
    axial = _axial(slices=12)
    centre_before_gap, centre_after_gap = _z([axial[5], axial[8]])
    del axial[6:8]  # two slices missing
    ((stack,), notes) = stacks_in_order(axial)
    assert stack.spacing == pytest.approx(SPACING)
    assert any("2 missing slice" in note for note in notes)
    z = _z(stack.images)
    before, after = z.index(centre_before_gap), z.index(centre_after_gap)
    # The side of the gap repeats the analysed slice (as the ends of the volume do); never the
    # slice 7.5 mm away.
    assert _z(stack.neighbours(before, 3)) == [
        centre_before_gap - SPACING,
        centre_before_gap,
        centre_before_gap,
    ]
    assert _z(stack.neighbours(after, 3)) == [
        centre_after_gap,
        centre_after_gap,
        centre_after_gap + SPACING,
    ]
    assert _z(stack.neighbours(before - 1, 5)) == [
        centre_before_gap - 3 * SPACING,
        centre_before_gap - 2 * SPACING,
        centre_before_gap - SPACING,
        centre_before_gap,
        centre_before_gap,
    ]
    # The ends as before (and as in training): the edge slice repeats.
    assert _z(stack.neighbours(0, 5)) == [z[0], z[0], z[0], z[1], z[2]]
    assert _z(stack.neighbours(1, 3)) == z[0:3]


def test_neighbours_tolerate_jittered_positions() -> None:
    axial = _axial(slices=8)
    jitter = [0.0, 0.2, -0.1, 0.1, -0.2, 0.15, 0.0, -0.1]  # mm, on 2.5 mm
    for ds, shift in zip(axial, jitter, strict=True):
        ds.ImagePositionPatient = [
            *ds.ImagePositionPatient[:2],
            float(ds.ImagePositionPatient[2]) + shift,
        ]
    ((stack,), _) = stacks_in_order(axial)
    for index in range(1, 7):
        assert stack.neighbours(index, 3) == stack.images[index - 1 : index + 2]


def test_duplicate_positions_keep_one_image_whatever_the_arrival_order() -> None:
    axial = _axial(slices=6)
    duplicate = _copy(axial[2], 50)
    for arrival in ([*axial, duplicate], [duplicate, *axial[::-1]]):
        ((stack,), notes) = stacks_in_order(arrival)
        assert [ds.SOPInstanceUID for ds in stack.images] == [ds.SOPInstanceUID for ds in axial]
        assert stack.spacing == pytest.approx(SPACING)
        (note,) = notes
        assert "1 image at a position already in the stack left out" in note


def test_slices_across_a_gap_are_not_merged_as_adjacent() -> None:
    axial = _axial(slices=6)
    del axial[2:4]
    ((stack,), _) = stacks_in_order(axial)
    assert stack.slots() == [0, 1, 4, 5]
    nodule = CodedConcept("786838002", "SCT", "Pulmonary nodule")
    # One box on each side of the gap (slices 1 and 4 of the scan, 7.5 mm apart).
    evaluations = [
        ImageFindings(
            ds,
            [Finding(nodule, 0.9 - 0.1 * i, 0.5, False, box=(10.0, 10.0, 20.0, 20.0))]
            if i in (1, 2)
            else [],
        )
        for i, ds in enumerate(stack.images)
    ]
    merged = merge_across_slices(evaluations, places=[(0, slot) for slot in stack.slots()])
    assert [len(e.findings) for e in merged] == [0, 1, 1, 0]
    # By index alone (no places) they would be one lesion.
    assert [len(e.findings) for e in merge_across_slices(evaluations)] == [0, 1, 0, 0]


# --- the CT demo models on a series with a localiser --------------------------------------------


def _series_with_localisers() -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    axial = _axial(slices=20, rows=160)
    localisers = [_localiser(axial[10], 160), _localiser(axial[4], 320)]
    return axial, [localisers[0], *axial, localisers[1]]


def test_lung_segmentation_of_a_series_with_localisers(lung_card, runtime, caplog) -> None:
    axial, images = _series_with_localisers()
    with caplog.at_level(logging.INFO, logger="dicomnode.pipeline"):
        run = run_model(lung_card, images, runtime, StageTimes())
    (segmentation,) = run.segmentations
    assert [ds.SOPInstanceUID for ds in segmentation.sources] == [ds.SOPInstanceUID for ds in axial]
    assert segmentation.segments[0].probabilities.shape == (20, 160, 160)
    (line,) = [r.getMessage() for r in caplog.records if "stacks" in r.getMessage()]
    assert line.startswith("ct-lung-seg-demo: series") and "axial 160x160 20 images" in line
    (seg,) = [ds for kind, ds in result_objects(run, lung_card) if kind == "seg"]
    assert int(seg.NumberOfFrames) >= 1
    referenced = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced <= {ds.SOPInstanceUID for ds in axial}
    assert dciodvfy_errors(seg) == []


def test_nodule_detection_of_a_series_with_localisers(nodule_card, runtime) -> None:
    axial, images = _series_with_localisers()
    run = run_model(nodule_card, images, runtime, StageTimes())
    assert [e.source.SOPInstanceUID for e in run.images] == [ds.SOPInstanceUID for ds in axial]
    # The same as on the axial slices alone: the localiser is no 2.5D channel.
    alone = run_model(nodule_card, list(axial), runtime, StageTimes())
    assert [[f.probability for f in e.findings] for e in run.images] == [
        [f.probability for f in e.findings] for e in alone.images
    ]
    localiser_uids = {images[0].SOPInstanceUID, images[-1].SOPInstanceUID}
    for kind, ds in result_objects(run, nodule_card):
        assert not any(uid in str(ds) for uid in localiser_uids), kind
