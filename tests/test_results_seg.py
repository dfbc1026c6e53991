"""SEG builder: dciodvfy, BINARY and FRACTIONAL, 2-D and CT multi-frame, references, identity,
one SEG over slices whose orientation differs by rounding."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dciodvfy import chest_xray, ct_series, dciodvfy_errors

from dicomnode.findings import Algorithm, CodedConcept, Segment, Segmentation
from dicomnode.results.seg import build_seg

ALGORITHM = Algorithm(name="lung-seg-demo", version="1.0.0")
LUNG = CodedConcept("39607008", "SCT", "Lung structure")
NODULE = CodedConcept("27925004", "SCT", "Nodule")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def radiograph() -> pydicom.Dataset:
    return chest_xray(3, size=128)


@pytest.fixture(scope="module")
def ct() -> list[pydicom.Dataset]:
    return ct_series(6)


def lung_probabilities(frames: int, rows: int, columns: int) -> np.ndarray:
    """A smooth left-right ramp of lung probability: 0 at the left edge, 1 at the right."""
    ramp = np.linspace(0.0, 1.0, columns, dtype=np.float32)
    return np.broadcast_to(ramp, (frames, rows, columns)).copy()


def ct_segmentation(ct: list[pydicom.Dataset]) -> Segmentation:
    rows, columns = int(ct[0].Rows), int(ct[0].Columns)
    nodule = np.zeros((len(ct), rows, columns), dtype=np.float32)
    nodule[2:4, 20:24, 10:14] = 0.8  # only in slices 3 and 4
    return Segmentation(
        sources=ct,
        segments=[
            Segment(LUNG, lung_probabilities(len(ct), rows, columns), threshold=0.5),
            Segment(NODULE, nodule, threshold=0.5),
        ],
    )


def radiograph_segmentation(radiograph: pydicom.Dataset) -> Segmentation:
    rows, columns = int(radiograph.Rows), int(radiograph.Columns)
    return Segmentation([radiograph], [Segment(LUNG, lung_probabilities(1, rows, columns))])


@pytest.mark.parametrize("fractional", [False, True])
def test_seg_of_a_radiograph_passes_dciodvfy(radiograph: pydicom.Dataset, fractional: bool) -> None:
    seg = build_seg(radiograph_segmentation(radiograph), ALGORITHM, fractional=fractional)
    assert dciodvfy_errors(seg) == []
    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.SegmentationType == ("FRACTIONAL" if fractional else "BINARY")
    assert seg.NumberOfFrames == 1
    assert list(seg.PatientOrientation) == list(radiograph.PatientOrientation)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == radiograph.SeriesInstanceUID
    instance = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert instance.ReferencedSOPInstanceUID == radiograph.SOPInstanceUID


def test_binary_seg_holds_the_thresholded_mask(radiograph: pydicom.Dataset) -> None:
    segmentation = radiograph_segmentation(radiograph)
    seg = hd.seg.Segmentation.from_dataset(build_seg(segmentation, ALGORITHM))
    mask = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[radiograph.SOPInstanceUID], segment_numbers=[1]
    )[0, :, :, 0]
    expected = segmentation.segments[0].mask[0]
    assert expected.any() and not expected.all()
    assert np.array_equal(mask.astype(bool), expected)


def test_fractional_seg_holds_probabilities_in_8_bits(radiograph: pydicom.Dataset) -> None:
    segmentation = radiograph_segmentation(radiograph)
    dataset = build_seg(segmentation, ALGORITHM, fractional=True)
    assert dataset.SegmentationFractionalType == "PROBABILITY"
    assert dataset.MaximumFractionalValue == 255
    assert dataset.BitsAllocated == 8
    stored = dataset.pixel_array.astype(float) / 255
    assert np.abs(stored - segmentation.segments[0].probabilities[0]).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("fractional", [False, True])
def test_ct_seg_is_multiframe_with_one_frame_per_slice_and_segment(
    ct: list[pydicom.Dataset], fractional: bool
) -> None:
    seg = build_seg(ct_segmentation(ct), ALGORITHM, fractional=fractional)
    assert dciodvfy_errors(seg) == []
    # Empty frames are kept: the nodule is in 2 slices but has a frame for all 6.
    assert seg.NumberOfFrames == len(ct) * 2
    assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {slice_.SOPInstanceUID for slice_ in ct}
    per_source: dict[tuple[int, str], list[float]] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        segment = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        per_source[(segment, source.ReferencedSOPInstanceUID)] = position
    assert len(per_source) == len(ct) * 2
    for slice_ in ct:
        for segment in (1, 2):
            assert per_source[(segment, slice_.SOPInstanceUID)] == [
                float(v) for v in slice_.ImagePositionPatient
            ]


def _rounded_differently(ct: list[pydicom.Dataset], offset: float) -> list[pydicom.Dataset]:
    """Copies of the slices, every other one with its Image Orientation (Patient) ``offset``
    off (as another writer's rounding gives)."""
    noisy = [copy.deepcopy(slice_) for slice_ in ct]
    for slice_ in noisy[1::2]:
        slice_.ImageOrientationPatient = [1.0, offset, 0.0, -offset, 1.0, 0.0]
    return noisy


def test_ct_seg_of_orientations_that_differ_by_rounding_is_one_seg(
    ct: list[pydicom.Dataset],
) -> None:
    noisy = _rounded_differently(ct, 1e-6)
    seg = build_seg(ct_segmentation(noisy), ALGORITHM)
    assert dciodvfy_errors(seg) == []
    assert seg.NumberOfFrames == len(ct) * 2
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {slice_.SOPInstanceUID for slice_ in ct}
    # The sources themselves are left as they were.
    assert list(noisy[1].ImageOrientationPatient) == [1.0, 1e-6, 0.0, -1e-6, 1.0, 0.0]


def test_ct_seg_refuses_sources_of_another_orientation(ct: list[pydicom.Dataset]) -> None:
    # 0.05 (about 3 degrees): another reformat, never one SEG (the stacks split it too).
    with pytest.raises(ValueError, match=r"sources\[1\] .* a SEG has one orientation"):
        build_seg(ct_segmentation(_rounded_differently(ct, 0.05)), ALGORITHM)


def test_ct_seg_frames_hold_each_slices_mask(ct: list[pydicom.Dataset]) -> None:
    segmentation = ct_segmentation(ct)
    seg = hd.seg.Segmentation.from_dataset(build_seg(segmentation, ALGORITHM))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[slice_.SOPInstanceUID for slice_ in ct], segment_numbers=[1, 2]
    )
    for number, segment in enumerate(segmentation.segments):
        assert np.array_equal(pixels[..., number].astype(bool), segment.mask)


def test_seg_segments_carry_codes_category_and_algorithm(ct: list[pydicom.Dataset]) -> None:
    seg = build_seg(ct_segmentation(ct), ALGORITHM)
    lung, nodule = seg.SegmentSequence
    assert lung.SegmentLabel == "Lung structure"
    assert lung.SegmentedPropertyTypeCodeSequence[0].CodeValue == LUNG.value
    assert lung.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert nodule.SegmentedPropertyTypeCodeSequence[0].CodeValue == NODULE.value
    assert nodule.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    for segment in (lung, nodule):
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == ALGORITHM.name
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == ALGORITHM.name
        assert algorithm.AlgorithmVersion == ALGORITHM.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert "research demo" in seg.SeriesDescription
    assert "research demo" in seg.ContentDescription
    override = build_seg(ct_segmentation(ct), ALGORITHM, category=LUNG)
    assert override.SegmentSequence[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == (
        LUNG.value
    )


def test_seg_keeps_patient_and_study_and_uids_are_deterministic(
    ct: list[pydicom.Dataset],
) -> None:
    seg = build_seg(ct_segmentation(ct), ALGORITHM)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert seg[keyword].value == ct[0][keyword].value
    for keyword in ("StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate"):
        assert seg[keyword].value == ct[0][keyword].value
    assert seg.SeriesInstanceUID != ct[0].SeriesInstanceUID
    again = build_seg(ct_segmentation(list(ct)), ALGORITHM)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        seg.SeriesInstanceUID,
        seg.SOPInstanceUID,
    )
    tracking = [segment.TrackingUID for segment in seg.SegmentSequence]
    assert tracking == [segment.TrackingUID for segment in again.SegmentSequence]
    newer = build_seg(ct_segmentation(ct), Algorithm(ALGORITHM.name, "1.1.0"))
    assert newer.SeriesInstanceUID != seg.SeriesInstanceUID
    assert newer.SOPInstanceUID != seg.SOPInstanceUID


def test_seg_rejects_mismatched_shapes_and_values(radiograph: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="probabilities shape"):
        build_seg(
            Segmentation([radiograph], [Segment(LUNG, np.zeros((1, 10, 10), np.float32))]),
            ALGORITHM,
        )
    bad = lung_probabilities(1, int(radiograph.Rows), int(radiograph.Columns)) * 2
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        build_seg(Segmentation([radiograph], [Segment(LUNG, bad)]), ALGORITHM)
    with pytest.raises(ValueError, match="at least one segment"):
        build_seg(Segmentation([radiograph], []), ALGORITHM)
    other = chest_xray(4, size=128)
    with pytest.raises(ValueError, match="one series"):
        build_seg(
            Segmentation([radiograph, other], [Segment(LUNG, np.zeros((2, 128, 128), np.float32))]),
            ALGORITHM,
        )


def test_ct_seg_harmonises_the_references_without_copying_them_again(
    ct: list[pydicom.Dataset],
) -> None:
    """The references are the writer's own copies (sanitised_reference): the orientation is
    replaced in them, not in a further copy, and the sources keep their own."""
    from dicomnode.results.reference import sanitised_reference
    from dicomnode.results.seg import _one_orientation

    noisy = _rounded_differently(ct, 1e-6)
    references = [sanitised_reference(slice_) for slice_ in noisy]
    harmonised = _one_orientation(references)
    assert all(got is given for got, given in zip(harmonised, references, strict=True))
    assert {tuple(float(v) for v in ds.ImageOrientationPatient) for ds in harmonised} == {
        (1, 0, 0, 0, 1, 0)
    }
    assert list(noisy[1].ImageOrientationPatient) == [1.0, 1e-6, 0.0, -1e-6, 1.0, 0.0]


def test_seg_of_a_radiograph_of_non_square_pixels_states_their_aspect(
    ct: list[pydicom.Dataset],
) -> None:
    """A radiograph's SEG has no Pixel Measures: its frames, laid on the source pixel for
    pixel, follow the source's aspect, but shown alone they need Pixel Aspect Ratio (Image
    Pixel module, Type 1C where not 1:1 and no spacing is given); the SEG had none."""
    radiograph = chest_xray(7, size=128)
    radiograph.ImagerPixelSpacing = [0.2, 0.1]
    seg = build_seg(radiograph_segmentation(radiograph), ALGORITHM)
    assert dciodvfy_errors(seg) == []
    assert [int(value) for value in seg.PixelAspectRatio] == [2, 1]
    # A CT's SEG gives its spacing in Pixel Measures: no aspect ratio beside it.
    anisotropic = copy.deepcopy(ct)
    for ds in anisotropic:
        ds.PixelSpacing = [0.8, 0.4]
    ct_seg = build_seg(ct_segmentation(anisotropic), ALGORITHM)
    measures = ct_seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(value) for value in measures.PixelSpacing] == [0.8, 0.4]
    assert "PixelAspectRatio" not in ct_seg
