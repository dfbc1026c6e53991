"""Images lossy-compressed on the way are analysed like the originals they are.

dcmtk (dcmcjpeg, dcmcjpls) and gdcm (gdcmconv) mark a lossy-compressed image DERIVED, as DICOM
requires, with Lossy Image Compression 01, Derivation Code DCM 113040 "Lossy Compression", a
Derivation Description of the compression and the uncompressed predecessor in the Source Image
Sequence. The chest cards exclude DERIVED to skip processed and secondary images; before the
fix they skipped these too, and the study's worklist reason said that no AI finding model
applied. An image derived otherwise (bone suppression, the node's own derived DX, a vendor's
processing) stays excluded after a compression that overwrites its derivation codes.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import spool_and_index, spool_late_instance
from dciodvfy import dciodvfy_errors
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db.models import FindingRow, ResultObject, Study
from dicomnode.db.session import utcnow
from dicomnode.findings import Algorithm, DerivedImage
from dicomnode.ingest.arrival import instance_facts
from dicomnode.ingest.assembly import queue_ready_studies
from dicomnode.models.registry import ModelCard, SelectionRules, discover_cards
from dicomnode.pipeline.select import image_facts, rules_match, select_models
from dicomnode.results.derived import build_derived
from dicomnode.results.sr import lossy_note
from dicomnode.synth.cxr import make_cxr
from dicomnode.worker import Worker

REPO = Path(__file__).resolve().parents[1]
CXR_DERIVED_EXCLUDED = SelectionRules(excluded_image_types=["DERIVED", "LOCALIZER"])

# The compressions of the acceptance test, and gdcm's where it is installed.
DCMTK_LOSSY = [("dcmcjpeg", "+eb"), ("dcmcjpeg", "+ee"), ("dcmcjpeg", "+ep"), ("dcmcjpls", "+en")]
GDCM_LOSSY = [
    ("gdcmconv", "--jpeg", "--lossy", "-q", "90"),
    ("gdcmconv", "--jpegls", "--lossy", "-e", "2"),
    ("gdcmconv", "--j2k", "--lossy", "-r", "10"),
]
needs_gdcm = pytest.mark.skipif(
    shutil.which("gdcmconv") is None, reason="gdcmconv (libgdcm-tools) not installed"
)


@pytest.fixture(scope="module")
def cards() -> list[ModelCard]:
    return discover_cards([REPO / "models"])


@pytest.fixture(scope="module")
def chest_pa() -> Dataset:
    return make_cxr(8, size=128)[0]


def selected(cards: list[ModelCard], ds: Dataset) -> list[str]:
    return sorted(card.model.name for card in select_models(cards, image_facts(ds)))


def compressed(ds: Dataset, tool: tuple[str, ...], where: Path) -> Dataset:
    """``ds`` as the real tool writes it compressed (a file written, compressed, read)."""
    where.mkdir(parents=True, exist_ok=True)
    source, target = where / "in.dcm", where / f"{'_'.join(tool).replace('-', '')}.dcm"
    ds.save_as(source, enforce_file_format=True)
    subprocess.run([*tool, str(source), str(target)], check=True, capture_output=True)
    return pydicom.dcmread(target)


def _copy(ds: Dataset, **attributes: object) -> Dataset:
    out = copy.deepcopy(ds)
    for keyword, value in attributes.items():
        setattr(out, keyword, value)
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


# What the tools write, and the cards' selection -------------------------------------------


@pytest.mark.parametrize(
    "tool",
    [*DCMTK_LOSSY, *(pytest.param(tool, marks=needs_gdcm) for tool in GDCM_LOSSY)],
    ids=lambda tool: " ".join(tool),
)
def test_a_lossy_compressed_radiograph_is_selected_like_its_original(
    cards, chest_pa, tool, tmp_path
) -> None:
    lossy = compressed(chest_pa, tool, tmp_path)
    # What the tool wrote: DERIVED, lossy, derived by lossy compression only.
    assert [str(v).strip() for v in lossy.ImageType][:2] == ["DERIVED", "PRIMARY"]
    assert lossy.LossyImageCompression == "01"
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in lossy.DerivationCodeSequence] == [
        ("113040", "DCM")
    ]
    assert selected(cards, lossy) == selected(cards, chest_pa) != []
    assert image_facts(lossy).derived_by_lossy_compression_only


def test_compressed_again_or_lossless_first_is_still_only_compression(
    cards, chest_pa, tmp_path
) -> None:
    """dcmtk keeps an earlier compression's description in brackets."""
    lossless = compressed(chest_pa, ("dcmcjpeg", "+el"), tmp_path / "lossless")
    assert image_facts(lossless).image_types[0] == "ORIGINAL"
    uncompressed = compressed(lossless, ("dcmdjpeg",), tmp_path / "decompressed")
    twice = compressed(
        compressed(uncompressed, ("dcmcjpeg", "+eb"), tmp_path / "jpeg"),
        ("dcmdjpeg",),
        tmp_path / "jpeg-decompressed",
    )
    again = compressed(twice, ("dcmcjpls", "+en"), tmp_path / "jpeg-ls")
    assert "[Lossy compression with JPEG baseline" in again.DerivationDescription
    assert "[Lossless JPEG compression" in again.DerivationDescription
    assert image_facts(again).derived_by_lossy_compression_only
    assert selected(cards, again) == selected(cards, chest_pa)


def _bone_suppressed(chest_pa: Dataset, manufacturer: str) -> Dataset:
    """Another maker's bone-suppressed radiograph: DERIVED\\SECONDARY with its derivation."""
    return _copy(
        chest_pa,
        ImageType=["DERIVED", "SECONDARY"],
        DerivationDescription="Bone suppression",
        DerivationCodeSequence=[_code("113088", "DCM", "Edge enhancement")],
        Manufacturer=manufacturer,
    )


@pytest.mark.parametrize(
    "tool",
    [("dcmcjpeg", "+eb"), ("dcmcjpls", "+en"), pytest.param(GDCM_LOSSY[0], marks=needs_gdcm)],
    ids=lambda tool: " ".join(tool),
)
def test_a_processed_image_compressed_afterwards_stays_excluded(
    cards, chest_pa, tool, tmp_path
) -> None:
    """Both tools replace the Derivation Code Sequence (and gdcm the description) with the
    compression's alone; what is left of the earlier derivation still keeps the image out."""
    for name, image in {
        "secondary": _bone_suppressed(chest_pa, "Vendor"),
        "secondary, nothing recorded": _copy(
            chest_pa, ImageType=["DERIVED", "SECONDARY"], Manufacturer="Vendor"
        ),
    }.items():
        lossy = compressed(image, tool, tmp_path / name)
        assert [(c.CodeValue,) for c in lossy.DerivationCodeSequence] == [("113040",)], name
        assert not image_facts(lossy).derived_by_lossy_compression_only, name
        assert selected(cards, lossy) == [], name
    # A vendor's processed image that says PRIMARY: dcmtk keeps its description in brackets.
    if tool[0].startswith("dcmc"):
        processed = _copy(
            chest_pa,
            ImageType=["DERIVED", "PRIMARY"],
            DerivationDescription="Vendor processing",
            DerivationCodeSequence=[_code("113088", "DCM", "Edge enhancement")],
        )
        lossy = compressed(processed, tool, tmp_path / "primary")
        assert lossy.DerivationDescription.endswith("[Vendor processing]")
        assert selected(cards, lossy) == []


def test_the_nodes_own_derived_image_compressed_by_a_pacs_is_never_selected(
    cards, chest_pa, tmp_path
) -> None:
    algorithm = Algorithm(name="cxr-bone-suppression-demo", version="1.0.0")
    derived = build_derived(
        DerivedImage(chest_pa, chest_pa.pixel_array * 0.9, "bone suppression"), algorithm
    )
    lossy = compressed(derived, ("dcmcjpeg", "+eb"), tmp_path)
    assert instance_facts(lossy).own_result  # ingest knows it: no new analysis
    assert selected(cards, lossy) == []
    everything = SelectionRules(excluded_image_types=[], excluded_presentation_intents=[])
    assert not rules_match(everything, image_facts(lossy))
    # Without its Manufacturer it is still a secondary image, derived before compression.
    anonymous = _copy(lossy, Manufacturer="PACS")
    assert not image_facts(anonymous).derived_by_lossy_compression_only
    assert selected(cards, anonymous) == []


# The rule on headers as other writers may leave them ---------------------------------------


@pytest.fixture(scope="module")
def jpeg_baseline(chest_pa, tmp_path_factory) -> Dataset:
    return compressed(chest_pa, ("dcmcjpeg", "+eb"), tmp_path_factory.mktemp("jpeg"))


def _admitted(ds: Dataset) -> bool:
    return rules_match(CXR_DERIVED_EXCLUDED, image_facts(ds))


def test_either_the_code_or_the_description_says_lossy_compression(jpeg_baseline) -> None:
    assert _admitted(jpeg_baseline)
    without_code = copy.deepcopy(jpeg_baseline)
    del without_code.DerivationCodeSequence
    assert _admitted(without_code)
    without_description = copy.deepcopy(jpeg_baseline)
    del without_description.DerivationDescription
    assert _admitted(without_description)
    neither = copy.deepcopy(without_code)
    del neither.DerivationDescription
    assert not _admitted(neither)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda ds: setattr(ds, "LossyImageCompression", "00"), id="not lossy"),
        pytest.param(lambda ds: delattr(ds, "LossyImageCompression"), id="lossy not said"),
        pytest.param(lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY"]), id="secondary"),
        pytest.param(lambda ds: setattr(ds, "ImageType", ["DERIVED"]), id="no value 2"),
        pytest.param(
            lambda ds: ds.DerivationCodeSequence.append(_code("113076", "DCM", "Segmentation")),
            id="another code as well",
        ),
        pytest.param(
            lambda ds: setattr(
                ds, "DerivationCodeSequence", [_code("113040", "99LOCAL", "Lossy Compression")]
            ),
            id="code of another scheme",
        ),
        pytest.param(
            lambda ds: setattr(ds, "DerivationDescription", "Lossy compression; bone suppressed"),
            id="description says more",
        ),
        pytest.param(
            lambda ds: setattr(
                ds, "DerivationDescription", ds.DerivationDescription + " [MIP of 3 images]"
            ),
            id="description names an earlier derivation",
        ),
        pytest.param(
            lambda ds: setattr(
                ds.SourceImageSequence[0],
                "PurposeOfReferenceCodeSequence",
                [_code("121322", "DCM", "Source image for image processing operation")],
            ),
            id="source image of processing",
        ),
        pytest.param(
            lambda ds: setattr(ds, "DerivationCodeSequence", [Dataset()]), id="empty code item"
        ),
        pytest.param(
            lambda ds: setattr(ds, "ImageType", ["DERIVED", "PRIMARY", "LOCALIZER"]),
            id="a localizer stays a localizer",
        ),
    ],
)
def test_anything_beyond_lossy_compression_keeps_the_image_derived(
    jpeg_baseline, change: Callable[[Dataset], None]
) -> None:
    ds = copy.deepcopy(jpeg_baseline)
    change(ds)
    assert not _admitted(ds)


def test_lossy_originals_and_uncompressed_images_are_unchanged(chest_pa) -> None:
    """An image compressed lossy by its modality (ORIGINAL, 01) was selected before too."""
    modality_lossy = _copy(chest_pa, LossyImageCompression="01")
    assert not image_facts(modality_lossy).derived_by_lossy_compression_only
    assert _admitted(modality_lossy)
    assert _admitted(chest_pa)
    assert not _admitted(_copy(chest_pa, ImageType=["DERIVED", "PRIMARY"]))


def test_the_report_says_when_it_was_made_on_lossy_compressed_images(chest_pa) -> None:
    lossy = _copy(chest_pa, LossyImageCompression="01")
    assert lossy_note([chest_pa]) == ""
    assert lossy_note([lossy]) == "The image analysed was lossy-compressed."
    assert lossy_note([lossy, chest_pa]) == "1 of the 2 images analysed was lossy-compressed."
    assert lossy_note([lossy, lossy]) == "The 2 images analysed were lossy-compressed."


# End to end: a real Worker with the repository's chest cards ---------------------------------


def _analyse(worker: Worker, sessions: sessionmaker[Session], study_id: int) -> None:
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    while worker.run_once():
        pass


def _report_notes(
    sessions: sessionmaker[Session], study_id: int
) -> dict[str, list[tuple[str, set[str]]]]:
    """The study's SRs by model: each one's comment (the notice) and the images it reports
    on."""
    notes: dict[str, list[tuple[str, set[str]]]] = {}
    with sessions() as session:
        rows = session.scalars(
            select(ResultObject).where(ResultObject.study_id == study_id, ResultObject.kind == "sr")
        ).all()
        for row in rows:
            sr = pydicom.dcmread(row.path)
            comment = next(
                item.TextValue
                for item in sr.ContentSequence
                if item.ValueType == "CONTAINER"
                for item in item.get("ContentSequence", [])
                if item.ValueType == "TEXT"
                and item.ConceptNameCodeSequence[0].CodeValue == "121106"
            )
            images = {
                ref.ReferencedSOPInstanceUID
                for series in sr.CurrentRequestedProcedureEvidenceSequence[
                    0
                ].ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence
            }
            notes.setdefault(row.model_name, []).append((comment, images))
    return notes


@pytest.mark.parametrize(
    "tool", [("dcmcjpeg", "+eb"), ("dcmcjpls", "+en")], ids=lambda tool: " ".join(tool)
)
def test_a_radiograph_compressed_on_the_way_gets_ai_findings_and_the_nodes_derived_image_none(
    sessions: sessionmaker[Session], tmp_path: Path, cards: list[ModelCard], tool: tuple[str, ...]
) -> None:
    chest_cards = [card for card in cards if card.model.name.startswith("cxr-")]
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"threads": 1})
    worker = Worker(settings, sessions, chest_cards)
    original, _ = make_cxr(951_001, pneumothorax=True, size=256)
    lossy = compressed(original, tool, tmp_path / "sent")
    with sessions() as session:
        study_id, _ = spool_and_index(session, settings.storage_path, lossy)
    _analyse(worker, sessions, study_id)

    with sessions() as session:
        study = session.get(Study, study_id)
        assert study.analysis_status == "analysed", study.analysis_error
        assert "no AI finding model applies" not in study.reason
        assert study.reason.startswith("AI"), study.reason
        models = set(
            session.scalars(select(FindingRow.model_name).where(FindingRow.study_id == study_id))
        )
        derived = session.scalars(
            select(ResultObject).where(
                ResultObject.study_id == study_id, ResultObject.kind == "derived"
            )
        ).one()
        derived_path = Path(derived.path)
    assert {"cxr-pneumothorax-demo", "cxr-findings-demo", "cxr-triage-demo"} <= models
    notes = _report_notes(sessions, study_id)
    (comment, images), *_ = notes["cxr-pneumothorax-demo"]
    assert images == {str(lossy.SOPInstanceUID)}
    assert comment.endswith("The image analysed was lossy-compressed.")
    # The report and the derived image made from a lossy-compressed source are valid.
    with sessions() as session:
        written = session.scalars(
            select(ResultObject.path).where(
                ResultObject.study_id == study_id, ResultObject.kind.in_(("sr", "derived"))
            )
        ).all()
    for path in written:
        assert dciodvfy_errors(pydicom.dcmread(path)) == [], path

    # The node's derived image (bone suppression) comes back from the PACS, lossy-compressed
    # too, with a late radiograph: the study is analysed again, on the two radiographs only.
    routed = compressed(pydicom.dcmread(derived_path), ("dcmcjpeg", "+eb"), tmp_path / "back")
    assert [str(v) for v in routed.ImageType][:2] == ["DERIVED", "SECONDARY"]
    with sessions() as session:
        assert spool_and_index(session, settings.storage_path, routed)[0] == study_id
        late = spool_late_instance(session, settings.storage_path, study_id, 951_002)
    _analyse(worker, sessions, study_id)
    latest = max(
        _report_notes(sessions, study_id)["cxr-pneumothorax-demo"], key=lambda note: len(note[1])
    )
    assert latest[1] == {str(lossy.SOPInstanceUID), late}
    assert latest[0].endswith("1 of the 2 images analysed was lossy-compressed.")


def test_a_lossy_copy_sent_with_its_original_is_not_analysed_twice(
    sessions: sessionmaker[Session], tmp_path: Path, cards: list[ModelCard]
) -> None:
    """An archive sends a radiograph and the lossy-compressed copy it made (dcmcjpeg: a new
    SOP Instance UID, the original named as its uncompressed predecessor): the original is
    analysed, the copy left out (before, both were: two sets of findings and result objects
    for one picture). Where the original cannot be decoded, the copy is analysed instead."""
    from dicomnode.pipeline.analyse import load_images

    pneumothorax = [card for card in cards if card.model.name == "cxr-pneumothorax-demo"]
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"threads": 1})
    worker = Worker(settings, sessions, pneumothorax)
    original, _ = make_cxr(951_011, pneumothorax=True, size=256)
    lossy = compressed(original, ("dcmcjpeg", "+eb"), tmp_path / "sent")
    assert str(lossy.SOPInstanceUID) != str(original.SOPInstanceUID)
    with sessions() as session:
        study_id, original_path = spool_and_index(session, settings.storage_path, original)
        assert spool_and_index(session, settings.storage_path, lossy)[0] == study_id
    _analyse(worker, sessions, study_id)

    [(_, images)] = _report_notes(sessions, study_id)["cxr-pneumothorax-demo"]
    assert images == {str(original.SOPInstanceUID)}
    with sessions() as session:
        overlays = session.scalars(
            select(ResultObject.path).where(
                ResultObject.study_id == study_id, ResultObject.kind == "overlay"
            )
        ).all()
        assert len(overlays) == 1
        study = session.get(Study, study_id)
        assert (study.image_count, study.unreadable_image_count) == (1, 0)

        # A copy of the copy (compressed again on the way): left out too.
        again = copy.deepcopy(lossy)
        again.SOPInstanceUID = generate_uid()
        again.file_meta.MediaStorageSOPInstanceUID = again.SOPInstanceUID
        again.SourceImageSequence[0].ReferencedSOPInstanceUID = lossy.SOPInstanceUID
        spool_and_index(session, settings.storage_path, again)
        images, undecodable, _ = load_images(session, study)
        assert [str(ds.SOPInstanceUID) for ds in images] == [str(original.SOPInstanceUID)]

        # The original's pixel data cut short: the copy is what can be read, and stands in
        # for it (the picture is analysed: no image counts as unreadable).
        broken = pydicom.dcmread(original_path)
        broken.PixelData = broken.PixelData[:100]
        broken.save_as(original_path)
        images, undecodable, _ = load_images(session, study)
    assert [str(ds.SOPInstanceUID) for ds in images] == [str(lossy.SOPInstanceUID)]
    assert undecodable == []


def test_the_objects_of_a_lossy_copy_are_withdrawn_when_its_original_arrives(
    sessions: sessionmaker[Session], tmp_path: Path, cards: list[ModelCard]
) -> None:
    """The lossy copy arrives first and is analysed (its overlay, the SR and KOS on it); its
    original arrives later: the study is analysed on the original, and the copy's objects,
    which no analysis makes any more, are withdrawn (superseded) with the earlier SR and KOS.
    Before, the copy's overlay stayed among the study's results, beside the original's."""
    from conftest import referenced_uids

    pneumothorax = [card for card in cards if card.model.name == "cxr-pneumothorax-demo"]
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"threads": 1})
    worker = Worker(settings, sessions, pneumothorax)
    original, _ = make_cxr(951_021, pneumothorax=True, size=256)
    lossy = compressed(original, ("dcmcjpeg", "+eb"), tmp_path / "sent")
    with sessions() as session:
        study_id, _ = spool_and_index(session, settings.storage_path, lossy)
    _analyse(worker, sessions, study_id)
    with sessions() as session:
        assert str(lossy.SOPInstanceUID) in referenced_uids(session, study_id)
        first = set(session.scalars(select(ResultObject.path)))

    with sessions() as session:
        assert spool_and_index(session, settings.storage_path, original)[0] == study_id
    _analyse(worker, sessions, study_id)
    with sessions() as session:
        referenced = referenced_uids(session, study_id)
        kinds = sorted(session.scalars(select(ResultObject.kind)))
        now = set(session.scalars(select(ResultObject.path)))
    assert str(original.SOPInstanceUID) in referenced
    assert str(lossy.SOPInstanceUID) not in referenced
    assert kinds.count("sr") == 1 and kinds.count("kos") == 1
    assert not any(Path(path).exists() for path in first - now)  # withdrawn files removed


def test_no_object_is_withdrawn_while_an_image_cannot_be_decoded(
    sessions: sessionmaker[Session], tmp_path: Path, cards: list[ModelCard]
) -> None:
    """A study analysed whole; one of its images can no longer be decoded (a file damaged,
    or a worker on a host without the decoder another had) when late images bring a new
    analysis: that image's earlier objects stay; only an analysis that read every image
    withdraws what its models no longer make."""
    from conftest import referenced_uids

    pneumothorax = [card for card in cards if card.model.name == "cxr-pneumothorax-demo"]
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"threads": 1})
    worker = Worker(settings, sessions, pneumothorax)
    first, _ = make_cxr(951_031, pneumothorax=True, size=256)
    with sessions() as session:
        study_id, first_path = spool_and_index(session, settings.storage_path, first)
    _analyse(worker, sessions, study_id)
    with sessions() as session:
        assert str(first.SOPInstanceUID) in referenced_uids(session, study_id)

    broken = pydicom.dcmread(first_path)
    broken.PixelData = broken.PixelData[:100]
    broken.save_as(first_path)
    with sessions() as session:
        late = spool_late_instance(session, settings.storage_path, study_id, 951_032)
    _analyse(worker, sessions, study_id)
    with sessions() as session:
        referenced = referenced_uids(session, study_id)
    assert late in referenced
    assert str(first.SOPInstanceUID) in referenced  # its overlay stays
