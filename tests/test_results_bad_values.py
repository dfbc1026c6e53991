"""Source images with invalid values, as modalities and archives send them: a Patient's Birth
Date "00000000", a Study Time "25:61", an Instance Number "x1", a Patient's Weight "1,5",
over-long names and numbers, lower-case or unknown code strings. Every kind of result object
is still written and passes dciodvfy: an invalid Type 2 value is written empty, an invalid
optional one is left out, the source itself is unchanged, and the log names the attributes,
never their values.

The bad values are written into the source's file as raw bytes (pydicom refuses to make most
of them) and read back, as the node reads what it received."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import spool_and_index
from dciodvfy import ct_series, dciodvfy_errors
from defective_sources import SECONDARY_CAPTURE, conforming
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.findings import (
    Algorithm,
    CodedConcept,
    DerivedImage,
    Finding,
    ImageFindings,
    Segment,
    Segmentation,
)
from dicomnode.models.registry import discover_cards
from dicomnode.pipeline.analyse import analyse_study
from dicomnode.pipeline.runtime import Runtime
from dicomnode.results import reference as reference_module
from dicomnode.results.derived import build_derived
from dicomnode.results.gsps import build_gsps
from dicomnode.results.job import write_results
from dicomnode.results.kos import build_kos
from dicomnode.results.overlay import build_overlay
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr

REPO = Path(__file__).resolve().parents[1]
ALGORITHM = Algorithm(name="cxr-bad-values-demo", version="1.0.0")
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
NODULE = CodedConcept("27925004", "SCT", "Nodule")
LUNG = CodedConcept("39607008", "SCT", "Lung structure")


def with_raw_values(source: Dataset, values: dict[str, bytes]) -> Dataset:
    """``source`` with ``values`` written as they are (padded to even length), as read from
    its file."""
    for keyword, raw in values.items():
        tag = tag_for_keyword(keyword)
        if len(raw) % 2:
            raw += b" "
        source[tag] = RawDataElement(tag, dictionary_VR(keyword), len(raw), raw, 0, False, True)
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


# id: (the raw values, Type 2 attributes written empty, optional ones left out).
CASES: dict[str, tuple[dict[str, bytes], tuple[str, ...], tuple[str, ...]]] = {
    "birth date 00000000": ({"PatientBirthDate": b"00000000"}, ("PatientBirthDate",), ()),
    "dates that are none": (
        {"StudyDate": b"notadate", "PatientBirthDate": b"19700230"},
        ("StudyDate", "PatientBirthDate"),
        (),
    ),
    "NUL-padded date": ({"StudyDate": b"2024\x00"}, ("StudyDate",), ()),
    "times that are none": (
        {"StudyTime": b"25:61", "PatientBirthTime": b"99"},
        ("StudyTime",),
        ("PatientBirthTime",),
    ),
    "date time that is none": ({"AcquisitionDateTime": b"2024xx"}, (), ()),
    "instance number x1": ({"InstanceNumber": b"x1"}, (), ()),
    "series number abc": ({"SeriesNumber": b"abc"}, (), ()),
    "decimal comma": (
        {"PatientWeight": b"1,5", "PatientSize": b"1,75"},
        (),
        ("PatientWeight", "PatientSize"),
    ),
    "sex X": ({"PatientSex": b"X"}, ("PatientSex",), ()),
    "lower-case code strings": (
        {"PatientSex": b"m", "BodyPartExamined": b"chest", "Laterality": b"r"},
        ("PatientSex",),
        (),
    ),
    "lower-case image laterality": ({"ImageLaterality": b"u"}, (), ()),
    "over-long LO, PN, SH": (
        {
            "ReferringPhysicianName": b"Referrer^" + b"R" * 60,
            "AccessionNumber": b"A" * 17,
            "StudyID": b"S" * 17,
            "StudyDescription": b"D" * 65,
            "InstitutionName": b"I" * 65,
            "Manufacturer": b"M" * 65,
        },
        ("ReferringPhysicianName", "AccessionNumber", "StudyID"),
        ("StudyDescription",),
    ),
    "control characters": (
        {"StudyDescription": b"CHEST\x00PA", "ReferringPhysicianName": b"Doe\x01^John"},
        ("ReferringPhysicianName",),
        ("StudyDescription",),
    ),
}


def every_result(source: Dataset) -> dict[str, Dataset]:
    """SR, overlay, SEG, GSPS, derived image and KOS of ``source`` (a radiograph)."""
    rows, columns = int(source.Rows), int(source.Columns)
    centre = (columns / 2, rows / 2)
    evaluation = ImageFindings(
        source,
        [
            Finding(PNEUMOTHORAX, 0.9, 0.5, critical=True, peak=centre),
            Finding(NODULE, 0.8, 0.5, critical=False, box=(4.0, 4.0, 20.0, 20.0)),
            Finding(NODULE, 0.7, 0.5, critical=False, point=(30.0, 30.0)),
        ],
    )
    lung = np.zeros((1, rows, columns), dtype=np.float32)
    lung[0, rows // 4 : rows * 3 // 4, columns // 8 : columns * 7 // 8] = 0.9
    results = {
        "sr": build_sr([evaluation], ALGORITHM),
        "overlay": build_overlay(evaluation, ALGORITHM),
        "seg": build_seg(Segmentation([source], [Segment(LUNG, lung)]), ALGORITHM),
        "gsps": build_gsps(evaluation, ALGORITHM),
        "derived": build_derived(
            DerivedImage(source, source.pixel_array, "bone suppression"), ALGORITHM
        ),
    }
    results["kos"] = build_kos([source], ALGORITHM, list(results.values()))
    return results


@pytest.mark.parametrize("case", CASES)
def test_every_result_of_a_source_with_bad_values_is_written_and_valid(case: str) -> None:
    values, emptied, left_out = CASES[case]
    source = with_raw_values(conforming("DX"), values)
    before = {keyword: source[keyword].value for keyword in values}

    results = every_result(source)

    assert set(results) == {"sr", "overlay", "seg", "gsps", "derived", "kos"}
    for kind, result in results.items():
        assert dciodvfy_errors(result) == [], kind
        for keyword in emptied:
            assert keyword in result and result[keyword].is_empty, (kind, keyword)
        for keyword in left_out:
            assert keyword not in result, (kind, keyword)
        # Identity and references stay the source's.
        assert result.StudyInstanceUID == source.StudyInstanceUID, kind
        assert result.PatientID == source.PatientID, kind
        assert str(result.PatientName) == str(source.PatientName), kind
    # The source keeps its own values, bad ones included.
    assert {keyword: source[keyword].value for keyword in values} == before


def test_a_derived_image_keeps_its_class_unless_a_type_1_value_is_bad() -> None:
    """Emptied Type 2 values keep a derived image in the source's class; a bad Image
    Laterality (Type 1 in DX, left out) makes it a Secondary Capture, as a missing one does."""
    type_2 = with_raw_values(conforming("DX"), {"PatientBirthDate": b"00000000"})
    type_1 = with_raw_values(conforming("DX"), {"ImageLaterality": b"u"})
    kept = build_derived(DerivedImage(type_2, type_2.pixel_array, "denoising"), ALGORITHM)
    secondary = build_derived(DerivedImage(type_1, type_1.pixel_array, "denoising"), ALGORITHM)
    assert kept.SOPClassUID == type_2.SOPClassUID
    assert secondary.SOPClassUID == SECONDARY_CAPTURE
    assert dciodvfy_errors(kept) == [] and dciodvfy_errors(secondary) == []


def test_an_unknown_character_set_is_written_as_utf8_with_the_names_as_read() -> None:
    source = conforming("DX")
    source.PatientName = "Müller^Jürgen"
    source = with_raw_values(
        source,
        {"SpecificCharacterSet": b"ISO_IR100", "PatientName": "Müller^Jürgen".encode("latin-1")},
    )
    name = str(source.PatientName)
    for kind, result in every_result(source).items():
        buffer = io.BytesIO()
        result.save_as(buffer, enforce_file_format=True)
        read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        assert read.SpecificCharacterSet == "ISO_IR 192", kind
        assert str(read.PatientName) == name, kind
        assert dciodvfy_errors(result) == [], kind
    assert source.SpecificCharacterSet == "ISO_IR100"


@pytest.mark.parametrize("kind", ["DX", "CR"])
def test_no_result_of_a_chest_radiograph_keeps_its_laterality(kind: str) -> None:
    """General Series Laterality (2C) is required only of a paired body part without Image
    Laterality, and not allowed otherwise (dciodvfy: "present when condition unsatisfied"): a
    chest source's Laterality is its slip, and every result leaves it out."""
    source = conforming(kind)
    assert source.BodyPartExamined == "CHEST"
    source.Laterality = "R"
    for result_kind, result in every_result(source).items():
        assert dciodvfy_errors(result) == [], result_kind
        assert "Laterality" not in result, result_kind
    assert source.Laterality == "R"


def test_a_paired_body_parts_laterality_is_kept() -> None:
    """A hand's Laterality is required (no Image Laterality in these objects) and kept."""
    source = conforming("CR")
    source.BodyPartExamined, source.Laterality = "HAND", "L"
    results = every_result(source)
    for result_kind in ("overlay", "gsps", "derived"):
        assert results[result_kind].Laterality == "L", result_kind
        assert dciodvfy_errors(results[result_kind]) == [], result_kind


def test_a_ct_series_with_bad_values_gets_its_seg_and_sr() -> None:
    series = [
        with_raw_values(
            ds,
            {"PatientBirthDate": b"00000000", "StudyTime": b"25:61", "InstanceNumber": b"x1"},
        )
        for ds in ct_series(4)
    ]
    rows, columns = int(series[0].Rows), int(series[0].Columns)
    lung = np.full((len(series), rows, columns), 0.9, dtype=np.float32)
    seg = build_seg(Segmentation(series, [Segment(LUNG, lung)]), ALGORITHM)
    sr = build_sr(
        [ImageFindings(ds, [Finding(NODULE, 0.8, 0.5, critical=False)]) for ds in series],
        ALGORITHM,
    )
    for result in (seg, sr):
        assert dciodvfy_errors(result) == []
        assert result["PatientBirthDate"].is_empty and result["StudyTime"].is_empty


def test_a_seg_of_a_source_without_body_part_leaves_laterality_out() -> None:
    """Whether an unnamed body part is paired is unknown: dciodvfy refuses a SEG's empty
    Laterality then (an overlay's or a GSPS's may be empty)."""
    series = ct_series(3)
    for ds in series:
        del ds.BodyPartExamined
    rows, columns = int(series[0].Rows), int(series[0].Columns)
    lung = np.full((len(series), rows, columns), 0.9, dtype=np.float32)
    seg = build_seg(Segmentation(series, [Segment(LUNG, lung)]), ALGORITHM)
    assert "Laterality" not in seg
    assert dciodvfy_errors(seg) == []


def test_the_log_names_the_attributes_and_never_their_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = with_raw_values(
        conforming("DX"),
        {
            "PatientBirthDate": b"19451345",
            "PatientWeight": b"81,5",
            "StudyID": b"STUDY-ID-TOO-LONG",
        },
    )
    reference_module._report.cache_clear()  # other tests' sources may share its UID
    with caplog.at_level(logging.INFO, logger="dicomnode.results.reference"):
        reference = sanitised_reference(source)
        # Each writer and model takes the source over: one line for the instance.
        for _ in range(5):
            sanitised_reference(source)
    (record,) = [r for r in caplog.records if r.name == "dicomnode.results.reference"]
    message = record.getMessage()
    assert record.levelno == logging.INFO
    assert str(source.SOPInstanceUID) in message
    for keyword in ("PatientBirthDate", "StudyID", "PatientWeight"):
        assert keyword in message
    for value in ("19451345", "1945", "81,5", "STUDY-ID-TOO-LONG", str(source.PatientName)):
        assert value not in caplog.text
    assert reference["PatientBirthDate"].is_empty and "PatientWeight" not in reference
    # The copy shares the source's pixels; the source keeps its values.
    assert reference.get_item("PixelData") is source.get_item("PixelData")
    assert source.PatientBirthDate == "19451345" and source.PatientWeight == "81,5"


def test_a_conforming_source_is_taken_over_as_it_is(caplog: pytest.LogCaptureFixture) -> None:
    source = conforming("DX")
    with caplog.at_level(logging.INFO, logger="dicomnode.results.reference"):
        reference = sanitised_reference(source)
    assert not [r for r in caplog.records if r.name == "dicomnode.results.reference"]
    assert reference == source


# Through the real pipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"])


# Between them every kind of result object: SR, overlay, KOS, SEG, GSPS, derived.
CARDS = (
    "cxr_pneumothorax_demo.toml",
    "cxr_lung_seg_demo.toml",
    "cxr_tube_tip_demo.toml",
    "cxr_bone_suppression_demo.toml",
)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_study_whose_birth_date_is_00000000_gets_every_result_written(
    sessions, tmp_path: Path, runtime: Runtime
) -> None:
    from dicomnode.synth.cxr import make_cxr

    cards = [
        card
        for card in discover_cards([REPO / "models"])
        if card.card_path is not None and Path(card.card_path).name in CARDS
    ]
    assert len(cards) == len(CARDS)
    source, _ = make_cxr(21, findings=("pneumothorax", "tube"), size=256)
    source = with_raw_values(source, {"PatientBirthDate": b"00000000"})
    settings = Settings(storage={"path": tmp_path / "storage"})
    with sessions() as session:
        study_id, path = spool_and_index(session, settings.storage_path, source)
        received = hashlib.sha256(path.read_bytes()).hexdigest()
        analyse_study(session, settings, cards, runtime, study_id)
        job = session.scalars(
            select(Job).where(Job.study_id == study_id, Job.kind == "results")
        ).one()
        write_results(
            session,
            settings,
            cards,
            runtime,
            study_id,
            job.id,
            None,
            job.payload["instances_up_to"],
        )
        session.refresh(job)
        study = session.get(Study, study_id)
        assert (study.analysis_status, study.analysis_error) == ("analysed", "")
        assert not job.payload.get("not_written"), job.payload
        rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id)).all()
        assert {row.kind for row in rows} == {"sr", "overlay", "kos", "seg", "gsps", "derived"}
        for row in rows:
            result = pydicom.dcmread(row.path)
            assert dciodvfy_errors(result) == [], row.kind
            assert result.PatientBirthDate == "", row.kind
    # The received file is as it came.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == received
