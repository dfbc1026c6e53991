"""A results job where one model's run or one result builder raises: the study still gets every
other result object written and exported; what was not written is logged at ERROR without patient
data, counted in dicomnode_result_objects_failed_total and named on the job, which ends done.
Errors that mean the job cannot run now (disk, database) still fail the whole job."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import spool_and_index
from prometheus_client import REGISTRY
from sqlalchemy import select

from dicomnode.config import Destination, Settings
from dicomnode.db.models import Job, ResultObject
from dicomnode.models.registry import load_card
from dicomnode.pipeline.analyse import analyse_study
from dicomnode.pipeline.presentation_values import presentation_pixels
from dicomnode.pipeline.runtime import Runtime
from dicomnode.results import gsps
from dicomnode.results.job import write_results
from dicomnode.synth.cxr import make_cxr

MODELS = Path(__file__).resolve().parent.parent / "models"
NAME, PATIENT_ID, BIRTH_DATE = "Partialprobe^Yolanda", "PART-55102", "19420311"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"])


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        storage={"path": tmp_path / "storage"},
        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)],
    )


def _failed_count(model: str, kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "dicomnode_result_objects_failed_total", {"model": model, "kind": kind}
    )
    return value or 0.0


def _nodule_study(seed: int = 7):
    ds, _ = make_cxr(seed, findings=["nodule"], patient_id=PATIENT_ID)
    ds.PatientName, ds.PatientBirthDate = NAME, BIRTH_DATE
    return ds


def _analyse_and_write(session, settings: Settings, cards, runtime, study_id: int):
    """The analyse job, then its results job as the worker runs it; the results job's row."""
    analyse_study(session, settings, cards, runtime, study_id)
    job = session.scalars(select(Job).where(Job.study_id == study_id, Job.kind == "results")).one()
    times = write_results(
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
    return job, times


def _written(session, study_id: int) -> list[tuple[str, str]]:
    rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id))
    return sorted((r.model_name, r.kind) for r in rows)


def _exported(session, study_id: int) -> list[tuple[str, str]]:
    rows = {r.id: (r.model_name, r.kind) for r in session.scalars(select(ResultObject))}
    jobs = session.scalars(select(Job).where(Job.kind == "export", Job.study_id == study_id))
    return sorted(rows[job.payload["result_id"]] for job in jobs)


def test_a_builder_that_raises_leaves_out_its_object_only(
    sessions, tmp_path: Path, runtime, monkeypatch, caplog
) -> None:
    settings = _settings(tmp_path)
    cards = [
        load_card(MODELS / "cxr_nodule_demo.toml"),
        load_card(MODELS / "cxr_findings_demo.toml"),
    ]

    def refuses(evaluation, algorithm, **options):
        # As a library may quote a value it refuses: the log must not repeat it.
        source = evaluation.source
        raise ValueError(
            f"cannot present {source.PatientName} ({source.PatientID}, born "
            f"{source.PatientBirthDate}): unsupported window"
        )

    monkeypatch.setattr(gsps, "build_gsps", refuses)
    before = _failed_count("cxr-nodule-demo", "gsps")
    with sessions() as session, caplog.at_level(logging.INFO, logger="dicomnode"):
        study_id = spool_and_index(session, settings.storage_path, _nodule_study())[0]
        job, times = _analyse_and_write(session, settings, cards, runtime, study_id)
        written = _written(session, study_id)
        exported = _exported(session, study_id)

    # Every other object of both models: the nodule model's SR and overlay, the findings'.
    assert ("cxr-nodule-demo", "sr") in written and ("cxr-nodule-demo", "overlay") in written
    assert ("cxr-findings-demo", "sr") in written and ("cxr-findings-demo", "overlay") in written
    assert "gsps" not in {kind for _, kind in written}
    assert exported == written
    assert _failed_count("cxr-nodule-demo", "gsps") == before + 1
    # Visible: the job says what was not written (it is done: a retry would fail alike).
    (entry,) = job.payload["not_written"]
    assert (entry["model"], entry["kind"]) == ("cxr-nodule-demo", "gsps")
    assert "unsupported window" in job.last_error and "cxr-nodule-demo gsps" in job.last_error
    assert "cxr-nodule-demo gsps" in times.note
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    (line,) = errors
    assert "cxr-nodule-demo" in line and "gsps" in line and "unsupported window" in line
    assert f"study_id={study_id}" in line
    for secret in (NAME, "Partialprobe", "Yolanda", PATIENT_ID, BIRTH_DATE, "1942-03-11"):
        assert secret not in caplog.text
        assert secret not in job.last_error
        assert secret not in str(job.payload)


def _rgb_secondary_capture() -> object:
    """A chest DX shown as an RGB secondary capture (as some PACS forward them)."""
    ds, _ = make_cxr(5, size=256, patient_id=PATIENT_ID)
    ds.PatientName = NAME
    grey = (presentation_pixels(ds) * 255).astype(np.uint8)
    sc = copy.deepcopy(ds)
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.PlanarConfiguration = 3, "RGB", 0
    sc.BitsAllocated, sc.BitsStored, sc.HighBit = 8, 8, 7
    for keyword in (
        "WindowCenter",
        "WindowWidth",
        "WindowCenterWidthExplanation",
        "VOILUTFunction",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "PresentationLUTShape",
    ):
        if keyword in sc:
            delattr(sc, keyword)
    sc.PixelData = np.stack([grey, grey, grey], -1).tobytes()
    return sc


def _selecting_colour_images(path: Path):
    """The card as it was before selection kept colour images from image-to-image models."""
    card = load_card(path)
    selecting = card.model_copy(
        update={"select": card.select.model_copy(update={"monochrome_only": False})}
    )
    selecting.card_path = card.card_path
    return selecting


def test_a_model_that_cannot_run_on_an_image_leaves_the_other_models_results(
    sessions, tmp_path: Path, runtime, caplog
) -> None:
    """Bone suppression cannot correct an RGB image's stored values (its real run raises); the
    findings model reads the image's luma. The bone suppression card here selects colour images
    (as all cards did before ``monochrome_only``): its run fails alone."""
    settings = _settings(tmp_path)
    cards = [
        load_card(MODELS / "cxr_findings_demo.toml"),
        _selecting_colour_images(MODELS / "cxr_bone_suppression_demo.toml"),
    ]
    before = _failed_count("cxr-bone-suppression-demo", "run")
    with sessions() as session, caplog.at_level(logging.ERROR, logger="dicomnode"):
        study_id = spool_and_index(session, settings.storage_path, _rgb_secondary_capture())[0]
        job, _ = _analyse_and_write(session, settings, cards, runtime, study_id)
        written = _written(session, study_id)
        exported = _exported(session, study_id)

    assert written == [("cxr-findings-demo", "overlay"), ("cxr-findings-demo", "sr")]
    assert exported == written
    failed = [(e["model"], e["kind"]) for e in job.payload["not_written"]]
    assert failed == [("cxr-bone-suppression-demo", "run")]
    assert _failed_count("cxr-bone-suppression-demo", "run") == before + 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "cxr-bone-suppression-demo" in line and "its run failed" in line and "RGB" in line
    for secret in (NAME, "Partialprobe", "Yolanda", PATIENT_ID):
        assert secret not in caplog.text


def test_an_error_of_the_disk_still_fails_the_whole_job(
    sessions, tmp_path: Path, runtime, monkeypatch
) -> None:
    settings = _settings(tmp_path)
    cards = [load_card(MODELS / "cxr_nodule_demo.toml")]

    def disk_full(evaluation, algorithm, **options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gsps, "build_gsps", disk_full)
    with sessions() as session:
        study_id = spool_and_index(session, settings.storage_path, _nodule_study())[0]
        with pytest.raises(OSError, match="No space left"):
            _analyse_and_write(session, settings, cards, runtime, study_id)
        session.rollback()
        assert _written(session, study_id) == []
        assert _exported(session, study_id) == []


def test_the_worker_ends_a_partly_written_results_job_done_and_says_what_is_missing(
    sessions, tmp_path: Path, monkeypatch
) -> None:
    """Not retried (the same builder would raise again on the same study), not hidden."""
    from dicomnode.jobs.queue import enqueue
    from dicomnode.worker import Worker

    settings = Settings(
        storage={"path": tmp_path / "storage"},
        worker={"threads": 1},
        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)],
    )

    def refuses(evaluation, algorithm, **options):
        raise ValueError("unsupported window")

    monkeypatch.setattr(gsps, "build_gsps", refuses)
    with sessions() as session:
        study_id = spool_and_index(session, settings.storage_path, _nodule_study())[0]
        enqueue(session, "analyse", study_id, {"generation": 1})
        session.commit()
    worker = Worker(settings, sessions, [load_card(MODELS / "cxr_nodule_demo.toml")])
    assert worker.run_once() and worker.run_once()
    with sessions() as session:
        job = session.scalars(
            select(Job).where(Job.study_id == study_id, Job.kind == "results")
        ).one()
        assert (job.state, job.attempts) == ("done", 1)
        assert job.payload["seconds"]["results"] > 0  # the worker's stage times kept beside it
        assert [(e["model"], e["kind"]) for e in job.payload["not_written"]] == [
            ("cxr-nodule-demo", "gsps")
        ]
        assert job.last_error == "not written: cxr-nodule-demo gsps: ValueError: unsupported window"
        assert _written(session, study_id) == [
            ("cxr-nodule-demo", "overlay"),
            ("cxr-nodule-demo", "sr"),
        ]
        # The study view says which objects are missing, and that the others were written.
        from dicomnode.config import WorklistSettings
        from dicomnode.db.models import Study
        from dicomnode.web.study_view import study_detail

        uid = session.get(Study, study_id).study_instance_uid
        detail = study_detail(session, uid, WorklistSettings())
        assert (detail.results_state, detail.results_error) == (
            "done",
            "cxr-nodule-demo gsps: ValueError: unsupported window",
        )
        # So does its worklist row (the study's detail is its row and more).
        assert detail.results_incomplete
        assert [(m.model, m.kind) for m in detail.results_missing] == [("cxr-nodule-demo", "gsps")]
