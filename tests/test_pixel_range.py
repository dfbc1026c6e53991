"""Decoded values outside what an image's own header allows (decode.fit_bits_stored): a JPEG-LS
codestream scrambled behind intact headers decodes without an error (libjpeg) into noise
beyond Bits Stored; through the real analyse job it is not analysed, no result is written for
it and the study says why, while a valid JPEG-LS of the same phantom is analysed. Native data
with junk above High Bit is read as viewers read it (Bits Stored bits only); a few stray values
are clamped, more refuse the image; the web preview answers 422, not a noise picture."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import dcmtk, referenced_uids, spool_and_index
from pydicom.pixels import pixel_array
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from web_server import add_users, serve

from dicomnode.config import Destination, Settings
from dicomnode.db.models import FindingRow, Job, ResultObject, Study
from dicomnode.db.session import utcnow
from dicomnode.models.registry import load_card
from dicomnode.pipeline.analyse import analyse_study, mark_failed
from dicomnode.pipeline.decode import DecodeError, first_frame, fit_bits_stored
from dicomnode.pipeline.runtime import Runtime
from dicomnode.results.job import write_results
from dicomnode.synth.cxr import make_cxr
from dicomnode.web.app import create_app
from dicomnode.worklist.service import override, study_row

REPO = Path(__file__).resolve().parent.parent
PNEUMOTHORAX = REPO / "models" / "cxr_pneumothorax_demo.toml"
# A 512 px, 12-bit phantom whose scrambled JPEG-LS libjpeg decodes without an error into
# values up to 65507 (of many seeds tried, most scramble into errors, one into 12-bit noise).
SEED = 930_123


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"])


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        storage={"path": tmp_path / "storage"},
        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)],
    )


def _jpeg_ls(ds: pydicom.Dataset, folder: Path, name: str) -> Path:
    """``ds`` compressed by dcmtk's dcmcjpls (JPEG-LS lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    native, compressed = folder / f"{name}-native.dcm", folder / f"{name}.dcm"
    ds.save_as(native, enforce_file_format=True)
    subprocess.run([dcmtk("dcmcjpls"), str(native), str(compressed)], check=True)
    return compressed


def _scrambled(source: Path, target: Path) -> Path:
    """The acceptance test's corruption: from 200 bytes after the last SOI (FFD8) to 100 bytes
    before the end of the file, each byte b becomes (b * 7 + 13) & 0xFF; headers kept."""
    data = bytearray(source.read_bytes())
    start = data.rfind(b"\xff\xd8") + 200
    for index in range(start, len(data) - 100):
        data[index] = (data[index] * 7 + 13) & 0xFF
    target.write_bytes(bytes(data))
    return target


def _renamed(path: Path, study_uid: str | None = None) -> pydicom.Dataset:
    """The file's dataset under a new SOP Instance (and Series, and Study unless given) UID;
    its pixel data bytes are kept as they are."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


@pytest.fixture(scope="module")
def jpeg_ls(tmp_path_factory) -> tuple[Path, Path]:
    """(valid JPEG-LS, scrambled copy) of the phantom SEED."""
    folder = tmp_path_factory.mktemp("jpeg-ls")
    phantom, _ = make_cxr(SEED)
    assert int(phantom.BitsStored) == 12 and int(phantom.PixelRepresentation) == 0
    valid = _jpeg_ls(phantom, folder, "valid")
    scrambled = _scrambled(valid, folder / "scrambled.dcm")
    # What the finding was about: the codec raises nothing and returns values Bits Stored 12
    # cannot hold (if a codec upgrade makes it raise, this test no longer tests the check).
    raw = pixel_array(str(scrambled))
    assert raw.shape == (512, 512) and int(raw.max()) > 4095 and (raw > 4095).mean() > 0.5
    return valid, scrambled


def test_a_scrambled_jpeg_ls_image_is_not_analysed_and_its_study_says_why(
    sessions, tmp_path: Path, runtime, jpeg_ls
) -> None:
    valid, scrambled = jpeg_ls
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    storage = settings.storage_path
    with sessions() as session:
        good_id, _ = spool_and_index(session, storage, _renamed(valid))
        bad = _renamed(scrambled)
        bad_id, _ = spool_and_index(session, storage, bad)
        analyse_study(session, settings, [card], runtime, good_id)
        analyse_study(session, settings, [card], runtime, bad_id)

        good = session.get(Study, good_id)
        assert good.analysis_status == "analysed" and not good.analysis_error
        assert session.scalar(
            select(func.count(FindingRow.id)).where(FindingRow.study_id == good_id)
        )

        study = session.get(Study, bad_id)
        assert study.analysis_status == "failed"
        assert "does not decode to values within Bits Stored (12" in study.analysis_error
        assert "cannot be read" in study.analysis_error
        assert str(bad.SOPInstanceUID) in study.analysis_error
        assert study.reason.startswith("AI could not read the image(s)") and study.tier == "routine"
        # No finding, no results job, nothing to send to the PACS.
        assert not session.scalars(select(FindingRow).where(FindingRow.study_id == bad_id)).all()
        kinds = select(Job).where(Job.study_id == bad_id, Job.kind.in_(["results", "export"]))
        assert not session.scalars(kinds).all()
        assert not session.scalars(
            select(ResultObject).where(ResultObject.study_id == bad_id)
        ).all()


def test_the_worklist_row_says_the_ai_could_not_read_the_image_not_that_it_failed(
    sessions, tmp_path: Path, runtime, jpeg_ls
) -> None:
    """The scrambled image alone, through the real analyse job: the row's reason and its
    failure fields (API) say the AI could not read it, also after an override; a study
    failed otherwise (a dead analyse job) still reads "AI analysis failed"."""
    _, scrambled = jpeg_ls
    settings = _settings(tmp_path)
    tokens = add_users(sessions)
    with sessions() as session:
        bad = _renamed(scrambled)
        bad_id, _ = spool_and_index(session, settings.storage_path, bad)
        analyse_study(session, settings, [load_card(PNEUMOTHORAX)], runtime, bad_id)
        other = _renamed(scrambled)
        other_id, _ = spool_and_index(session, settings.storage_path, other)
        mark_failed(session, other_id, "RuntimeError: out of memory", settings.worklist)
    unreadable = "AI could not read the image(s) (corrupt or unsupported pixel data)"
    headers = {"Authorization": f"Bearer {tokens['dr_house']}"}
    with (
        serve(create_app(sessions)) as url,
        httpx.Client(base_url=url, headers=headers, timeout=30) as client,
    ):

        def rows() -> dict[str, dict]:
            response = client.get("/api/worklist")
            assert response.status_code == 200, response.text
            return {row["study_instance_uid"]: row for row in response.json()["rows"]}

        row, failed = rows()[bad.StudyInstanceUID], rows()[other.StudyInstanceUID]
        assert row["analysis_status"] == failed["analysis_status"] == "failed"
        assert row["reason"] == f"{unreadable}; read in arrival order"
        assert (row["analysis_failure"], row["analysis_failure_text"]) == ("unreadable", unreadable)
        assert failed["reason"] == "AI analysis failed; read in arrival order"
        assert failed["analysis_failure"] == "error"
        assert failed["analysis_failure_text"] == "AI analysis failed"
        # The study page keeps every image's reason.
        study = client.get(f"/api/studies/{bad.StudyInstanceUID}").json()
        assert "cannot be read" in study["analysis_error"]
        assert str(bad.SOPInstanceUID) in study["analysis_error"]
        # An override recomputes the priority from the stored study: the words stay.
        response = client.post(
            f"/api/studies/{bad.StudyInstanceUID}/override",
            json={"tier": "urgent", "reason": "ED called"},
        )
        assert response.status_code == 200, response.text
        row = rows()[bad.StudyInstanceUID]
        assert (
            row["priority"] == "urgent"
            and f"({unreadable}; read in arrival order)" in (row["reason"])
        )
        assert row["analysis_failure"] == "unreadable"


def test_beside_a_valid_image_the_scrambled_one_is_left_out_of_results(
    sessions, tmp_path: Path, runtime, jpeg_ls
) -> None:
    valid, scrambled = jpeg_ls
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    storage = settings.storage_path
    with sessions() as session:
        good = _renamed(valid)
        study_id, _ = spool_and_index(session, storage, good)
        bad = _renamed(scrambled, study_uid=str(good.StudyInstanceUID))
        assert spool_and_index(session, storage, bad)[0] == study_id
        analyse_study(session, settings, [card], runtime, study_id)
        study = session.get(Study, study_id)
        assert study.analysis_status == "analysed"
        assert str(bad.SOPInstanceUID) in study.analysis_error
        assert "cannot be read" in study.analysis_error
        (job,) = session.scalars(select(Job).where(Job.study_id == study_id, Job.kind == "results"))
        write_results(
            session,
            settings,
            [card],
            runtime,
            study_id,
            job.id,
            None,
            job.payload["instances_up_to"],
        )
        uids = referenced_uids(session, study_id)
        assert str(good.SOPInstanceUID) in uids and str(bad.SOPInstanceUID) not in uids


def test_beside_a_valid_image_the_row_says_the_ai_could_not_read_one_of_them(
    sessions, tmp_path: Path, runtime, jpeg_ls
) -> None:
    """The acceptance test's study (a scrambled image next to a valid one), through the real
    analyse job: the row's reason does not say "no finding above threshold" as if the AI had
    read both, also after an override and once it is cleared."""
    valid, scrambled = jpeg_ls
    settings = _settings(tmp_path)
    storage = settings.storage_path
    with sessions() as session:
        good = _renamed(valid)
        study_id, _ = spool_and_index(session, storage, good)
        bad = _renamed(scrambled, study_uid=str(good.StudyInstanceUID))
        assert spool_and_index(session, storage, bad)[0] == study_id
        analyse_study(session, settings, [load_card(PNEUMOTHORAX)], runtime, study_id)
        study = session.get(Study, study_id)
        assert study.analysis_status == "analysed" and study.tier == "routine"
        assert (study.image_count, study.unreadable_image_count) == (2, 1)
        analysed = (
            "AI: no finding above threshold in the images it could read; "
            "1 of 2 images could not be read"
        )
        assert study.reason == analysed
        uid = str(good.StudyInstanceUID)
        row = study_row(session, uid, settings.worklist)
        assert row.reason == analysed and row.analysis_failure == ""
        # An override recomputes the priority from the stored study: the words stay.
        override(session, uid, "dr_house", "urgent", "ED called", utcnow(), settings.worklist)
        assert study_row(session, uid, settings.worklist).reason == (
            f"override by dr_house: ED called ({analysed})"
        )
        override(session, uid, "dr_house", None, "done", utcnow(), settings.worklist)
        assert study_row(session, uid, settings.worklist).reason == analysed


def _with_high_bits(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` (16 allocated, 12 stored) with bits 12-15 set: an overlay plane in bit 15 over a
    block (as retired 60xx overlays in Pixel Data were) and junk in bits 12-14 everywhere."""
    stored = ds.pixel_array.astype(np.uint16)
    junk = np.random.default_rng(7).integers(0, 8, stored.shape, dtype=np.uint16) << 12
    high = stored | junk
    high[100:200, 100:300] |= np.uint16(1 << 15)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    changed = pydicom.dcmread(buffer)  # a copy without ds's decoded pixels
    changed.PixelData = high.tobytes()
    changed.StudyInstanceUID, changed.SeriesInstanceUID = generate_uid(), generate_uid()
    changed.SOPInstanceUID = changed.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return changed


def test_native_bits_above_high_bit_are_ignored_as_viewers_do(
    sessions, tmp_path: Path, runtime
) -> None:
    phantom, _ = make_cxr(930_124, pneumothorax=True)
    clean = phantom.pixel_array.copy()
    high = _with_high_bits(phantom)
    raw = np.frombuffer(high.PixelData, dtype="<u2").reshape(clean.shape)
    assert int(raw.max()) > 4095 and (raw > 4095).mean() > 0.5
    assert np.array_equal(first_frame(high), clean)

    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    with sessions() as session:
        clean_id, _ = spool_and_index(session, settings.storage_path, phantom)
        high_id, _ = spool_and_index(session, settings.storage_path, high)
        for study_id in (clean_id, high_id):
            analyse_study(session, settings, [card], runtime, study_id)
        probabilities = [
            [
                f.probability
                for f in session.scalars(select(FindingRow).where(FindingRow.study_id == s))
            ]
            for s in (clean_id, high_id)
        ]
        assert probabilities[0] and probabilities[0] == probabilities[1]
        assert session.get(Study, high_id).analysis_status == "analysed"


def _mislabelled_jpeg_ls(tmp_path: Path, outside: int) -> tuple[pydicom.Dataset, np.ndarray]:
    """A JPEG-LS image whose codestream holds 16-bit values, ``outside`` of them above 4095,
    with a header that says Bits Stored 12; and its values as encoded."""
    phantom, _ = make_cxr(930_125)
    values = phantom.pixel_array.astype(np.uint16)
    flat = values.reshape(-1)
    flat[np.random.default_rng(3).choice(flat.size, outside, replace=False)] = 5000
    phantom.PixelData = values.tobytes()
    phantom.BitsStored, phantom.HighBit = 16, 15
    path = _jpeg_ls(phantom, tmp_path, f"mislabelled-{outside}")
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    return ds, values


def test_a_few_stray_values_are_clamped_and_more_refuse_the_image(tmp_path: Path) -> None:
    few, values = _mislabelled_jpeg_ls(tmp_path, 200)  # 0.08 % of 512 x 512
    assert int(pixel_array(few).max()) == 5000
    assert np.array_equal(first_frame(few), np.minimum(values, 4095))
    assert int(few.pixel_array.max()) == 4095  # the array pydicom keeps for the dataset too

    many, _ = _mislabelled_jpeg_ls(tmp_path, 300)  # 0.11 %
    with pytest.raises(DecodeError, match=r"300 of 262144 values \(0\.1%\)") as error:
        first_frame(many)
    assert str(many.SOPInstanceUID) in str(error.value)
    assert "JPEG-LS" in str(error.value) and "corrupt or mis-labelled" in str(error.value)


def test_signed_values_are_checked_against_their_twos_complement_range() -> None:
    ds = pydicom.Dataset()
    ds.BitsStored, ds.PixelRepresentation = 12, 1
    inside = np.array([[-2048, 2047], [0, -1]], dtype=np.int16)
    assert fit_bits_stored(ds, inside.copy(), "image") is not None
    assert np.array_equal(fit_bits_stored(ds, inside.copy(), "image"), inside)
    with pytest.raises(DecodeError, match=r"signed: -2048\.\.2047"):
        fit_bits_stored(ds, np.array([[-2049, 0], [0, 0]], dtype=np.int16), "image")
    stray = np.zeros((100, 100), dtype=np.int16)
    stray[0, :10] = -3000  # 0.1 %: clamped
    assert int(fit_bits_stored(ds, stray, "image").min()) == -2048
    ds.PixelRepresentation = 0
    with pytest.raises(DecodeError, match=r"unsigned: 0\.\.4095"):
        fit_bits_stored(ds, np.array([[4096, 0]], dtype=np.uint16), "image")
    ds.BitsStored = 16  # fills the type: every value is allowed
    full = np.array([[65535, 0]], dtype=np.uint16)
    assert fit_bits_stored(ds, full, "image") is full


def test_the_preview_of_a_scrambled_image_is_a_422_naming_why(sessions, tmp_path, jpeg_ls) -> None:
    valid, scrambled = jpeg_ls
    tokens = add_users(sessions)
    storage = tmp_path / "storage"
    with sessions() as session:
        good = _renamed(valid)
        spool_and_index(session, storage, good)
        bad = _renamed(scrambled, study_uid=str(good.StudyInstanceUID))
        spool_and_index(session, storage, bad)
    headers = {"Authorization": f"Bearer {tokens['dr_house']}"}
    base = f"/api/studies/{good.StudyInstanceUID}/images"
    with (
        serve(create_app(sessions)) as url,
        httpx.Client(base_url=url, headers=headers, timeout=30) as client,
    ):
        assert client.get(f"{base}/{good.SOPInstanceUID}/preview.png").status_code == 200
        response = client.get(f"{base}/{bad.SOPInstanceUID}/preview.png")
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert "cannot be shown as an image" in detail and "Bits Stored (12" in detail
