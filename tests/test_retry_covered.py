"""Retrying a dead job whose work another job already covers (SQLite and PostgreSQL): an
export whose object a later results job queued again for the same destination, an analysis
after which the study was queued for analysis again. The retry is refused with the covering
job named (API: 409; CLI: said, exit 0), the dead job is left as it was and nothing is
audited; the object is not sent twice (a real worker, a real dcmtk storescp keeping every
copy it receives)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from conftest import (
    StoreSCP,
    spool_and_index,
    spool_late_instance,
    storescp,
    worker_config,
)
from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from test_results_reexport import PNEUMOTHORAX, _analyse_and_export, _received, _worker
from web_server import add_users, serve
from worklist_seed import add_result_object, add_study

from dicomnode.db.models import AuditEntry, Job, ResultObject, Study
from dicomnode.db.session import utcnow
from dicomnode.ingest.assembly import queue_ready_studies
from dicomnode.jobs.dead_letters import retry_dead
from dicomnode.jobs.queue import claim, complete, enqueue, fail
from dicomnode.results import job as results_job
from dicomnode.synth.cxr import make_cxr
from dicomnode.web.app import create_app
from dicomnode.worker import Worker


@pytest.fixture
def keeping_pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """A storescp that keeps each object it receives in a file of its own."""
    with storescp(tmp_path, "--accept-all", "--unique-filenames") as running:
        yield running


def _cli(config: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "jobs", *arguments, "--config", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _audited(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(
            select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "retry_job")
        )


def _admin(url: str, tokens: dict[str, str]) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {tokens['boss']}"}, timeout=10
    )


def _exported_but_one_overlay(
    worker: Worker, sessions: sessionmaker[Session]
) -> tuple[Dataset, int, int, int]:
    """A radiograph analysed and its result objects exported, but for an overlay whose export
    was dead-lettered before it was sent: the image, its study's id, the dead job's id and
    its result object's id."""
    with sessions() as session:
        ds, _ = make_cxr(951_301, pneumothorax=True)
        study_id, _ = spool_and_index(session, worker.settings.storage_path, ds)
        assert queue_ready_studies(session, utcnow()) == [study_id]
    while worker.run_once():
        with sessions() as session:
            if session.scalar(select(func.count()).where(Job.kind == "export")):
                break
    with sessions() as session:
        buried = next(
            job
            for job in session.scalars(select(Job).where(Job.kind == "export").order_by(Job.id))
            if session.get(ResultObject, job.payload["result_id"]).kind == "overlay"
        )
        buried.state, buried.attempts, buried.last_error = "dead", 5, "refused"
        buried_id, result_id = buried.id, buried.payload["result_id"]
        session.commit()
    while worker.run_once():
        pass
    return ds, study_id, buried_id, result_id


def test_a_dead_export_a_later_results_job_sent_is_not_sent_again_on_retry(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """A radiograph analysed, one overlay's export dead-lettered before it was sent; a late
    image: the second results job sends that overlay (a new export job). The admin then
    retries the old dead export, by the API and by the CLI: refused, naming the job that sent
    it; the destination has every object once."""
    worker = _worker(tmp_path, sessions, keeping_pacs, PNEUMOTHORAX)
    ds, study_id, buried_id, result_id = _exported_but_one_overlay(worker, sessions)
    with sessions() as session:
        spool_late_instance(session, worker.settings.storage_path, study_id, 951_302)
    _analyse_and_export(worker, sessions, study_id)
    with sessions() as session:
        [again] = [
            job.id
            for job in session.scalars(select(Job).where(Job.kind == "export", Job.id != buried_id))
            if job.payload["result_id"] == result_id and job.state == "done"
        ]
    covered = (
        f"job {buried_id} is not queued again: result object {result_id} was sent to 'pacs' "
        f"by export job {again}"
    )

    tokens = add_users(sessions)
    with serve(create_app(sessions)) as url, _admin(url, tokens) as admin:
        refused = admin.post(f"/api/jobs/{buried_id}/retry")
        # Whatever it answered, the worker runs what is queued: the destination must not get
        # the overlay a second time (before the fix, the retry queued it and it went again).
        while worker.run_once():
            pass
        received = _received(keeping_pacs, sessions)
        assert {uid: n for uid, n in received.items() if n > 1} == {}
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"] == covered
        # The study's page and worklist row do not say its export failed: it was sent.
        study_uid = str(ds.StudyInstanceUID)
        assert admin.get(f"/api/studies/{study_uid}").json()["export_errors"] == []
        rows = admin.get("/api/worklist").json()["rows"]
        assert [row["export_error"] for row in rows] == [""]
        # Still listed as dead, as it was, saying that it needs no retry and why.
        listed = {job["id"]: job for job in admin.get("/api/jobs").json()}
        assert (listed[buried_id]["covered_by"], listed[buried_id]["covered"]) == (
            again,
            covered.split(": ", 1)[1],
        )
        # What it sends, without reading its error.
        assert (listed[buried_id]["result_kind"], listed[buried_id]["sop_class"]) == (
            "overlay",
            "Secondary Capture Image Storage",
        )
    (tmp_path / "cli").mkdir()
    config = worker_config(tmp_path / "cli", db_url, "")
    for arguments in ((str(buried_id),), ("--all", "--destination", "pacs")):
        said = _cli(config, "retry", *arguments)
        assert said.returncode == 0, said.stderr
        assert said.stdout.splitlines() == [
            covered,
            "0 dead job(s) queued again, 1 already covered by other jobs",
        ]
    listed = _cli(config, "list")
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    assert line.startswith(
        f"{buried_id}\texport -> pacs (overlay: Secondary Capture Image Storage)\tdead\t"
    )
    assert line.endswith(f"\trefused\tno retry needed: {covered.split(': ', 1)[1]}")
    assert listed.stderr.strip() == "1 job(s) dead, 1 of them covered by other jobs"
    with sessions() as session:
        assert session.get(Job, buried_id).state == "dead"
    assert _audited(sessions) == 0

    while worker.run_once():
        pass
    received = _received(keeping_pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
    with sessions() as session:
        overlay = session.get(ResultObject, result_id).sop_instance_uid
    assert received[overlay] == 1


def _study(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        uid = add_study(session, "ACC-COVERED", now=utcnow(), probability=0.9)
        return session.scalar(select(Study.id).where(Study.study_instance_uid == uid))


def _job(
    session: Session, kind: str, study_id: int, state: str, payload: dict | None = None
) -> int:
    """A job of ``kind`` taken to ``state`` through the queue, as workers leave it."""
    job = enqueue(session, kind, study_id, payload)
    session.commit()
    if state == "queued":
        return job.id
    later = utcnow() + timedelta(hours=1)  # past any backoff
    claimed = claim(session, "test-worker", [kind], 60, now=later)
    assert claimed is not None and claimed.id == job.id
    if state == "done":
        complete(session, claimed)
    elif state == "dead":
        fail(session, claimed, f"{kind} failed", max_attempts=1)
    return job.id


def _result(session: Session, study_id: int) -> int:
    return add_result_object(session, study_id)


def test_a_dead_analysis_with_a_later_one_queued_or_done_is_not_retried(
    sessions: sessionmaker[Session],
) -> None:
    """An analysis dead-lettered, then the study queued for analysis again (late images): the
    later analysis reads the whole study, so retrying the dead one is refused (409, naming the
    later job) and the study's status is left as it is. A dead analysis after a done one is
    retried (the done one did not see its images)."""
    study_id = _study(sessions)
    with sessions() as session:
        dead = _job(session, "analyse", study_id, "dead")
        later = _job(session, "analyse", study_id, "queued")
        status_before = session.get(Study, study_id).analysis_status
    tokens = add_users(sessions)
    with serve(create_app(sessions)) as url, _admin(url, tokens) as admin:
        refused = admin.post(f"/api/jobs/{dead}/retry")
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"] == (
            f"job {dead} is not queued again: the study is queued to be analysed again by "
            f"analyse job {later}"
        )
        with sessions() as session:
            claimed = claim(session, "test-worker", ["analyse"], 60)
            assert claimed is not None and claimed.id == later
            complete(session, claimed)
        refused = admin.post(f"/api/jobs/{dead}/retry")
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"].endswith(
            f"the study was analysed again by analyse job {later}"
        )
        with sessions() as session:
            assert session.get(Job, dead).state == "dead"
            assert session.get(Study, study_id).analysis_status == status_before
        assert _audited(sessions) == 0
        # A dead analysis queued after the done one is not covered by it.
        with sessions() as session:
            newest = _job(session, "analyse", study_id, "dead")
        retried = admin.post(f"/api/jobs/{newest}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["state"] == "queued"
    assert _audited(sessions) == 1


def test_retry_all_queues_one_of_two_dead_exports_of_an_object(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    """Two dead exports of one object to one destination (dead-lettered, queued again by a
    later results job, dead-lettered again) and one of another object: ``jobs retry --all``
    queues the newer of the two and the other object's, and says the older is covered; by
    the API the older is then refused while the newer is queued."""
    study_id = _study(sessions)
    with sessions() as session:
        seven, eight = _result(session, study_id), _result(session, study_id)
    target = {"result_id": seven, "destination": "pacs"}
    with sessions() as session:
        older = _job(session, "export", study_id, "dead", target)
        newer = _job(session, "export", study_id, "dead", target)
        other = _job(
            session, "export", study_id, "dead", {"result_id": eight, "destination": "pacs"}
        )
        to_archive = _job(session, "export", study_id, "dead", {**target, "destination": "archive"})
    config = worker_config(tmp_path, db_url, "")
    said = _cli(config, "retry", "--all", "--destination", "pacs")
    assert said.returncode == 0, said.stderr
    assert said.stdout.splitlines() == [
        f"job {older} is not queued again: result object {seven} is queued to be sent to 'pacs' by "
        f"export job {newer}",
        "2 dead job(s) queued again, 1 already covered by other jobs",
    ]
    with sessions() as session:
        states = {job_id: session.get(Job, job_id).state for job_id in (older, newer, other)}
        assert states == {older: "dead", newer: "queued", other: "queued"}
        assert session.get(Job, to_archive).state == "dead"
    assert _audited(sessions) == 2
    listed = _cli(config, "list", "--destination", "pacs")
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == [str(older)]
    assert listed.stdout.rstrip("\n").endswith(f"by export job {newer}")
    tokens = add_users(sessions)
    with serve(create_app(sessions)) as url, _admin(url, tokens) as admin:
        dead = {job["id"]: job["covered_by"] for job in admin.get("/api/jobs").json()}
        assert dead == {older: newer, to_archive: None}
        refused = admin.post(f"/api/jobs/{older}/retry")
        assert refused.status_code == 409, refused.text
        assert f"export job {newer}" in refused.json()["detail"]
        # Another destination's export of the same object is not covered by it.
        assert admin.post(f"/api/jobs/{to_archive}/retry").status_code == 200
    assert _audited(sessions) == 3


def test_a_dead_export_retried_while_a_results_job_writes_is_sent_once(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admin retries the dead overlay export while the second results job (after a late
    image) writes its files, between its look at the study's exports and its commit: the
    results job queues no second export of that overlay, which the destination gets once."""
    worker = _worker(tmp_path, sessions, keeping_pacs, PNEUMOTHORAX)
    _, study_id, buried_id, result_id = _exported_but_one_overlay(worker, sessions)
    with sessions() as session:
        spool_late_instance(session, worker.settings.storage_path, study_id, 951_302)
        assert queue_ready_studies(session, utcnow()) == [study_id]
    assert worker.run_once()  # the analysis, which queues the results job
    writing, written = threading.Event(), threading.Event()
    write = results_job._write_result

    def paused(path: Path, ds: Dataset) -> Path:
        writing.set()
        assert written.wait(60)
        return write(path, ds)

    monkeypatch.setattr(results_job, "_write_result", paused)
    results = threading.Thread(target=worker.run_once, name="results-job")
    results.start()
    try:
        assert writing.wait(120), "the results job wrote no file"
        with sessions() as session:
            retry_dead(session, session.get(Job, buried_id), "boss", utcnow())
            session.commit()
    finally:
        written.set()
        results.join(timeout=120)
    assert not results.is_alive()
    while worker.run_once():
        pass
    received = _received(keeping_pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
    with sessions() as session:
        assert received[session.get(ResultObject, result_id).sop_instance_uid] == 1
        # Sent by the retried job; the results job queued none of its own.
        jobs = session.scalars(select(Job).where(Job.kind == "export")).all()
        assert [(job.id, job.state) for job in jobs if job.payload["result_id"] == result_id] == [
            (buried_id, "done")
        ]


def _dead_depth(sessions: sessionmaker[Session]) -> dict[str, float]:
    """dicomnode_queue_depth{state="dead"} by kind, as /metrics gives it."""
    from prometheus_client.parser import text_string_to_metric_families

    from dicomnode.metrics import exposition

    [family] = [
        f
        for f in text_string_to_metric_families(exposition(sessions).decode())
        if f.name == "dicomnode_queue_depth"
    ]
    return {s.labels["kind"]: s.value for s in family.samples if s.labels["state"] == "dead"}


def test_dead_letters_another_job_covers_are_not_counted_as_dead(
    sessions: sessionmaker[Session],
) -> None:
    """dicomnode_queue_depth{state="dead"} counts the dead letters an admin has to act on: an
    export whose object went to its destination by a later export job, and an analysis after
    which the study was analysed again, no longer count (an alert on dead > 0 ends when the
    work is done); a dead export of another object, or to another destination, still does."""
    study_id = _study(sessions)
    with sessions() as session:
        seven, eight = _result(session, study_id), _result(session, study_id)
    to_pacs = {"result_id": seven, "destination": "pacs"}
    with sessions() as session:
        _job(session, "export", study_id, "dead", to_pacs)
        _job(session, "export", study_id, "dead", {"result_id": seven, "destination": "archive"})
        _job(session, "export", study_id, "dead", {"result_id": eight, "destination": "pacs"})
        _job(session, "analyse", study_id, "dead")
    assert _dead_depth(sessions) == {"export": 3, "analyse": 1, "results": 0, "notify": 0}
    with sessions() as session:
        _job(session, "export", study_id, "done", to_pacs)
        _job(session, "analyse", study_id, "queued")
    assert _dead_depth(sessions) == {"export": 2, "analyse": 0, "results": 0, "notify": 0}


def test_a_dead_export_of_a_superseded_result_object_needs_no_retry(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """An SR export dead-lettered (refused), then late images made a new SR (a new result
    id) and its row replaced the old one: the dead export stayed a failed export on the
    worklist, in dicomnode_queue_depth{state="dead"} and kept its study from retention until
    an admin retried it, to fail as "result no longer exists". It needs no retry now: the
    listing says why (no covering job), a retry is refused, and neither the metric, the
    worklist's export error nor retention count it. A dead export of an object that still
    exists still does."""
    from dicomnode.retention import expired_studies

    study_id = _study(sessions)
    with sessions() as session:
        old_sr, overlay = _result(session, study_id), _result(session, study_id)
        dead = _job(
            session, "export", study_id, "dead", {"result_id": old_sr, "destination": "pacs"}
        )
        study = session.get(Study, study_id)
        study.reading_status = "reported"
        study.received_at = utcnow() - timedelta(days=400)
        session.commit()
        # The later version: a new row, the old one deleted (as the results job replaces it).
        _result(session, study_id)
        session.delete(session.get(ResultObject, old_sr))
        session.commit()
    assert _dead_depth(sessions) == {"export": 0, "analyse": 0, "results": 0, "notify": 0}
    with sessions() as session:
        assert [s.id for s in expired_studies(session, utcnow(), 30)] == [study_id]
    tokens = add_users(sessions)
    with serve(create_app(sessions)) as url, _admin(url, tokens) as admin:
        [row] = admin.get("/api/jobs", params={"state": "dead"}).json()
        assert row["id"] == dead and row["covered_by"] is None
        assert row["covered"] == f"result object {old_sr} was superseded by a later version"
        refused = admin.post(f"/api/jobs/{dead}/retry")
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"] == (
            f"job {dead} is not queued again: result object {old_sr} was superseded by a "
            "later version"
        )
    assert _audited(sessions) == 0
    with sessions() as session:
        assert session.get(Job, dead).state == "dead"
        # A dead export of an object that exists still needs a retry, and keeps its study.
        _job(session, "export", study_id, "dead", {"result_id": overlay, "destination": "pacs"})
        assert expired_studies(session, utcnow(), 30) == []
    assert _dead_depth(sessions) == {"export": 1, "analyse": 0, "results": 0, "notify": 0}


@pytest.mark.parametrize("dead_id,done_id", [("text", "number"), ("number", "text")])
def test_a_result_id_written_as_text_or_number_is_the_same_object(
    sessions: sessionmaker[Session], dead_id: str, done_id: str
) -> None:
    """A payload's result id as 5 or "5": the listing (Python) and the metric, worklist and
    retention (SQL) agree that the done export of the object covers the dead one (SQLite's
    json_extract compared 5 with '5' as different: the SQL rule counted it dead)."""
    study_id = _study(sessions)
    with sessions() as session:
        result_id = _result(session, study_id)
        as_ = {"text": str(result_id), "number": result_id}
        dead = _job(
            session, "export", study_id, "dead", {"result_id": as_[dead_id], "destination": "pacs"}
        )
        done = _job(
            session, "export", study_id, "done", {"result_id": as_[done_id], "destination": "pacs"}
        )
        from dicomnode.jobs.dead_letters import covering_jobs, needs_retry

        job = session.get(Job, dead)
        assert covering_jobs(session, [job])[dead].id == done
        assert session.scalars(select(Job.id).where(Job.id == dead, needs_retry(Job))).all() == []
    assert _dead_depth(sessions) == {"export": 0, "analyse": 0, "results": 0, "notify": 0}
