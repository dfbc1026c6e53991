"""A series split into stacks of one geometry and one scan before 2.5D stacking and SEG (a
localiser or an image of another orientation or size never joins the axial volume; contrast
phases of the same positions are stacks of their own), 2.5D neighbours chosen by distance at
the stack's nominal spacing (gaps of missing slices, duplicate positions), with the real CT
demo models and dciodvfy on what they produce."""

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
from dicomnode.pipeline.scans import acquired
from dicomnode.pipeline.select import image_plane, slice_normal
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


def test_merging_compares_a_box_with_every_higher_scoring_box_of_its_neighbours() -> None:
    """Many boxes, two concepts, two stacks: the same boxes are dropped as by comparing each
    with every higher-scoring box kept (the rule as the docstring states it)."""
    rng = np.random.default_rng(5)
    concepts = [CodedConcept("786838002", "SCT", "Pulmonary nodule"), CodedConcept("1", "X", "y")]
    places = [(stack, slot) for stack in (0, 1) for slot in (0, 1, 2, 4, 5, 6, 7)]
    evaluations = []
    for _ in places:
        findings = []
        for _ in range(int(rng.integers(0, 12))):
            col, row = rng.uniform(0, 40, 2)
            size = rng.uniform(2, 12)
            box = (col, row, col + size, row + size)
            concept = concepts[int(rng.integers(0, 2))]
            findings.append(Finding(concept, float(rng.uniform()), 0.5, False, box=box))
        evaluations.append(ImageFindings(None, findings))
    for max_gap in (1, 2):
        kept: list[tuple[int, Finding]] = []
        expected = [[] for _ in evaluations]
        ranked = sorted(
            (
                (f.probability, i, p)
                for i, e in enumerate(evaluations)
                for p, f in enumerate(e.findings)
            ),
            reverse=True,
        )
        for _, i, p in ranked:
            finding = evaluations[i].findings[p]
            col = (finding.box[0] + finding.box[2]) / 2
            row = (finding.box[1] + finding.box[3]) / 2
            if not any(
                o.concept == finding.concept
                and places[j][0] == places[i][0]
                and 0 < abs(places[j][1] - places[i][1]) <= max_gap
                and o.box[0] <= col <= o.box[2]
                and o.box[1] <= row <= o.box[3]
                for j, o in kept
            ):
                kept.append((i, finding))
                expected[i].append(p)
        merged = merge_across_slices(evaluations, max_gap, places)
        got = [
            [e.findings.index(f) for f in m.findings]
            for e, m in zip(evaluations, merged, strict=True)
        ]
        assert got == [sorted(positions) for positions in expected]
        assert 0 < sum(map(len, got)) < sum(len(e.findings) for e in evaluations)


# --- scans of the same positions (contrast phases, repeated acquisitions) ----------------------


def _second_scan(
    first: list[pydicom.Dataset], enhancement: int = 300, **labels: object
) -> list[pydicom.Dataset]:
    """The positions of ``first`` scanned again (another contrast: stored values raised by
    ``enhancement``), as new instances of the same series with Instance Numbers that interleave
    with the first scan's, and ``labels`` (e.g. AcquisitionNumber=2) set on every image."""
    second = []
    for index, ds in enumerate(first):
        image = _copy(ds, 2 * index + 2)
        image.PixelData = (ds.pixel_array.astype(np.uint16) + enhancement).tobytes()
        for keyword, value in labels.items():
            setattr(image, keyword, value)
        second.append(image)
    for index, ds in enumerate(first):
        ds.InstanceNumber = 2 * index + 1
    return second


def _uids(images: list[pydicom.Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in images}


SCAN_LABELS = {
    "acquisition number": ({}, {"AcquisitionNumber": 2}),
    "temporal position identifier": (
        {"TemporalPositionIdentifier": 1},
        {"TemporalPositionIdentifier": 2},
    ),
    "temporal position index": ({"TemporalPositionIndex": 1}, {"TemporalPositionIndex": 2}),
    # One Acquisition Number for both phases: the later Acquisition Time tells them apart.
    "acquisition time": ({"AcquisitionTime": "120000"}, {"AcquisitionTime": "120145.5"}),
}


@pytest.mark.parametrize("labels", SCAN_LABELS.values(), ids=SCAN_LABELS.keys())
def test_each_scan_of_the_same_positions_is_a_stack_of_its_own(labels) -> None:
    first = _axial(slices=8)
    for ds in first:
        for keyword, value in labels[0].items():
            setattr(ds, keyword, value)
    second = _second_scan(first, **labels[1])
    arrival = [ds for pair in zip(second[::-1], first, strict=True) for ds in pair]
    stacks, notes = stacks_in_order(arrival)
    assert [len(stack) for stack in stacks] == [8, 8]
    assert [_uids(stack.images) for stack in stacks] == [_uids(first), _uids(second)]
    for stack in stacks:
        assert _z(stack.images) == _z(first) and stack.spacing == pytest.approx(SPACING)
        # No slice of the other scan among any slice's 2.5D neighbours.
        for index in range(len(stack)):
            assert _uids(stack.neighbours(index, 5)) <= _uids(stack.images)
    assert any("the same positions scanned 2 times" in note for note in notes)
    (split,) = [note for note in notes if "split by" in note]
    assert "and scan into 2 stacks" in split and "scan 2 of 2" in split
    assert all("left out" not in note for note in notes)


@pytest.mark.filterwarnings("ignore:Invalid value for VR TM")  # the old form, on purpose
def test_acquisition_times_of_either_form_are_on_one_scale() -> None:
    first, later, untimed = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    first.AcquisitionDateTime = "20240131235950.5+0100"
    later.AcquisitionDate, later.AcquisitionTime = "20240201", "00:00:10"  # the old TM form
    assert acquired(later) - acquired(first) == pytest.approx(19.5)
    untimed.AcquisitionDate = "20240201"
    assert acquired(untimed) is None


@pytest.mark.parametrize(
    ("values", "seconds"),
    [
        ({"AcquisitionTime": "12"}, 43_200),
        ({"AcquisitionTime": "1230"}, 45_000),
        ({"AcquisitionTime": "123015.25 "}, 45_015.25),
        ({"AcquisitionDate": "00010102", "AcquisitionTime": "000001"}, 2 * 86_400 + 1),
        ({"AcquisitionDate": "", "AcquisitionTime": "000001"}, 1),
        ({"AcquisitionDateTime": "00010101000010.5-0500"}, 86_410.5),
        ({"AcquisitionDateTime": "0001010112"}, 86_400 + 43_200),
    ],
)
def test_acquisition_times_read_as_pydicom_reads_them(values: dict, seconds: float) -> None:
    """Partial times, a fraction, no date (day 0) and a DT's offset (left aside)."""
    ds = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    assert acquired(ds) == pytest.approx(seconds)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # invalid on purpose
@pytest.mark.parametrize(
    "values",
    [
        {"AcquisitionTime": "256000"},
        {"AcquisitionTime": "1260"},
        {"AcquisitionDateTime": "20241301120000"},
        {"AcquisitionDateTime": "20240132120000"},
    ],
)
def test_an_invalid_acquisition_time_is_no_time(values: dict) -> None:
    """Hour 25, minute 60, month 13, day 32 are no time (the image is ordered as untimed);
    before, the node's own patterns read 25:00, 13:00, and 12:00 of an unknown day."""
    ds = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    assert acquired(ds) is None


def test_scans_at_shifted_positions_are_told_apart_by_acquisition_number() -> None:
    """A second phase reconstructed half a slice off the first's positions: no position comes
    round again, but the two acquisitions cover the same range."""
    first = _axial(slices=8)
    second = _second_scan(first, AcquisitionNumber=2)
    for ds in second:
        x, y, z = (float(value) for value in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + SPACING / 2]
    stacks, _ = stacks_in_order([*first, *second])
    assert [_uids(stack.images) for stack in stacks] == [_uids(first), _uids(second)]
    assert all(stack.spacing == pytest.approx(SPACING) for stack in stacks)


def test_acquisitions_that_tile_the_volume_are_one_stack() -> None:
    """Step-and-shoot: each rotation's slices are an acquisition of their own (the last slice
    of one may repeat the first of the next); together they are one volume."""
    axial = _axial(slices=12)
    for index, ds in enumerate(axial):
        ds.AcquisitionNumber = index // 4 + 1
        ds.AcquisitionTime = f"1200{10 * (index // 4):02d}"
    overlap = _copy(axial[4], 99)
    overlap.AcquisitionNumber, overlap.AcquisitionTime = 1, "120000"
    ((stack,), notes) = stacks_in_order([*axial[::-1], overlap])
    assert [ds.SOPInstanceUID for ds in stack.images] == [ds.SOPInstanceUID for ds in axial]
    (note,) = notes
    assert "1 image at a position already in the stack left out" in note


def test_a_slice_scanned_again_later_is_left_out_not_mixed_in() -> None:
    """One position repeated at a later time (a retake of one slice) is a scan of one image:
    left out beside the full scan."""
    axial = _axial(slices=6)
    retake = _copy(axial[3], 1)
    retake.AcquisitionTime = "121500"
    stacks, notes = stacks_in_order([retake, *axial])
    (stack,) = stacks
    assert [ds.SOPInstanceUID for ds in stack.images] == [ds.SOPInstanceUID for ds in axial]
    assert any("(left out: fewer than 3)" in note for note in notes)


def _tilted(degrees: float) -> list[pydicom.Dataset]:
    """Slices tilted about the patient's left-right axis (a gantry tilt), with one duplicate
    position (so that the notes name the stack)."""
    axial = _axial(slices=5)
    angle = np.radians(degrees)
    column = [0.0, float(np.cos(angle)), -float(np.sin(angle))]
    normal = np.array([0.0, np.sin(angle), np.cos(angle)])
    for index, ds in enumerate(axial):
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *column]
        ds.ImagePositionPatient = [float(v) for v in (-100, -100, 0) + index * SPACING * normal]
    return [*axial, _copy(axial[2], 50)]


@pytest.mark.parametrize(("degrees", "plane"), [(15, "AXIAL"), (23, "OBLIQUE")])
def test_notes_name_the_plane_as_selection_does(degrees: float, plane: str) -> None:
    images = _tilted(degrees)
    assert image_plane(slice_normal(images[0]), 20.0) == plane
    ((stack,), notes) = stacks_in_order(images, 20.0)
    assert len(stack) == 5 and stack.spacing == pytest.approx(SPACING)
    assert notes[0].startswith(f"series 2: {plane.lower()} 64x64:")
    # A card that admits more tilt names the 23 degree stack axial, as its selection does.
    ((_,), wider) = stacks_in_order(images, 25.0)
    assert wider[0].startswith("series 2: axial 64x64:")


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


# --- the CT demo models on a series of two contrast phases --------------------------------------


def _two_phases() -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    first = _axial(slices=10, rows=160)
    return first, _second_scan(first, enhancement=250, AcquisitionNumber=2)


def _probabilities(run) -> dict[str, list[float]]:
    return {
        str(e.source.SOPInstanceUID): [round(f.probability, 6) for f in e.findings]
        for e in run.images
    }


def test_nodule_detection_analyses_each_phase_on_its_own(nodule_card, runtime) -> None:
    """Every slice of both phases is analysed, each with its own phase's neighbours: the same
    findings as on each phase sent alone."""
    first, second = _two_phases()
    run = run_model(nodule_card, [*second, *first], runtime, StageTimes())
    assert _uids([e.source for e in run.images]) == _uids(first) | _uids(second)
    alone = {
        **_probabilities(run_model(nodule_card, list(first), runtime, StageTimes())),
        **_probabilities(run_model(nodule_card, list(second), runtime, StageTimes())),
    }
    assert _probabilities(run) == alone


def test_lung_segmentation_of_two_phases_is_a_seg_per_phase(lung_card, runtime) -> None:
    first, second = _two_phases()
    run = run_model(lung_card, [*first, *second], runtime, StageTimes())
    assert [_uids(s.sources) for s in run.segmentations] == [_uids(first), _uids(second)]
    segs = [ds for kind, ds in result_objects(run, lung_card) if kind == "seg"]
    assert len({ds.SOPInstanceUID for ds in segs}) == 2
    # Two instances of one SEG series: numbered apart, in the order of the stacks.
    assert {ds.SeriesInstanceUID for ds in segs} == {segs[0].SeriesInstanceUID}
    assert [int(ds.InstanceNumber) for ds in segs] == [1, 2]
    for seg, phase in zip(segs, (first, second), strict=True):
        referenced = {
            item.ReferencedSOPInstanceUID
            for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        }
        assert referenced == _uids(phase)
        assert dciodvfy_errors(seg) == []


def test_lung_segmentation_of_orientations_that_differ_by_rounding_is_one_seg(
    lung_card, runtime
) -> None:
    axial = _axial(slices=8, rows=160)
    for index, ds in enumerate(axial):
        if index % 2:  # written with other rounding: 1e-6 off
            ds.ImageOrientationPatient = [1.0, 1e-6, 0.0, -1e-6, 1.0, 0.0]
    run = run_model(lung_card, axial, runtime, StageTimes())
    (segmentation,) = run.segmentations
    assert _uids(segmentation.sources) == _uids(axial)
    (seg,) = [ds for kind, ds in result_objects(run, lung_card) if kind == "seg"]
    assert int(seg.NumberOfFrames) == len(axial) * len(lung_card.labels)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert dciodvfy_errors(seg) == []
    assert [float(v) for v in axial[1].ImageOrientationPatient] == [1, 1e-6, 0, -1e-6, 1, 0]
