"""Empty (zero-length) attributes on the model-input path read as absent ones.

Modalities and archives write Type 1 and Type 2 attributes empty: an empty Rescale Intercept,
VOI LUT Function or Image Orientation Patient. The selection rules, the decoder and the
preprocessing must read each as if it were absent (pydicom's LUT functions raise on them), so
that such an image is still analysed; an image whose Image Pixel module is empty cannot be
decoded and is left out with a reason that names the attribute and no patient data.

The sources are ``defective_sources``' conforming DX, CR and CT images and its defects.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import spool_and_index
from dciodvfy import ct_series, dciodvfy_errors
from defective_sources import DEFECT_IDS, DEFECTS, Defect, conforming
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.db.models import FindingRow, Job, ResultObject, Study
from dicomnode.findings import Algorithm, CodedConcept, Finding, ImageFindings
from dicomnode.models.registry import InputSpec, ModelCard, discover_cards
from dicomnode.pipeline.analyse import analyse_study
from dicomnode.pipeline.correction import apply_correction
from dicomnode.pipeline.decode import DecodeError, first_frame
from dicomnode.pipeline.preprocess import prepare_input, prepare_stack
from dicomnode.pipeline.presentation_values import percentile_window, presentation_pixels
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.select import image_facts, select_models
from dicomnode.results.job import write_results
from dicomnode.results.overlay import build_overlay

REPO = Path(__file__).resolve().parents[1]

# What the selection rules, the decoder and the preprocessing read, per kind of source; those
# the conforming source lacks are added empty (and compared with the source without them).
RADIOGRAPH = (
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "WindowCenterWidthExplanation",
    "VOILUTSequence",
    "PresentationLUTShape",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "ImagerPixelSpacing",
    "PixelSpacing",
    "NominalScannedPixelSpacing",
    "PixelAspectRatio",
    "NumberOfFrames",
    "ImageType",
    "PresentationIntentType",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "Manufacturer",
    "ProtocolName",
    "SeriesDescription",
)
TOMOGRAPH = (
    "RescaleIntercept",
    "RescaleSlope",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelSpacing",
    "PixelPaddingValue",
    "ImageOrientationPatient",
    "ImageType",
    "NumberOfFrames",
    "Modality",
    "BodyPartExamined",
)
CASES = [(kind, keyword) for kind in ("DX", "CR") for keyword in RADIOGRAPH] + [
    ("CT", keyword) for keyword in TOMOGRAPH
]
CASE_IDS = [f"{kind} empty {keyword}" for kind, keyword in CASES]
# Image Pixel attributes: without them nothing says how to read the pixel data.
IMAGE_PIXEL = ("PhotometricInterpretation", "SamplesPerPixel", "BitsStored", "PixelRepresentation")
# An image-to-image card's input without a window of its own (the image's VOI, else percentiles).
SPEC = InputSpec(shape=(1, 64, 64), normalisation="unit")


@pytest.fixture(scope="module")
def cards() -> list[ModelCard]:
    """The committed cards that prepare an input (an ensemble averages its members')."""
    return [c for c in discover_cards([REPO / "models"]) if c.model.task != "ensemble"]


def _emptied(source: Dataset, keyword: str) -> Dataset:
    """``source`` with ``keyword`` present and empty (zero length), as a modality writes it."""
    out = copy.deepcopy(source)
    vr = dictionary_VR(keyword)
    out.add_new(keyword, vr, Sequence() if vr == "SQ" else None)
    return out


def _without(source: Dataset, keyword: str) -> Dataset:
    out = copy.deepcopy(source)
    if keyword in out:
        delattr(out, keyword)
    return out


def _as_received(source: Dataset) -> Dataset:
    """``source`` written and read back, as the node reads what it stored (an empty text
    value then reads as '', not None)."""
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _model_input(ds: Dataset, card: ModelCard) -> np.ndarray:
    """The card's input for ``ds`` (a 2.5D card: ``ds`` as each of its slices)."""
    if card.input.slices > 1:
        sample, _ = prepare_stack([ds] * card.input.slices, card.input)
    else:
        sample, _ = prepare_input(ds, card.input)
    return sample


def _check_input(ds: Dataset, card: ModelCard) -> np.ndarray:
    sample = _model_input(ds, card)
    assert sample.shape == tuple(card.input.shape), card.model.name
    assert sample.dtype == np.float32 and np.isfinite(sample).all(), card.model.name
    return sample


@pytest.mark.parametrize("received", [False, True], ids=["in memory", "as received"])
@pytest.mark.parametrize(("kind", "keyword"), CASES, ids=CASE_IDS)
def test_an_empty_attribute_reads_as_an_absent_one(
    cards: list[ModelCard], kind: str, keyword: str, received: bool
) -> None:
    source = conforming(kind)
    empty, absent = _emptied(source, keyword), _without(source, keyword)
    if received:
        empty = _as_received(empty)
    assert image_facts(empty) == image_facts(absent)
    for card in cards:
        assert np.array_equal(_check_input(empty, card), _check_input(absent, card))
    assert np.array_equal(presentation_pixels(empty), presentation_pixels(absent))
    assert percentile_window(empty) == percentile_window(absent)
    # An image-to-image model's change written back through the same transforms.
    change = 0.05 * np.ones((int(source.Rows), int(source.Columns)))
    assert np.array_equal(
        apply_correction(empty, change, SPEC), apply_correction(absent, change, SPEC)
    )


@pytest.mark.parametrize("defect", DEFECTS, ids=DEFECT_IDS)
def test_every_card_gets_a_finite_input_of_a_defective_source(
    cards: list[ModelCard], defect: Defect
) -> None:
    source = _as_received(defect.source())
    for card in cards:
        _check_input(source, card)


def _selected(cards: list[ModelCard], ds: Dataset) -> list[str]:
    return sorted(card.model.name for card in select_models(cards, image_facts(ds)))


def test_empty_rescale_and_voi_lut_function_still_select_and_prepare(
    cards: list[ModelCard],
) -> None:
    """The defect the node met: pydicom's LUT functions raise on these three. (A CT slice
    without rescale has no Hounsfield units: no card takes it, and its VOI LUT Function alone
    is spoiled here.)"""
    for kind in ("DX", "CR", "CT"):
        source = conforming(kind)
        spoiled = copy.deepcopy(source)
        keywords = ("RescaleIntercept", "RescaleSlope", "VOILUTFunction")
        for keyword in keywords if kind != "CT" else keywords[2:]:
            spoiled.add_new(keyword, dictionary_VR(keyword), None)
        spoiled = _as_received(spoiled)
        assert _selected(cards, spoiled) == _selected(cards, source) != []
        for card in select_models(cards, image_facts(spoiled)):
            _check_input(spoiled, card)


def _voi_lut(entries: int = 4096, bits: int = 12) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, 0, bits]
    ramp = np.clip((np.arange(entries) - 1000) / 2000, 0, 1) * (2**bits - 1)
    item.LUTData = np.rint(ramp).astype("<u2").tobytes()
    item["LUTData"].VR = "OW"
    return item


@pytest.mark.parametrize("emptied", ["LUTDescriptor", "LUTData"])
@pytest.mark.parametrize("sequence", ["VOILUTSequence", "ModalityLUTSequence"])
def test_a_lut_item_without_descriptor_or_data_is_no_lut(sequence: str, emptied: str) -> None:
    source = conforming("DX")
    item = _voi_lut()
    item[emptied].value = b"" if emptied == "LUTData" else None
    spoiled = copy.deepcopy(source)
    spoiled[sequence] = pydicom.DataElement(sequence, "SQ", Sequence([item]))
    spoiled = _as_received(spoiled)
    assert np.array_equal(presentation_pixels(spoiled), presentation_pixels(source))
    assert percentile_window(spoiled) == percentile_window(source)


def test_a_lone_rescale_slope_is_applied_with_intercept_zero() -> None:
    """PS3.3 C.11.1.1.2: output = slope * stored + intercept. pydicom ignores a slope without
    its intercept (absent, or empty), while a correction's way back divides by the slope: both
    read it alike."""
    whole = conforming("DX")
    whole.RescaleSlope, whole.RescaleIntercept = 3, 0
    lone = copy.deepcopy(whole)
    del lone.RescaleIntercept
    spec = InputSpec(shape=(1, 64, 64), normalisation="unit", window=(6000.0, 8000.0))
    assert np.array_equal(
        presentation_pixels(lone, window=spec.window),
        presentation_pixels(whole, window=spec.window),
    )
    change = 0.05 * np.ones(whole.pixel_array.shape)
    assert np.array_equal(
        apply_correction(lone, change, spec), apply_correction(whole, change, spec)
    )


@pytest.mark.parametrize("keyword", IMAGE_PIXEL)
def test_an_empty_image_pixel_attribute_cannot_be_decoded_and_is_named(keyword: str) -> None:
    source = _as_received(_emptied(conforming("DX"), keyword))
    with pytest.raises(DecodeError, match=f"lacks {keyword}"):
        first_frame(source)
    with pytest.raises(DecodeError, match=f"lacks {keyword}"):
        presentation_pixels(source)


# The overlay presents the source as the models saw it -------------------------------------


@pytest.mark.parametrize(
    ("kind", "keyword"),
    [
        (kind, k)
        for kind in ("DX", "CT")
        for k in ("RescaleIntercept", "RescaleSlope", "VOILUTFunction")
    ],
)
def test_the_overlay_of_a_source_with_an_empty_lut_attribute_passes_dciodvfy(
    kind: str, keyword: str
) -> None:
    source = _as_received(_emptied(conforming(kind), keyword))
    evaluation = ImageFindings(
        source=source,
        findings=[
            Finding(
                CodedConcept("36118008", "SCT", "Pneumothorax"),
                probability=0.8,
                threshold=0.5,
                critical=True,
            )
        ],
    )
    overlay = build_overlay(evaluation, Algorithm(name="cxr-pneumothorax-demo", version="1.0.0"))
    assert dciodvfy_errors(overlay) == []


# A real analysis of a study ----------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"])


def _spoil(*keywords: str) -> Callable[[Dataset], None]:
    def spoil(ds: Dataset) -> None:
        for keyword in keywords:
            ds.add_new(keyword, dictionary_VR(keyword), None)

    return spoil


def _analyse_and_write(session, settings: Settings, cards, runtime, study_id: int) -> Job:
    analyse_study(session, settings, cards, runtime, study_id)
    job = session.scalars(
        select(Job).where(Job.study_id == study_id, Job.kind == "results").order_by(Job.id.desc())
    ).first()
    assert job is not None and job.state == "queued"
    write_results(
        session, settings, cards, runtime, study_id, job.id, None, job.payload["instances_up_to"]
    )
    job.state = "done"
    session.commit()
    return job


STUDIES = {
    # A radiograph: the triage classifier (SR, overlay, KOS) and bone suppression (derived).
    "DX": (
        lambda: [conforming("DX")],
        ("cxr_pneumothorax_demo.toml", "cxr_bone_suppression_demo.toml"),
        ("RescaleIntercept", "RescaleSlope", "VOILUTFunction"),
        {"derived", "overlay", "sr"},
    ),
    # A CT series: lung segmentation (SEG) and 2.5D nodule detection (SR). (Its rescale is
    # kept: a CT slice without it is given to no model, test_select_images.py.)
    "CT": (
        lambda: ct_series(5),
        ("ct_lung_seg_demo.toml", "ct_nodule_demo.toml"),
        ("WindowCenter", "VOILUTFunction"),
        {"seg", "sr"},
    ),
}


@pytest.mark.parametrize("kind", sorted(STUDIES))
def test_a_study_with_empty_lut_attributes_is_analysed_and_its_results_are_valid(
    sessions, tmp_path: Path, runtime: Runtime, kind: str
) -> None:
    images, card_files, keywords, kinds = STUDIES[kind]
    cards = discover_cards([REPO / "models"])
    cards = [c for c in cards if c.card_path is not None and Path(c.card_path).name in card_files]
    settings = Settings(storage={"path": tmp_path / "storage"})
    with sessions() as session:
        for ds in images():
            _spoil(*keywords)(ds)
            study_id, _ = spool_and_index(session, settings.storage_path, ds)
        job = _analyse_and_write(session, settings, cards, runtime, study_id)
        study = session.get(Study, study_id)
        assert (study.analysis_status, study.analysis_error) == ("analysed", "")
        assert "not_written" not in job.payload, job.payload
        rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id)).all()
        assert kinds <= {row.kind for row in rows}
        for row in rows:
            assert dciodvfy_errors(pydicom.dcmread(row.path)) == [], row.kind
        if kind == "DX":
            assert session.scalars(select(FindingRow).where(FindingRow.study_id == study_id)).all()


def test_an_image_with_an_empty_image_pixel_module_is_left_out_without_patient_data(
    sessions, tmp_path: Path, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    cards = [
        c for c in discover_cards([REPO / "models"]) if c.model.name == "cxr-pneumothorax-demo"
    ]
    settings = Settings(storage={"path": tmp_path / "storage"})
    source = conforming("DX")
    source.PhotometricInterpretation = None
    caplog.set_level(logging.INFO, logger="dicomnode")
    with sessions() as session:
        study_id, _ = spool_and_index(session, settings.storage_path, source)
        analyse_study(session, settings, cards, runtime, study_id)
        study = session.get(Study, study_id)
        status, reason = study.analysis_status, study.analysis_error
    assert status == "failed" and "lacks PhotometricInterpretation" in reason
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "lacks PhotometricInterpretation" in logged
    for value in (str(source.PatientName), str(source.PatientID), source.PatientBirthDate):
        assert value and value not in logged and value not in reason
