"""An admin's retry of a dead job and the job that covers its work, queued at the same moment
on PostgreSQL (read committed): each transaction locks the study before it looks at the
study's jobs, so the second waits for the first's commit and then sees its job. Without the
lock both saw "no other job" and both queued: the object went to the destination twice.

The interleaving is forced, with no timing: one side stops between its look and its commit
(an event), the other runs meanwhile until it has committed or waits on the first one's lock
(seen in pg_stat_activity), and then the first goes on. SQLite serialises writers (BEGIN
IMMEDIATE), so the second would wait on the whole database instead: PostgreSQL only here."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import StoreSCP, spool_late_instance, storescp, worker_config
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from test_results_reexport import PNEUMOTHORAX, _received, _worker
from test_retry_covered import (
    _admin,
    _audited,
    _cli,
    _exported_but_one_overlay,
    _job,
    _result,
    _study,
)
from web_server import add_users, serve

from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.db.session import utcnow
from dicomnode.ingest import assembly
from dicomnode.jobs.dead_letters import Covered, retry_dead
from dicomnode.results import job as results_job
from dicomnode.web.app import create_app
from dicomnode.worker import Worker

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)

# The longest a side may take to reach its stop, or to commit after it (generous).
DEADLINE = 120.0


@pytest.fixture
def keeping_pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """A storescp that keeps each object it receives in a file of its own."""
    with storescp(tmp_path, "--accept-all", "--unique-filenames") as running:
        yield running


# The backends that wait on a lock that the backend :blocker holds, or on one of them.
_WAITING_ON = text(
    """
    WITH RECURSIVE waiting(pid) AS (
        SELECT pid FROM pg_stat_activity WHERE :blocker = ANY(pg_blocking_pids(pid))
        UNION
        SELECT activity.pid FROM pg_stat_activity AS activity
        JOIN waiting ON waiting.pid = ANY(pg_blocking_pids(activity.pid))
    )
    SELECT count(*) FROM waiting
    """
)


def _backend(session: Session) -> int:
    """The PostgreSQL server process of the session's connection."""
    return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _until_done_or_waiting(
    sessions: sessionmaker[Session], threads: list[threading.Thread], blocker: int
) -> None:
    """Wait until each of ``threads`` has ended or waits on a lock that the backend
    ``blocker`` holds (as many transactions waiting on it as threads still running), or on
    one that another of them holds or waits for (the second in a queue waits on the first)."""
    deadline = time.monotonic() + DEADLINE
    with sessions() as session:
        while time.monotonic() < deadline:
            running = sum(thread.is_alive() for thread in threads)
            if not running:
                return
            waiting = session.execute(_WAITING_ON, {"blocker": blocker}).scalar_one()
            session.rollback()  # a fresh look each time
            if waiting >= running:
                return
            time.sleep(0.02)
    raise AssertionError("the other side neither ended nor waited on the lock")


def _in_thread(target: Callable[[], object], errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _exports_of(sessions: sessionmaker[Session], result_id: int) -> list[tuple[int, str]]:
    """(id, state) of the exports of the result object to 'pacs' that send or sent it."""
    with sessions() as session:
        return [
            (job.id, job.state)
            for job in session.scalars(select(Job).where(Job.kind == "export").order_by(Job.id))
            if job.payload["result_id"] == result_id
            and job.payload["destination"] == "pacs"
            and job.state in ("queued", "leased", "done")
        ]


def _results_job_to_come(
    tmp_path: Path, sessions: sessionmaker[Session], pacs: StoreSCP, *, late_image: bool
) -> tuple[Worker, int, int]:
    """A worker, the id of a dead overlay export and of its result object, and the study
    analysed again: the worker's next job is the results job that queues that overlay again.
    With a ``late_image`` the results job writes objects of its own (their rows go in first);
    without, it keeps every earlier object and adds no row."""
    worker = _worker(tmp_path, sessions, pacs, PNEUMOTHORAX)
    _, study_id, buried_id, result_id = _exported_but_one_overlay(worker, sessions)
    with sessions() as session:
        if late_image:
            spool_late_instance(session, worker.settings.storage_path, study_id, 951_302)
        else:
            study = session.get(Study, study_id)
            study.received_generation, study.ready_at = study.received_generation + 1, utcnow()
            session.commit()
        assert assembly.queue_ready_studies(session, utcnow()) == [study_id]
    assert worker.run_once()  # the analysis, which queues the results job
    return worker, buried_id, result_id


def test_a_retry_checked_first_makes_the_results_job_wait_and_queue_no_second_export(
    sessions: sessionmaker[Session], tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """The admin's retry has found no other export of the dead overlay and not yet committed
    when the results job (after a late image) comes to queue the study's exports: the results
    job waits for the retry's commit, then sees the retried export and queues none of its
    own. Before: it queued one, and the overlay was sent twice."""
    worker, buried_id, result_id = _results_job_to_come(
        tmp_path, sessions, keeping_pacs, late_image=True
    )
    checked, go = threading.Event(), threading.Event()
    retrier: list[int] = []
    errors: list[BaseException] = []

    def retry() -> None:
        with sessions() as session:
            retry_dead(session, session.get(Job, buried_id), "boss", utcnow())
            retrier.append(_backend(session))
            checked.set()
            assert go.wait(DEADLINE)
            session.commit()

    retrying = _in_thread(retry, errors)
    try:
        assert checked.wait(DEADLINE), errors
        results = _in_thread(worker.run_once, errors)
        _until_done_or_waiting(sessions, [results], retrier[0])
    finally:
        go.set()
    retrying.join(DEADLINE)
    results.join(DEADLINE)
    assert not retrying.is_alive() and not results.is_alive()
    assert errors == []
    assert _exports_of(sessions, result_id) == [(buried_id, "queued")]
    while worker.run_once():
        pass
    received = _received(keeping_pacs, sessions)
    with sessions() as session:
        assert received[session.get(ResultObject, result_id).sop_instance_uid] == 1


def test_a_results_job_that_looked_first_makes_the_retry_wait_and_be_refused(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The study analysed again (same images: the results job adds no row, so holds no lock
    but its own): the results job has read the study's exports (the overlay's is dead) and
    not yet committed the export it queues when the admin retries the dead one. The retry
    waits for the results job's commit, then is refused, naming its export. Before: the retry
    found no other export and queued the dead one too; the overlay was sent twice."""
    worker, buried_id, result_id = _results_job_to_come(
        tmp_path, sessions, keeping_pacs, late_image=False
    )
    looked, go = threading.Event(), threading.Event()
    writer: list[int] = []
    errors: list[BaseException] = []
    exported = results_job._exported

    def paused(session: Session, study_id: int) -> set[tuple[int, str]]:
        found = exported(session, study_id)
        writer.append(_backend(session))
        looked.set()
        assert go.wait(DEADLINE)
        return found

    monkeypatch.setattr(results_job, "_exported", paused)
    refused: list[Covered] = []

    def retry() -> None:
        with sessions() as session:
            try:
                retry_dead(session, session.get(Job, buried_id), "boss", utcnow())
            except Covered as covered:
                refused.append(covered)
            session.commit()

    results = _in_thread(worker.run_once, errors)
    try:
        assert looked.wait(DEADLINE), errors
        retrying = _in_thread(retry, errors)
        _until_done_or_waiting(sessions, [retrying], writer[0])
    finally:
        go.set()
    results.join(DEADLINE)
    retrying.join(DEADLINE)
    assert not retrying.is_alive() and not results.is_alive()
    assert errors == []
    [(again, state)] = _exports_of(sessions, result_id)
    assert again != buried_id and state == "queued"
    assert [covered.covering.id for covered in refused] == [again]
    while worker.run_once():
        pass
    received = _received(keeping_pacs, sessions)
    with sessions() as session:
        assert received[session.get(ResultObject, result_id).sop_instance_uid] == 1
        assert session.get(Job, buried_id).state == "dead"


def test_a_retry_of_a_dead_analysis_waits_for_the_analysis_being_queued(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assembly has queued a new analysis of the study (late images) and not yet committed
    when the admin retries the study's dead analysis: the retry waits for the assembly's
    commit, then is refused, naming the new analysis; the study is analysed once. Before: the
    retry queued the dead analysis as well."""
    study_id = _study(sessions)
    with sessions() as session:
        dead = _job(session, "analyse", study_id, "dead")
        study = session.get(Study, study_id)
        study.received_generation, study.ready_at = study.queued_generation + 1, utcnow()
        session.commit()
    queued, go = threading.Event(), threading.Event()
    assembler: list[int] = []
    errors: list[BaseException] = []
    enqueue = assembly.enqueue

    def paused(session: Session, *args: object, **kwargs: object) -> Job:
        job = enqueue(session, *args, **kwargs)
        assembler.append(_backend(session))
        queued.set()
        assert go.wait(DEADLINE)
        return job

    monkeypatch.setattr(assembly, "enqueue", paused)
    refused: list[Covered] = []

    def assemble() -> None:
        with sessions() as session:
            assert assembly.queue_ready_studies(session, utcnow()) == [study_id]

    def retry() -> None:
        with sessions() as session:
            try:
                retry_dead(session, session.get(Job, dead), "boss", utcnow())
            except Covered as covered:
                refused.append(covered)
            session.commit()

    assembling = _in_thread(assemble, errors)
    try:
        assert queued.wait(DEADLINE), errors
        retrying = _in_thread(retry, errors)
        _until_done_or_waiting(sessions, [retrying], assembler[0])
    finally:
        go.set()
    assembling.join(DEADLINE)
    retrying.join(DEADLINE)
    assert not retrying.is_alive() and not assembling.is_alive()
    assert errors == []
    with sessions() as session:
        analyses = session.scalars(
            select(Job).where(Job.kind == "analyse", Job.state != "dead")
        ).all()
        assert len(analyses) == 1 and analyses[0].id != dead
        assert session.get(Job, dead).state == "dead"
    assert [covered.covering.id for covered in refused] == [analyses[0].id]


def test_two_retries_of_one_dead_export_at_once_queue_it_once(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    """One admin's retry of a dead export has not yet committed when another admin retries it
    by the API and a third by the CLI: both wait, then read the job again and are told it is
    queued, not dead (409; the CLI exits 1); it is queued and audited once. Before: each
    went on with the job as it read it before the first commit, queued it again and audited
    it (a worker that had taken it meanwhile would have lost it to a second send)."""
    study_id = _study(sessions)
    with sessions() as session:
        result_id = _result(session, study_id)
        dead = _job(
            session, "export", study_id, "dead", {"result_id": result_id, "destination": "pacs"}
        )
    checked, go = threading.Event(), threading.Event()
    first: list[int] = []
    errors: list[BaseException] = []

    def retry() -> None:
        with sessions() as session:
            retry_dead(session, session.get(Job, dead), "boss", utcnow())
            first.append(_backend(session))
            checked.set()
            assert go.wait(DEADLINE)
            session.commit()

    config = worker_config(tmp_path, db_url, "")
    tokens = add_users(sessions)
    answers: list[httpx.Response] = []
    said: list[subprocess.CompletedProcess] = []
    with serve(create_app(sessions)) as url, _admin(url, tokens) as admin:
        retrying = _in_thread(retry, errors)
        try:
            assert checked.wait(DEADLINE), errors
            by_api = _in_thread(
                lambda: answers.append(admin.post(f"/api/jobs/{dead}/retry")), errors
            )
            by_cli = _in_thread(lambda: said.append(_cli(config, "retry", str(dead))), errors)
            _until_done_or_waiting(sessions, [by_api, by_cli], first[0])
        finally:
            go.set()
        for thread in (retrying, by_api, by_cli):
            thread.join(DEADLINE)
            assert not thread.is_alive()
    assert errors == []
    [answer] = answers
    assert answer.status_code == 409, answer.text
    assert answer.json()["detail"] == f"job {dead} is queued, not dead"
    [cli] = said
    assert cli.returncode == 1, cli.stdout
    assert f"error: job {dead} is queued, not dead" in cli.stderr
    with sessions() as session:
        assert session.get(Job, dead).state == "queued"
    assert _audited(sessions) == 1
