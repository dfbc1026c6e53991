"""KOS builder: dciodvfy, selected images and results, observer, notice, identity, UIDs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dciodvfy import chest_xray, ct_series, dciodvfy_errors

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.findings import (
    Algorithm,
    CodedConcept,
    Finding,
    ImageFindings,
    Segment,
    Segmentation,
)
from dicomnode.results.gsps import build_gsps
from dicomnode.results.kos import build_kos
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr

ALGORITHM = Algorithm(name="cxr-pneumothorax-demo", version="1.0.0")
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    first = chest_xray(21, size=128)
    return [first, chest_xray(22, size=128, study_instance_uid=first.StudyInstanceUID)]


@pytest.fixture(scope="module")
def results(sources: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    evaluation = ImageFindings(
        sources[0],
        [Finding(PNEUMOTHORAX, 0.93, 0.5, critical=True, box=(10.0, 10.0, 60.0, 90.0))],
    )
    probabilities = np.zeros((1, 128, 128), dtype=np.float32)
    probabilities[0, 10:90, 10:60] = 0.9
    return [
        build_sr([evaluation], ALGORITHM),
        build_gsps(evaluation, ALGORITHM),
        build_seg(Segmentation([sources[0]], [Segment(PNEUMOTHORAX, probabilities)]), ALGORITHM),
    ]


@pytest.fixture(scope="module")
def kos(sources: list[pydicom.Dataset], results: list[pydicom.Dataset]) -> pydicom.Dataset:
    return build_kos(sources, ALGORITHM, results)


def walk(items: pydicom.Sequence) -> Iterator[pydicom.Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def selected(kos: pydicom.Dataset) -> dict[str, str]:
    """SOP Instance UID -> value type of every object the document selects."""
    return {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: item.ValueType
        for item in walk(kos.ContentSequence)
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }


def test_kos_passes_dciodvfy(kos: pydicom.Dataset) -> None:
    assert dciodvfy_errors(kos) == []


def test_kos_selects_critical_images_and_results(
    kos: pydicom.Dataset, sources: list[pydicom.Dataset], results: list[pydicom.Dataset]
) -> None:
    assert kos.SOPClassUID == KOS_STORAGE
    assert kos.Modality == "KO"
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")  # Of Interest
    chosen = selected(kos)
    for source in sources:
        assert chosen[source.SOPInstanceUID] == "IMAGE"
    sr, gsps, seg = results
    assert chosen[sr.SOPInstanceUID] == "COMPOSITE"
    assert gsps.SOPInstanceUID in chosen and seg.SOPInstanceUID in chosen
    assert len(chosen) == 5
    evidence = {
        reference.ReferencedSOPInstanceUID
        for series in kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    }
    assert evidence == set(chosen)
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(kos)
    assert document.resolve_reference(sources[1].SOPInstanceUID) == (
        sources[1].StudyInstanceUID,
        sources[1].SeriesInstanceUID,
        sources[1].SOPInstanceUID,
    )


def test_kos_observer_is_the_model_and_notes_research_demo(
    kos: pydicom.Dataset, tmp_path: Path
) -> None:
    """Read back as written: TID 1004's Model Name is the model's name (it held the version,
    "1.0.0"), the Name its name and version (a KOS has no Algorithm Identification)."""
    kos.save_as(tmp_path / "kos.dcm", enforce_file_format=True)
    written = pydicom.dcmread(tmp_path / "kos.dcm")
    texts = {
        item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
        for item in walk(written.ContentSequence)
        if item.ValueType == "TEXT"
    }
    assert texts["121015"] == "cxr-pneumothorax-demo"  # Device Observer Model Name
    assert texts["121013"] == "cxr-pneumothorax-demo 1.0.0"  # Device Observer Name
    assert texts["121014"] == "dicomnode"  # Device Observer Manufacturer
    assert RESEARCH_DEMO_NOTICE in texts["113012"]  # Key Object Description


def test_kos_keeps_patient_study_and_uids_are_deterministic(
    kos: pydicom.Dataset, sources: list[pydicom.Dataset], results: list[pydicom.Dataset]
) -> None:
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
        assert str(kos[keyword].value) == str(sources[0][keyword].value)
    assert kos.AccessionNumber == sources[0].AccessionNumber
    assert "research demo" in kos.SeriesDescription
    # One series per study and model; one instance per selection (a UID names one content):
    # the same selection again gives the same instance, another selection a new one.
    assert build_kos(sources, ALGORITHM, results).SOPInstanceUID == kos.SOPInstanceUID
    fewer = build_kos(sources[:1], ALGORITHM)
    assert fewer.SeriesInstanceUID == kos.SeriesInstanceUID
    assert fewer.SOPInstanceUID != kos.SOPInstanceUID
    assert dciodvfy_errors(fewer) == []
    newer = build_kos(sources, Algorithm(ALGORITHM.name, "1.1.0"), results)
    assert newer.SeriesInstanceUID != kos.SeriesInstanceUID
    assert newer.SOPInstanceUID != kos.SOPInstanceUID


def test_kos_of_ct_slices_passes_dciodvfy() -> None:
    slices = ct_series(4)
    kos = build_kos(slices[1:3], ALGORITHM)
    assert dciodvfy_errors(kos) == []
    assert set(selected(kos)) == {s.SOPInstanceUID for s in slices[1:3]}


def test_kos_rejects_empty_mixed_studies_and_repeats(sources: list[pydicom.Dataset]) -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_kos([], ALGORITHM)
    with pytest.raises(ValueError, match="one study"):
        build_kos([sources[0], chest_xray(23, size=64)], ALGORITHM)
    with pytest.raises(ValueError, match="more than once"):
        build_kos([sources[0], sources[0]], ALGORITHM)
