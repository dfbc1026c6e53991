"""The results job: after the triage commit, on SQLite and PostgreSQL, with a real model.

A worker keeps a thread for triage while others write results and exports; the analysis is
handed to the results job in memory (bounded) or recomputed; a worker that dies after the
triage commit leaves its results to another once the lease expires; a results job that
cannot be written leaves the study analysed, with the reason on the job and the study page.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import referenced_uids, spool_and_index, spool_late_instance, wait_for
from dciodvfy import dciodvfy_errors
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Destination, Settings, WorklistSettings
from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.db.session import as_utc, utcnow
from dicomnode.ingest.assembly import queue_ready_studies
from dicomnode.jobs.queue import POSTPONE_SECONDS, claim, enqueue
from dicomnode.models.registry import load_card
from dicomnode.pipeline.handover import Handover, array_bytes
from dicomnode.synth.cxr import make_cxr
from dicomnode.web.study_view import study_detail
from dicomnode.worker import Worker

REPO = Path(__file__).resolve().parent.parent
PNEUMOTHORAX = REPO / "models" / "cxr_pneumothorax_demo.toml"


def test_handover_keeps_what_fits_and_first_drops_entries_no_longer_waiting() -> None:
    handover = Handover(max_bytes=100)
    assert handover.put(1, "first", 60)
    assert not handover.put(2, "second", 60)  # does not fit; nothing says job 1 is gone
    assert not handover.put(3, "too big", 101)
    # Job 1 was claimed by another process: its entry makes room for job 4.
    assert handover.put(4, "fourth", 60, still_queued=lambda ids: set())
    assert (len(handover), handover.nbytes) == (1, 60)
    assert handover.take(1) is None and handover.take(4) == "fourth"
    assert (len(handover), handover.nbytes) == (0, 0)


def test_array_bytes_counts_each_buffer_once_through_views_and_partials() -> None:
    from functools import partial

    outputs = np.zeros((4, 3, 16, 16), np.float32)
    maps = [partial(np.mean, outputs[0, label]) for label in range(3)]
    ds, _ = make_cxr(1, size=64)
    ds.pixel_array  # noqa: B018 - decoded and cached on the dataset, as the models leave it
    expected = outputs.nbytes + len(ds.PixelData) + ds.pixel_array.nbytes
    assert array_bytes([maps, {"source": ds}, ds]) == expected


def _settings(tmp_path: Path, **worker) -> Settings:
    return Settings(
        storage={"path": tmp_path / "storage"},
        worker={"threads": 1, **worker},
        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)],
    )


def _study(sessions: sessionmaker[Session], settings: Settings, seed: int) -> int:
    with sessions() as session:
        ds, _ = make_cxr(seed, pneumothorax=True)
        study_id, _ = spool_and_index(session, settings.storage_path, ds)
        enqueue(session, "analyse", study_id, {"generation": 1})
        session.commit()
    return study_id


def _jobs(session: Session, study_id: int, kind: str) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.study_id == study_id, Job.kind == kind).order_by(Job.id)
        )
    )


def _claimed(worker: Worker, session: Session) -> Job | float:
    """The job the worker claims first (those claimed with it stay leased to it), or the
    seconds until one is due."""
    claimed = worker._claim_together(session)
    return claimed if isinstance(claimed, float) else claimed[0]


def test_worker_keeps_a_thread_free_for_triage(sessions, tmp_path: Path) -> None:
    worker = Worker(_settings(tmp_path, threads=2), sessions, cards=[])
    assert worker.background_limit() == 1
    with sessions() as session:
        study_id = _study(sessions, worker.settings, 940_001)
        analyse = _jobs(session, study_id, "analyse")[0]
        analyse.state = "done"
        results = enqueue(session, "results", study_id, {"instances_up_to": 1})
        session.flush()
        export = enqueue(session, "export", study_id, {"result_id": 0, "destination": "pacs"})
        session.commit()
        # Exports before results, though the results job is older; the slot is held while
        # the export runs.
        assert _claimed(worker, session).id == export.id
        # Nothing it may take (the results job waits for the slot): no triage job is queued.
        assert _claimed(worker, session) == math.inf
        notify = enqueue(session, "notify", study_id, {})
        session.commit()
        assert _claimed(worker, session).id == notify.id  # triage work still finds a thread
        worker._release_background()  # the export ended
        assert _claimed(worker, session).id == results.id
    assert Worker(_settings(tmp_path, threads=1), sessions, cards=[]).background_limit() == 1
    assert Worker(_settings(tmp_path, threads=4), sessions, []).background_limit() == 3
    configured = _settings(tmp_path, threads=4, background_threads=2)
    assert Worker(configured, sessions, []).background_limit() == 2


def test_results_of_a_worker_that_died_after_the_triage_commit_are_written_by_another(
    sessions, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    study_id = _study(sessions, settings, 940_011)
    first = Worker(settings, sessions, [card])
    first.owner = "host-a:1"
    assert first.run_once()  # the analysis: priority committed, results job queued
    second = Worker(settings, sessions, [card])  # made now: its making is no part of the lease
    second.owner = "host-b:2"
    with sessions() as session:
        study = session.get(Study, study_id)
        assert (study.analysis_status, study.tier) == ("analysed", "critical")
        (results,) = _jobs(session, study_id, "results")
        assert results.state == "queued" and len(first.handover) == 1
        # The first worker takes the results job and dies with its lease (and its memory).
        # (3 s: the look below comes within it however loaded the machine.)
        assert claim(session, first.owner, ["results"], 3.0).id == results.id
    del first

    assert not second.run_once()  # leased to the dead worker until the lease expires
    wait_for(second.run_once, timeout=30, interval=0.1, what="the results job taken over")
    with sessions() as session:
        (results,) = _jobs(session, study_id, "results")
        assert (results.state, results.attempts, results.lease_owner) == ("done", 2, "host-b:2")
        assert results.payload["seconds"]["recompute"] > 0  # nothing handed over
        kinds = sorted(
            session.scalars(select(ResultObject.kind).where(ResultObject.study_id == study_id))
        )
        assert kinds == ["kos", "overlay", "sr"]
        assert len(_jobs(session, study_id, "export")) == 3
        assert session.get(Study, study_id).tier == "critical"


def test_a_dead_results_job_leaves_the_study_analysed_with_its_reason_shown(
    sessions, tmp_path: Path, caplog
) -> None:
    settings = _settings(tmp_path, max_attempts=1)
    study_id = _study(sessions, settings, 940_021)
    # Result files cannot be written: where their folder should be is a file.
    settings.storage_path.mkdir(parents=True, exist_ok=True)
    (settings.storage_path / "results").write_text("not a folder")
    worker = Worker(settings, sessions, [load_card(PNEUMOTHORAX)])
    with caplog.at_level(logging.WARNING, logger="dicomnode.worker"):
        assert worker.run_once() and worker.run_once()
    with sessions() as session:
        study = session.get(Study, study_id)
        assert (study.analysis_status, study.tier, study.analysis_error) == (
            "analysed",
            "critical",
            "",
        )
        (results,) = _jobs(session, study_id, "results")
        assert results.state == "dead" and "Error" in results.last_error
        detail = study_detail(session, study.study_instance_uid, WorklistSettings())
        assert (detail.analysis_status, detail.results_state) == ("analysed", "dead")
        assert detail.results_error == results.last_error
        assert detail.result_groups == []
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        f"job {results.id} results study_id={study_id} dead" in r.getMessage() for r in logged
    )


def test_a_results_job_waits_for_a_newer_analysis_and_writes_when_it_fails(
    sessions, tmp_path: Path, monkeypatch
) -> None:
    settings = _settings(tmp_path, max_attempts=1)
    card = load_card(PNEUMOTHORAX)
    worker = Worker(settings, sessions, [card])
    with sessions() as session:
        ds, _ = make_cxr(940_031, pneumothorax=True)
        study_id, _ = spool_and_index(session, settings.storage_path, ds)
        assert queue_ready_studies(session, utcnow()) == [study_id]
    assert worker.run_once()  # the analysis: critical, its results job queued and handed over
    with sessions() as session:
        late = spool_late_instance(session, settings.storage_path, study_id, 940_032)
    # Instances arrived since the analysis: the results job waits (no attempt used, the
    # analysis kept in memory), and nothing is written yet.
    looked_at = utcnow()
    assert worker.run_once()
    with sessions() as session:
        (results,) = _jobs(session, study_id, "results")
        assert (results.state, results.attempts) == ("queued", 0)
        # Put back for POSTPONE_SECONDS (not "later than now": a loaded machine may take
        # that long to look).
        assert as_utc(results.run_after) >= looked_at + timedelta(seconds=POSTPONE_SECONDS)
        assert session.scalars(select(ResultObject)).all() == []
    assert len(worker.handover) == 1

    # The newer analysis is queued and dies (e.g. out of memory): the study keeps the
    # findings and priority of the first, and gets that analysis's result objects.
    def dies(*args, **kwargs):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr("dicomnode.worker.analyse_study", dies)
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    assert worker.run_once()
    time.sleep(POSTPONE_SECONDS)
    assert worker.run_once()
    with sessions() as session:
        study = session.get(Study, study_id)
        assert (study.analysis_status, study.tier) == ("failed", "critical")
        (results,) = _jobs(session, study_id, "results")
        assert (results.state, results.attempts) == ("done", 1)
        assert "recompute" not in results.payload["seconds"]  # handed over, kept while it waited
        kinds = session.scalars(select(ResultObject.kind).where(ResultObject.study_id == study_id))
        assert sorted(kinds) == ["kos", "overlay", "sr"]
        referenced = referenced_uids(session, study_id)
        assert str(ds.SOPInstanceUID) in referenced and late not in referenced
        assert len(_jobs(session, study_id, "export")) == 3


def test_late_images_give_a_new_report_that_names_the_earlier_one_its_predecessor(
    sessions, tmp_path: Path
) -> None:
    """A report's SOP Instance UID names one content: analysed again with a late image, the
    study gets a new SR (and KOS) instance, not new content under the old UID (a PACS that
    holds the old one keeps it: Orthanc ignores a UID it has). The new SR names the old one
    in its Predecessor Documents Sequence; the node keeps only the new rows and files."""
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"threads": 1})
    card = load_card(PNEUMOTHORAX)
    worker = Worker(settings, sessions, [card])

    def analysed_results() -> dict[str, ResultObject]:
        with sessions() as session:
            assert queue_ready_studies(session, utcnow()) == [study_id]
        while worker.run_once():
            pass
        with sessions() as session:
            rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id))
            return {row.kind: row for row in rows if row.kind in ("sr", "kos")}

    with sessions() as session:
        ds, _ = make_cxr(940_041, pneumothorax=True)
        study_id, _ = spool_and_index(session, settings.storage_path, ds)
    first = analysed_results()
    with sessions() as session:
        late = spool_late_instance(session, settings.storage_path, study_id, 940_042)
    second = analysed_results()

    assert set(first) == set(second) == {"sr", "kos"}
    for kind in ("sr", "kos"):
        assert second[kind].sop_instance_uid != first[kind].sop_instance_uid
        assert not Path(first[kind].path).exists()
    report = pydicom.dcmread(second["sr"].path)
    [predecessors] = report.PredecessorDocumentsSequence
    assert predecessors.StudyInstanceUID == ds.StudyInstanceUID
    [series] = predecessors.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first["sr"].series_instance_uid
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [
        first["sr"].sop_instance_uid
    ]
    evidence = {
        r.ReferencedSOPInstanceUID
        for item in report.CurrentRequestedProcedureEvidenceSequence
        for s in item.ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID), late}
    assert dciodvfy_errors(report) == []
    # Analysed again with nothing new: the same instances (a re-run never duplicates).
    with sessions() as session:
        session.get(Study, study_id).received_generation += 1
        session.commit()
    third = analysed_results()
    assert {k: r.sop_instance_uid for k, r in third.items()} == {
        k: r.sop_instance_uid for k, r in second.items()
    }


def test_a_failed_job_quoting_the_patient_is_logged_and_recorded_without_them(
    sessions, tmp_path: Path, caplog, monkeypatch
) -> None:
    """An error may quote a value it refused: the worker's log line, the job's last error and
    the study's analysis error name no patient, ID or accession number."""
    import dicomnode.worker as worker_module

    settings = _settings(tmp_path, max_attempts=1)
    study_id = _study(sessions, settings, 940_031)
    with sessions() as session:
        study = session.get(Study, study_id)
        name, patient_id, accession = study.patient_name, study.patient_id, study.accession_number
    assert name and patient_id and accession

    def refuses(*args, **kwargs):
        raise ValueError(f"cannot read {name} ({patient_id}, accession {accession})")

    monkeypatch.setattr(worker_module, "analyse_study", refuses)
    worker = Worker(settings, sessions, [load_card(PNEUMOTHORAX)])
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        assert worker.run_once()
    with sessions() as session:
        (job,) = _jobs(session, study_id, "analyse")
        study = session.get(Study, study_id)
        recorded = [job.last_error, study.analysis_error]
    assert job.state == "dead" and "<patient data>" in recorded[0]
    for text in [*recorded, caplog.text]:
        assert "cannot read" in text
        for secret in (patient_id, accession, *name.split("^")):
            if len(secret) >= 3:
                assert secret not in text, secret


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_result_files_are_written_before_the_rows_take_the_write_lock(
    sessions, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a write transaction holds the writers' lock (the index writer's, the other
    workers'): the results job writes every file before it adds the first row, so another
    writer can take the lock while the files are written."""
    import sqlite3

    from dicomnode.results import job as results_job

    settings = _settings(tmp_path)
    worker = Worker(settings, sessions, [load_card(PNEUMOTHORAX)])
    _study(sessions, settings, 940_021)
    assert worker.run_once()  # the analysis; the results job (SR, overlay, KOS) is queued
    database = db_url.removeprefix("sqlite:///")
    taken: list[bool] = []
    real_write = results_job._write_result

    def write_and_try_the_lock(path: Path, ds: pydicom.Dataset) -> Path:
        written = real_write(path, ds)
        other = sqlite3.connect(database, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            taken.append(True)
        except sqlite3.OperationalError:  # database is locked
            taken.append(False)
        finally:
            other.close()
        return written

    monkeypatch.setattr(results_job, "_write_result", write_and_try_the_lock)
    assert worker.run_once()
    assert len(taken) == 3 and all(taken), taken
