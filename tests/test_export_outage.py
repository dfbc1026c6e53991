"""Export outage: results wait with persisted backoff through node restarts and arrive once;
dead letters are listed (with the reason) and retried by an admin through the API."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import (
    RunningNode,
    StoreSCP,
    dcmtk,
    free_port,
    start_node,
    stop_node,
    storescp,
    wait_for,
    write_config,
)
from sqlalchemy import func, select
from test_export import study_with_exports
from web_server import add_users, serve
from worklist_seed import add_result_object, add_study

from dicomnode.checkconfig import load_checked
from dicomnode.config import Destination, Settings
from dicomnode.db.models import AuditEntry, Job, Study
from dicomnode.db.session import as_utc, make_engine, make_sessionmaker, utcnow
from dicomnode.jobs.queue import claim, enqueue, fail
from dicomnode.ports import wait_for_port
from dicomnode.retention import purge_expired
from dicomnode.synth.cxr import make_cxr
from dicomnode.web.app import create_app
from dicomnode.worker import Worker


def _export_jobs(db: Path) -> list[Job]:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with make_sessionmaker(engine)() as session:
            jobs = list(session.scalars(select(Job).where(Job.kind == "export")).all())
            session.expunge_all()
            return jobs
    finally:
        engine.dispose()


def _restart(node: RunningNode) -> None:
    stop_node(node)
    node.process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(node.config)],
        stdout=node.log.open("a"),
        stderr=subprocess.STDOUT,
        cwd=node.config.parent,
    )
    wait_for_port(node.port, node.process)
    wait_for_port(node.web_port, node.process)


def test_results_wait_out_a_destination_outage_and_arrive_once(tmp_path: Path) -> None:
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs")
    pacs.folder.mkdir()
    config, port, web_port = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}", destinations=[pacs]
    )
    text = config.read_text().replace(
        "[worker]\n", "[worker]\nmax_attempts = 50\nbackoff_base_seconds = 0.2\n"
    )
    config.write_text(text)
    node = start_node(tmp_path, config, port, web_port)
    storescp = None
    try:
        ds, _ = make_cxr(920_001, pneumothorax=True, size=128, accession_number="ACC-OUT")
        source = tmp_path / "source.dcm"
        ds.save_as(source, enforce_file_format=True)
        assert node.storescu(source).returncode == 0

        # The destination is down: export jobs fail and back off, in the database.
        def backing_off() -> list[Job] | None:
            jobs = _export_jobs(tmp_path / "dicomnode.db")
            waiting = [j for j in jobs if j.state == "queued" and j.attempts >= 2]
            return jobs if jobs and len(waiting) == len(jobs) else None

        jobs = wait_for(backing_off, timeout=60, what="export jobs backing off")
        # At least SR and overlay (and a KOS: the phantom is positive), one job per object.
        assert len(jobs) >= 2
        assert all("association not accepted" in j.last_error for j in jobs)
        assert all(as_utc(j.run_after) > as_utc(j.created_at) for j in jobs)

        _restart(node)
        _restart(node)  # twice: nothing is lost or re-queued by a restart
        storescp = subprocess.Popen(
            [dcmtk("storescp"), "--aetitle", "PACS", "--output-directory", str(pacs.folder),
             "--accept-all", "--unique-filenames", str(pacs.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        wait_for(
            lambda: all(j.state == "done" for j in _export_jobs(tmp_path / "dicomnode.db")),
            timeout=60,
            what="exports done after the destination returned",
        )
        received = [pydicom.dcmread(p) for p in pacs.received()]
        uids = sorted(str(r.SOPInstanceUID) for r in received)
        assert len(uids) == len(jobs) and len(set(uids)) == len(jobs), uids
        assert {str(r.StudyInstanceUID) for r in received} == {str(ds.StudyInstanceUID)}
    finally:
        if storescp is not None:
            storescp.terminate()
            storescp.wait(timeout=10)
        stop_node(node)


@pytest.fixture
def dead_letter(sessions) -> Iterator[tuple[str, dict[str, str], int, str]]:
    tokens = add_users(sessions)
    with sessions() as session:
        uid = add_study(session, "ACC-DEAD", now=utcnow())
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        result_id = add_result_object(session, study_id)
        job = enqueue(session, "export", study_id, {"result_id": result_id, "destination": "pacs"})
        session.commit()
        for _ in range(2):
            # Claimed past its backoff.
            later = utcnow() + timedelta(hours=1)
            claimed = claim(session, "test-worker", ["export"], 60, now=later)
            fail(session, claimed, "ExportError: pacs: association not accepted", max_attempts=2)
        job_id = job.id
    with serve(create_app(sessions)) as url:
        yield url, tokens, job_id, uid


def test_dead_letters_listed_with_reason_and_retried_by_admin(sessions, dead_letter) -> None:
    url, tokens, job_id, uid = dead_letter

    def client(user: str) -> httpx.Client:
        return httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {tokens[user]}"}, timeout=10
        )

    assert httpx.get(f"{url}/api/jobs?state=dead", timeout=10).status_code == 401
    with client("dr_house") as radiologist:
        assert radiologist.get("/api/jobs?state=dead").status_code == 403
        assert radiologist.post(f"/api/jobs/{job_id}/retry").status_code == 403
    with client("boss") as admin:
        dead = admin.get("/api/jobs", params={"state": "dead"}).json()
        assert [(j["id"], j["kind"], j["destination"], j["study_instance_uid"]) for j in dead] == [
            (job_id, "export", "pacs", uid)
        ]
        assert dead[0]["attempts"] == 2
        assert "association not accepted" in dead[0]["last_error"]
        # The worklist row and the study show it, for the badge "export failed: reason".
        rows = admin.get("/api/worklist").json()["rows"]
        row = next(r for r in rows if r["study_instance_uid"] == uid)
        assert row["export_error"].startswith("pacs: ExportError")
        assert admin.get(f"/api/studies/{uid}").json()["export_errors"] == [row["export_error"]]
        retried = admin.post(f"/api/jobs/{job_id}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["state"] == "queued" and retried.json()["attempts"] == 0
        assert admin.get("/api/jobs?state=dead").json() == []
        rows = admin.get("/api/worklist").json()["rows"]
        assert next(r for r in rows if r["study_instance_uid"] == uid)["export_error"] == ""
        assert admin.post(f"/api/jobs/{job_id}/retry").status_code == 409
        assert admin.post("/api/jobs/999999/retry").status_code == 404
    with sessions() as session:
        audited = session.scalar(
            select(func.count())
            .select_from(AuditEntry)
            .where(AuditEntry.action == "retry_job", AuditEntry.actor == "boss")
        )
    assert audited == 1


def _states(sessions, job_ids: list[int]) -> list[tuple[str, str]]:
    with sessions() as session:
        return [(j.state, j.last_error) for j in map(lambda i: session.get(Job, i), job_ids)]


def test_exports_to_a_removed_destination_are_dead_lettered_on_reload_and_sent_on_retry(
    sessions, db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The admin review's repro on a real worker: its destination is down (a closed port),
    a study's exports back off, logging one WARNING per attempt that names the destination.
    The ``[[destinations]]`` table is removed and the worker reloads (what SIGHUP does): the
    exports are dead-lettered at once, not after their backoff, and not marked done as before,
    which lost them and let retention delete the study. Retention keeps the study; the dead
    letters are listed with their reason. Configured again and retried by an admin through the
    API, they reach the PACS, a dcmtk storescp that came up meanwhile."""
    pacs = StoreSCP("PACS", free_port(), tmp_path / "pacs")
    config, _, _ = write_config(tmp_path, db_url, destinations=[pacs])
    configured = config.read_text().replace("[worker]\n", "[worker]\nbackoff_base_seconds = 120\n")
    config.write_text(configured)
    settings, _ = load_checked(config)
    objects = {f"kos-{n}": "pacs0" for n in range(3)}
    jobs = list(study_with_exports(sessions, tmp_path, objects).values())
    worker = Worker(settings, sessions, cards=[])
    stop = threading.Event()
    running = threading.Thread(target=worker.run_forever, args=(stop,), name="worker")
    tokens = add_users(sessions)
    try:
        with caplog.at_level(logging.INFO):
            running.start()
            wait_for(
                lambda: (
                    all(
                        state == "queued" and "Connection refused" in error
                        for state, error in _states(sessions, jobs)
                    )
                    # the attempt's WARNING comes after its commit
                    and any(
                        r.levelno >= logging.WARNING
                        and r.getMessage().startswith("export to pacs0")
                        for r in caplog.records
                    )
                ),
                timeout=30,
                what="the exports' first attempt to fail",
            )
            loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(loud) == 1, [r.getMessage() for r in loud]
            assert (
                loud[0]
                .getMessage()
                .startswith(f"export to pacs0 (PACS@127.0.0.1:{pacs.port}) failed (attempt 1")
            )
            assert "3 of 3 object(s)" in loud[0].getMessage()
            with sessions() as session:
                study = session.get(Study, session.get(Job, jobs[0]).study_id)
                study.reading_status = "reported"
                study.received_at = utcnow() - timedelta(days=40)
                uid = study.study_instance_uid
                session.commit()

            config.write_text(configured.split("[[destinations]]")[0])
            worker.reload_requested.set()  # SIGHUP
            wait_for(
                lambda: all(state == "dead" for state, _ in _states(sessions, jobs)),
                timeout=20,  # their backoff: 2 minutes
                what="the exports to be dead-lettered",
            )
        reason = "destination 'pacs0' is no longer configured"
        assert _states(sessions, jobs) == [("dead", reason)] * 3
        with sessions() as session:
            assert purge_expired(session, tmp_path / "storage", utcnow(), days=30) == 0
            assert session.scalar(select(Study.id).where(Study.study_instance_uid == uid))

        with (
            storescp(tmp_path, port=pacs.port) as running_pacs,
            serve(create_app(sessions)) as url,
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {tokens['boss']}"}, timeout=10
            ) as admin,
        ):
            dead = admin.get("/api/jobs", params={"state": "dead"}).json()
            assert sorted((j["id"], j["destination"], j["last_error"]) for j in dead) == [
                (job_id, "pacs0", reason) for job_id in jobs
            ]
            export_errors = admin.get(f"/api/studies/{uid}").json()["export_errors"]
            assert export_errors == [f"pacs0: {reason}"] * 3
            config.write_text(configured)
            worker.reload_requested.set()
            wait_for(lambda: worker.settings.destinations, timeout=10, what="the reload")
            for job_id in jobs:
                assert admin.post(f"/api/jobs/{job_id}/retry").status_code == 200
            wait_for(
                lambda: all(state == "done" for state, _ in _states(sessions, jobs)),
                timeout=30,
                what="the retried exports to be sent",
            )
            wait_for(lambda: len(running_pacs.received()) == 3, timeout=10, what="3 objects")
    finally:
        stop.set()
        if running.is_alive():
            running.join(timeout=30)


def test_a_studys_exports_stay_together_through_an_outage_and_leave_in_one_association(
    sessions, tmp_path: Path
) -> None:
    """The acceptance tester's repro: a study's 14 result objects to a destination that is
    down (no storescp on its port) for a few backoff rounds. Each failed job used to back off
    from its own failure time, a few milliseconds apart, and an attempt took along only the
    siblings already due: the batch split round after round (14, 7+7, 3+4+7) and left in
    two associations (3+11) when the PACS came back. Now every round is one attempt for all
    14, and they arrive in exactly one association, each once."""
    port = free_port()
    objects = {f"result-{n}": "pacs" for n in range(14)}
    jobs = list(study_with_exports(sessions, tmp_path, objects).values())
    settings = Settings(
        storage={"path": tmp_path / "storage"},
        worker={"backoff_base_seconds": 0.2, "max_attempts": 3},
        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)],
    )
    worker = Worker(settings, sessions, cards=[])
    stop = threading.Event()
    running = threading.Thread(target=worker.run_forever, args=(stop,), name="worker")
    try:
        running.start()

        def attempts() -> list[int]:
            with sessions() as session:
                return [session.get(Job, job_id).attempts for job_id in jobs]

        # Past max_attempts: a destination that is down dead-letters nothing.
        wait_for(lambda: min(attempts()) >= 4, timeout=30, what="four failed rounds")
        assert "dead" not in [state for state, _ in _states(sessions, jobs)]
        with storescp(tmp_path, port=port) as pacs:
            wait_for(
                lambda: all(state == "done" for state, _ in _states(sessions, jobs)),
                timeout=30,
                what="the exports to leave once the PACS answers",
            )
            received = [pydicom.dcmread(p) for p in pacs.received()]
            uids = [str(ds.SOPInstanceUID) for ds in received]
            assert len(uids) == len(set(uids)) == len(jobs)
            assert pacs.associations() == 1
        # Every round took them all: each job was tried as often as the others.
        assert len(set(attempts())) == 1, attempts()
    finally:
        stop.set()
        running.join(timeout=30)
