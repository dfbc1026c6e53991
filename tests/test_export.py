"""Export by C-STORE to a real dcmtk storescp, and to a destination that is down; a study's
exports to one destination leave over one association, each job done or failed on its own
(SQLite and PostgreSQL)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, free_port, storescp, wait_for
from prometheus_client import REGISTRY
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from sqlalchemy.orm import Session, sessionmaker
from test_scp import secondary_capture

from dicomnode.config import Destination, Settings
from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.db.session import as_utc, utcnow
from dicomnode.export import scu
from dicomnode.export.scu import DestinationUnavailable, ExportError, send_file, send_files
from dicomnode.jobs.queue import enqueue, retry
from dicomnode.worker import Worker


def saved(tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    ds = secondary_capture()
    path = tmp_path / "result.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_send_file_delivers_to_pacs(tmp_path: Path, pacs: StoreSCP) -> None:
    path, ds = saved(tmp_path)
    destination = Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port)
    send_file(path, destination, calling_ae="DICOMNODE", timeout=10)
    received = wait_for(pacs.received, timeout=10, interval=0.05, what="storescp to write")
    assert len(received) == 1
    copy = pydicom.dcmread(received[0])
    assert copy.SOPInstanceUID == ds.SOPInstanceUID
    assert copy.PixelData == ds.PixelData


def test_export_association_sends_each_pdu_at_once(
    tmp_path: Path, pacs: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nagle's algorithm is off on the export socket: a small object's dataset PDU would
    otherwise wait for the PACS to acknowledge the command PDU (a delayed ACK, ~40 ms)."""
    no_delay: list[int] = []
    send_c_store = Association.send_c_store

    def looking(self: Association, *args: object, **kwargs: object) -> object:
        sock = self.dul.socket.socket
        no_delay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return send_c_store(self, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", looking)
    path, _ = saved(tmp_path)
    destination = Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port)
    send_file(path, destination, calling_ae="DICOMNODE", timeout=10)
    assert len(no_delay) == 1 and no_delay[0] != 0
    assert len(wait_for(pacs.received, timeout=10, interval=0.05, what="storescp to write")) == 1


def test_send_file_to_closed_port_names_destination(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    destination = Destination(
        name="archive-b", ae_title="ARCHIVE", host="127.0.0.1", port=free_port()
    )
    with pytest.raises(ExportError, match=r"archive-b \(ARCHIVE@127\.0\.0\.1:\d+\)"):
        send_file(path, destination, calling_ae="DICOMNODE", timeout=5)


def test_send_files_sends_over_one_association_and_answers_for_each_file(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    """Readable files go over one association; one that is missing or not DICOM fails alone."""
    paths = []
    for index in range(3):
        path = tmp_path / f"result-{index}.dcm"
        secondary_capture().save_as(path, enforce_file_format=True)
        paths.append(path)
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not a DICOM file")
    paths[1:1] = [tmp_path / "gone.dcm", not_dicom]
    destination = Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port)

    outcomes = send_files(paths, destination, calling_ae="DICOMNODE", timeout=10)

    assert [type(outcome).__name__ for outcome in outcomes] == [
        "NoneType",
        "FileNotFoundError",
        "InvalidDicomError",
        "NoneType",
        "NoneType",
    ]
    received = wait_for(lambda: len(pacs.received()) == 3 and pacs.received(), timeout=10)
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in (paths[0], paths[3], paths[4])}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in received} == sent
    assert pacs.associations() == 1


class _WakesLate(threading.Event):
    """A reactor checkpoint whose waiter, once woken, is held for 20 ms before it goes on, as
    a thread descheduled just after waking would be: pynetdicom's reactor has then marked
    itself paused and is not, the race that made a C-STORE response go astray."""

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        if woken:
            time.sleep(0.02)
        return woken


def test_a_response_the_association_reactor_takes_reaches_its_c_store(
    tmp_path: Path, pacs: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's reactor can take a C-STORE response off the DIMSE queue before the send
    waits for it (its pause is a flag set before it blocks). Forced here: the reactor wakes
    late and the send looks for its response 50 ms late. Each store still gets its response
    (before: 'Received unexpected C-STORE service message', the DIMSE timeout, an abort)."""
    connected = scu._send_at_once
    taken: list[str] = []

    def racing(event: evt.Event) -> None:
        connected(event)
        assoc = event.assoc
        assoc._reactor_checkpoint = _WakesLate()
        assoc._reactor_checkpoint.set()
        get_msg = assoc.dimse.get_msg

        def late(block: bool = False) -> object:
            if block:  # the send, waiting for its response
                time.sleep(0.05)
                return get_msg(block)
            context_id, msg = get_msg(block)  # the reactor, looking for requests
            if msg is not None:
                taken.append(type(msg).__name__)
            return context_id, msg

        assoc.dimse.get_msg = late

    monkeypatch.setattr(scu, "_send_at_once", racing)
    paths = []
    for index in range(4):
        path = tmp_path / f"result-{index}.dcm"
        secondary_capture().save_as(path, enforce_file_format=True)
        paths.append(path)
    destination = Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port)

    outcomes = send_files(paths, destination, calling_ae="DICOMNODE", timeout=3)

    assert outcomes == [None] * 4
    assert "C_STORE" in taken  # the reactor did take responses (given back to the sends)
    assert len(wait_for(lambda: len(pacs.received()) == 4 and pacs.received(), timeout=10)) == 4
    assert pacs.associations() == 1


def test_a_destination_that_never_completes_the_connection_fails_within_its_timeout(
    tmp_path: Path,
) -> None:
    """A firewalled PACS drops the SYN: the connect waited as long as the system retries
    (~2 min), and an export thread with it. Here a listening socket whose accept queue is full
    drops the SYNs as such a firewall does."""
    path, _ = saved(tmp_path)
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        # Connections that fill the queue (never accepted); the next SYN is dropped.
        waiting = []
        for _ in range(3):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            waiting.append(client)
        time.sleep(0.2)
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        started = time.monotonic()
        try:
            with pytest.raises(DestinationUnavailable, match="association not accepted"):
                send_files([path], destination, calling_ae="DICOMNODE", timeout=1)
        finally:
            for client in waiting:
                client.close()
        assert time.monotonic() - started < 5


def test_send_files_to_a_destination_that_is_down_raises(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    with pytest.raises(ExportError, match="association not accepted"):
        send_files([path, path], destination, calling_ae="DICOMNODE", timeout=5)


def study_with_exports(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    destinations: dict[str, str],
    study_id: int | None = None,
) -> dict[str, int]:
    """A study (new, or the one of ``study_id``) with one result object per name in
    ``destinations`` (result name -> destination name), each with its export job; the result
    named "gone" has no file. Returns the job ids by result name."""
    jobs = {}
    with sessions() as session:
        if study_id is None:
            study = Study(
                study_instance_uid=generate_uid(),
                received_at=utcnow(),
                last_instance_at=utcnow(),
                ready_at=utcnow(),
                due_at=utcnow(),
            )
            session.add(study)
            session.flush()
        else:
            study = session.get(Study, study_id)
        for name, destination in destinations.items():
            ds = secondary_capture(study_uid=study.study_instance_uid)
            path = tmp_path / f"{name}.dcm"
            if name != "gone":
                ds.save_as(path, enforce_file_format=True)
            result = ResultObject(
                sop_instance_uid=str(ds.SOPInstanceUID),
                study_id=study.id,
                kind="overlay",
                model_name="m",
                model_version="1",
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                path=str(path),
                created_at=utcnow(),
            )
            session.add(result)
            session.flush()
            payload = {"result_id": result.id, "destination": destination}
            job = enqueue(session, "export", study.id, payload)
            session.flush()
            jobs[name] = job.id
        session.commit()
    return jobs


def _worker(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    pacs_port: int,
    timeout_seconds: float = 30,
    max_attempts: int = 5,
) -> Worker:
    settings = Settings(
        storage={"path": tmp_path / "storage"},
        worker={"threads": 1, "backoff_base_seconds": 60, "max_attempts": max_attempts},
        destinations=[
            Destination(
                name="pacs",
                ae_title="PACS",
                host="127.0.0.1",
                port=pacs_port,
                timeout_seconds=timeout_seconds,
            ),
            Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=free_port()),
        ],
    )
    return Worker(settings, sessions, cards=[])


def test_a_studys_exports_to_a_destination_leave_over_one_association(
    sessions: sessionmaker[Session], tmp_path: Path, pacs: StoreSCP
) -> None:
    """One export job takes the study's other due exports to its destination along: one
    association; each job is done or failed on its own; other destinations' jobs wait."""
    jobs = study_with_exports(
        sessions,
        tmp_path,
        {"sr": "pacs", "overlay": "pacs", "gone": "pacs", "kos": "pacs", "copy": "archive"},
    )
    worker = _worker(tmp_path, sessions, pacs.port)

    assert worker.run_once()

    with sessions() as session:
        state = {name: session.get(Job, job_id) for name, job_id in jobs.items()}
        assert {name: job.state for name, job in state.items()} == {
            "sr": "done",
            "overlay": "done",
            "kos": "done",
            "gone": "queued",  # retried later
            "copy": "queued",  # another destination: not taken along
        }
        assert state["gone"].attempts == 1 and "FileNotFoundError" in state["gone"].last_error
        assert as_utc(state["gone"].run_after) > utcnow()  # with backoff
        assert state["copy"].attempts == 0
    assert len(wait_for(lambda: len(pacs.received()) == 3 and pacs.received(), timeout=10)) == 3
    assert pacs.associations() == 1


def test_an_export_takes_along_its_studys_exports_still_waiting_out_their_backoff(
    sessions: sessionmaker[Session], tmp_path: Path, pacs: StoreSCP
) -> None:
    """The study's exports to the destination go together even when their backoffs end
    apart (each reckoned from its own failure): one that is due takes along those still
    waiting after the destination was unreachable, not one leased to another worker, nor
    other destinations' or studies'."""
    jobs = study_with_exports(
        sessions,
        tmp_path,
        {"sr": "pacs", "overlay": "pacs", "kos": "pacs", "held": "pacs", "copy": "archive"},
    )
    other = study_with_exports(sessions, tmp_path, {"later": "pacs"})
    # The destination down: the study's exports to it fail together, the archive's too.
    down = _worker(tmp_path, sessions, free_port())
    assert down.run_once() and down.run_once()
    assert [job.attempts for job in _jobs(sessions, jobs.values())] == [1] * 5
    with sessions() as session:
        session.get(Job, jobs["sr"]).run_after = utcnow()  # its backoff ended first
        session.get(Job, other["later"]).run_after = utcnow() + timedelta(minutes=5)
        held = session.get(Job, jobs["held"])
        held.state, held.lease_owner = "leased", "another-worker"
        held.lease_expires_at = utcnow() + timedelta(minutes=5)
        session.commit()
    worker = _worker(tmp_path, sessions, pacs.port)

    assert worker.run_once()

    state = {
        name: (job.state, job.attempts)
        for name, job in zip(jobs, _jobs(sessions, jobs.values()), strict=True)
    }
    assert state == {
        "sr": ("done", 2),
        "overlay": ("done", 2),
        "kos": ("done", 2),
        "held": ("leased", 1),
        "copy": ("queued", 1),
    }
    assert [job.state for job in _jobs(sessions, other.values())] == ["queued"]
    assert len(wait_for(lambda: len(pacs.received()) == 3 and pacs.received(), timeout=10)) == 3
    assert pacs.associations() == 1


def test_an_object_the_destination_refused_waits_out_its_own_backoff(
    sessions: sessionmaker[Session], tmp_path: Path, pacs: StoreSCP
) -> None:
    """An object the destination refused on its own (a failure status) is not taken along
    by a later export of its study to that destination (another model's results, due
    first): taking it retried it with each of them and spent its attempts long before its
    backoff meant to. It goes when its own backoff ends."""
    refusing = StatusSCP(0xC000)  # Error: Cannot understand
    try:
        refused = study_with_exports(sessions, tmp_path, {"refused": "pacs"})
        assert _worker(tmp_path, sessions, refusing.port).run_once()
    finally:
        refusing.close()
    [job] = _jobs(sessions, refused.values())
    assert (job.state, job.attempts) == ("queued", 1) and "0xC000" in job.last_error
    later = study_with_exports(sessions, tmp_path, {"later": "pacs"}, study_id=job.study_id)
    worker = _worker(tmp_path, sessions, pacs.port)

    assert worker.run_once()

    states = [(job.state, job.attempts) for job in _jobs(sessions, [job.id, *later.values()])]
    assert states == [("queued", 1), ("done", 1)]
    assert len(wait_for(lambda: len(pacs.received()) == 1 and pacs.received(), timeout=10)) == 1
    _due_now(sessions, [job.id])
    assert worker.run_once()
    assert [(job.state, job.attempts) for job in _jobs(sessions, [job.id])] == [("done", 2)]
    assert pacs.associations() == 2


def test_a_destination_down_fails_every_export_taken_along(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs", "overlay": "pacs", "kos": "pacs"})
    worker = _worker(tmp_path, sessions, free_port())

    assert worker.run_once()

    _assert_retried_later(sessions, jobs.values(), "association not accepted")


def _jobs(sessions: sessionmaker[Session], job_ids: Iterable[int]) -> list[Job]:
    with sessions() as session:
        jobs = [session.get(Job, job_id) for job_id in job_ids]
        session.expunge_all()
        return jobs


def _due_now(sessions: sessionmaker[Session], job_ids: Iterable[int]) -> None:
    """End the jobs' backoff, as the passing of time would."""
    with sessions() as session:
        for job_id in job_ids:
            session.get(Job, job_id).run_after = utcnow()
        session.commit()


def test_exports_wait_out_an_outage_longer_than_their_attempts_and_leave_when_it_ends(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A destination that is down refuses nothing: its exports stay queued past
    ``max_attempts`` (an ERROR says so once per study's association), and once it answers
    again the study's exports leave together, those still waiting out their backoff too, and
    the other studies' exports waiting for it go at once."""
    port = free_port()
    first = study_with_exports(sessions, tmp_path, {"sr": "pacs", "kos": "pacs"})
    other = study_with_exports(sessions, tmp_path, {"overlay": "pacs"})
    ids = [*first.values(), *other.values()]
    worker = _worker(tmp_path, sessions, port, max_attempts=2)

    with caplog.at_level(logging.INFO, logger="dicomnode.worker"):
        for _ in range(4):  # twice the attempts a refused object gets
            _due_now(sessions, ids)
            assert worker.run_once() and worker.run_once()  # each study's exports
        assert [(job.state, job.attempts) for job in _jobs(sessions, ids)] == [("queued", 4)] * 3
        unreachable = [r for r in caplog.records if "unreachable in 2 attempts" in r.getMessage()]
        assert [r.levelname for r in unreachable] == ["ERROR"] * 2  # one per study

        with storescp(tmp_path, port=port) as pacs:
            _due_now(sessions, [first["sr"]])  # the others wait out up to 8 minutes yet
            assert worker.run_once()
            # The study's kos, still waiting out its backoff, went along: one association.
            assert [job.state for job in _jobs(sessions, ids)] == ["done", "done", "queued"]
            assert worker.run_once()
            assert [job.state for job in _jobs(sessions, ids)] == ["done"] * 3
            assert wait_for(lambda: len(pacs.received()) == 3, timeout=10)
            assert pacs.associations() == 2  # one per study
    assert "destination pacs answers again: 1 waiting export(s) due now" in caplog.text


def test_a_group_larger_than_an_association_is_not_retried_with_each_due_job(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A study's 40 exports to a destination that is down (a CT's overlays and
    presentation states): the first association attempt takes 32 of them, the next claim the
    other 8, and the first 32, waiting out their backoff, do not go along again (they have
    been tried more often). Before, each due job's claim took the waiting 31 along: the
    acceptance test saw 77 attempts in a minute for one study, log lines at ERROR among them."""
    jobs = study_with_exports(sessions, tmp_path, {f"result-{n}": "pacs" for n in range(40)})
    ids = list(jobs.values())
    worker = _worker(tmp_path, sessions, free_port())
    assert worker.run_once()
    assert [job.attempts for job in _jobs(sessions, ids)] == [1] * 32 + [0] * 8
    assert worker.run_once()
    assert [job.attempts for job in _jobs(sessions, ids)] == [1] * 40
    assert not worker.run_once()  # every one waits out its backoff (60 s here)
    # Once all are due again, each group goes over one association as before.
    _due_now(sessions, ids)
    assert worker.run_once() and worker.run_once()
    assert [job.attempts for job in _jobs(sessions, ids)] == [2] * 40


def test_an_object_the_destination_refuses_is_dead_lettered_after_its_attempts(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unlike an outage, a refusal (here: the result's file is gone) uses up the attempts and
    the dead letter is logged as an ERROR that says how to retry it."""
    with storescp(tmp_path) as pacs:
        jobs = study_with_exports(sessions, tmp_path, {"gone": "pacs"})
        worker = _worker(tmp_path, sessions, pacs.port, max_attempts=2)
        with caplog.at_level(logging.INFO, logger="dicomnode.worker"):
            for _ in range(2):
                _due_now(sessions, jobs.values())
                assert worker.run_once()
    [job] = _jobs(sessions, jobs.values())
    assert (job.state, job.attempts) == ("dead", 2)
    [dead] = [r for r in caplog.records if "dead after 2 attempts" in r.getMessage()]
    assert dead.levelname == "ERROR" and f"POST /api/jobs/{job.id}/retry" in dead.getMessage()


def _assert_retried_later(
    sessions: sessionmaker[Session], job_ids: Iterable[int], error: str
) -> None:
    """Each job failed its first attempt with ``error`` and waits to be retried, with backoff."""
    with sessions() as session:
        for job_id in job_ids:
            job = session.get(Job, job_id)
            assert (job.state, job.attempts) == ("queued", 1)
            assert error in job.last_error
            assert as_utc(job.run_after) > utcnow()


def test_a_destination_that_never_answers_fails_within_its_timeout(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A peer that takes the connection but never answers (a hung PACS) fails the exports
    after the destination's ``timeout_seconds``, not pynetdicom's default, and they are
    retried with backoff."""
    silent = socket.create_server(("127.0.0.1", 0))  # connections wait in its backlog
    try:
        jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs", "kos": "pacs"})
        worker = _worker(tmp_path, sessions, silent.getsockname()[1], timeout_seconds=1.0)

        started = time.monotonic()
        assert worker.run_once()
        assert time.monotonic() - started < 8

        _assert_retried_later(sessions, jobs.values(), "association not accepted")
    finally:
        silent.close()


def test_a_pacs_that_takes_only_implicit_vr_gets_explicit_vr_results_converted(
    tmp_path: Path,
) -> None:
    """Results are written in explicit VR little endian; a destination that accepts only
    implicit VR little endian (storescp +xi) still gets them, converted on the way."""
    path, ds = saved(tmp_path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with storescp(tmp_path, "--implicit") as implicit_only:
        destination = Destination(
            name="old-pacs", ae_title="PACS", host="127.0.0.1", port=implicit_only.port
        )
        send_file(path, destination, calling_ae="DICOMNODE", timeout=10)
        received = wait_for(implicit_only.received, timeout=10, what="storescp to write")
    copy = pydicom.dcmread(received[0])
    assert copy.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian  # as it was sent
    assert copy.SOPInstanceUID == ds.SOPInstanceUID
    assert copy.PixelData == ds.PixelData


def test_two_workers_send_each_export_exactly_once(
    sessions: sessionmaker[Session], tmp_path: Path, pacs: StoreSCP
) -> None:
    """Two workers claiming a study's exports at once: each object reaches the PACS once."""
    jobs = study_with_exports(sessions, tmp_path, {f"result-{n}": "pacs" for n in range(12)})
    workers = [_worker(tmp_path, sessions, pacs.port) for _ in range(2)]
    for index, worker in enumerate(workers):
        worker.owner = f"worker-{index}"
    start = threading.Barrier(len(workers))

    def drain(worker: Worker) -> None:
        start.wait()
        while worker.run_once():
            pass

    threads = [threading.Thread(target=drain, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    with sessions() as session:
        done = [session.get(Job, job_id) for job_id in jobs.values()]
        assert [(job.state, job.attempts) for job in done] == [("done", 1)] * len(jobs)
    log = pacs.log.read_text(errors="replace")
    assert log.count("Received Store Request") == len(jobs)
    # The study's exports to the PACS are claimed in one transaction (12 fit one association):
    # the worker that claims first takes them all, the other none.
    assert pacs.associations() == 1


def _sample(name: str, destination: str) -> float:
    return REGISTRY.get_sample_value(name, {"destination": destination}) or 0.0


def test_a_failed_attempt_is_one_warning_naming_the_destination(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A study's exports to a destination that is down fail together, in one association
    attempt, and say so in one WARNING: the destination and its address, why (the connect
    error), how many exports wait for it and when they are tried next. Each job's reason is
    at DEBUG; pynetdicom's two connect errors, which name no destination, are not logged.
    Before: a WARNING per job (15 here) and two pynetdicom ERRORs per attempt."""
    port = free_port()
    jobs = study_with_exports(sessions, tmp_path, {f"result-{n}": "pacs" for n in range(15)})
    study_with_exports(sessions, tmp_path, {"sr": "pacs"})  # another study's, waiting its turn
    worker = _worker(tmp_path, sessions, port)
    objects = _sample("dicomnode_export_failures_total", "pacs")
    attempts = _sample("dicomnode_export_attempts_failed_total", "pacs")

    with caplog.at_level(logging.DEBUG):
        assert worker.run_once()

    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, r.name) for r in loud] == [("WARNING", "dicomnode.worker")], [
        r.getMessage() for r in loud
    ]
    message = loud[0].getMessage()
    assert message.startswith(f"export to pacs (PACS@127.0.0.1:{port}) failed (attempt 1,")
    assert "15 of 15 object(s)" in message and "Connection refused" in message
    assert "16 export job(s) wait for pacs; next try at " in message
    per_job = [r for r in caplog.records if "export study_id" in r.getMessage()]
    assert len(per_job) == 15 and {r.levelname for r in per_job} == {"DEBUG"}
    _assert_retried_later(sessions, jobs.values(), "Connection refused")
    assert _sample("dicomnode_export_failures_total", "pacs") == objects + 15
    assert _sample("dicomnode_export_attempts_failed_total", "pacs") == attempts + 1


def test_exports_to_a_destination_no_longer_configured_are_dead_lettered_then_sent_on_retry(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An export whose destination was removed or renamed (here "old-pacs", in no
    ``[[destinations]]`` table) is dead-lettered at its first try, with the others queued for
    that name, naming it, in one ERROR; before, each was marked done and its result never
    left. Retried by an admin once the destination is configured again, it is sent."""
    jobs = study_with_exports(
        sessions, tmp_path, {"sr": "old-pacs", "kos": "old-pacs", "copy": "archive"}
    )
    later = study_with_exports(sessions, tmp_path, {"overlay": "old-pacs"})
    worker = _worker(tmp_path, sessions, free_port())

    with caplog.at_level(logging.INFO, logger="dicomnode.worker"):
        assert worker.run_once()

    gone = [jobs["sr"], jobs["kos"], later["overlay"]]
    assert [(j.state, j.last_error) for j in _jobs(sessions, gone)] == [
        ("dead", "destination 'old-pacs' is no longer configured")
    ] * 3
    assert [j.attempts for j in _jobs(sessions, gone)] == [1, 0, 0]  # only the one tried
    assert [(j.state, j.attempts) for j in _jobs(sessions, [jobs["copy"]])] == [("queued", 0)]
    [error] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert error.levelname == "ERROR"
    assert error.getMessage().startswith(
        "destination 'old-pacs' is no longer configured: 3 export job(s) of 2 study(ies) "
        "dead-lettered"
    )
    assert "configured destinations: archive, pacs" in error.getMessage()

    with storescp(tmp_path) as pacs:
        worker.settings.destinations.append(
            Destination(name="old-pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)
        )
        with sessions() as session:
            retry(session, session.get(Job, jobs["sr"]))
            session.commit()
        assert worker.run_once() and worker.run_once()  # the archive's, still down, then it
        [sent] = _jobs(sessions, [jobs["sr"]])
        assert (sent.state, sent.attempts) == ("done", 1)
        assert len(wait_for(pacs.received, timeout=10, what="storescp to write")) == 1


class StatusSCP:
    """A pynetdicom Storage SCP that answers every C-STORE with ``status`` (settable), and
    keeps the SOP Instance UIDs of those it answered 0x0000."""

    def __init__(self, status: int):
        from pynetdicom import AE, AllStoragePresentationContexts

        self.status = status
        self.stored: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )

    def _store(self, event: evt.Event) -> int:
        status = self.status
        if status == 0x0000:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return status

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("status", [0xA700, 0xA7FF])
def test_a_destination_out_of_resources_is_waited_for_like_one_that_is_down(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    """0xA7xx (Refused: Out of Resources, the PACS's disk full) is transient (PS3.4): the
    exports stay queued past ``max_attempts`` instead of being dead-lettered, and are sent
    once the destination takes objects again."""
    pacs = StatusSCP(status)
    try:
        jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs", "kos": "pacs"})
        worker = _worker(tmp_path, sessions, pacs.port, max_attempts=2)
        with caplog.at_level(logging.INFO, logger="dicomnode.worker"):
            for _ in range(4):  # twice the attempts a refused object gets
                _due_now(sessions, jobs.values())
                assert worker.run_once()
            states = [(job.state, job.attempts) for job in _jobs(sessions, jobs.values())]
            assert states == [("queued", 4)] * 2
            assert f"out of resources (C-STORE status 0x{status:04X})" in caplog.text
            assert "out of resources in 2 attempts" in caplog.text
            assert "dead after" not in caplog.text

            pacs.status = 0x0000
            _due_now(sessions, jobs.values())
            assert worker.run_once()
        assert [job.state for job in _jobs(sessions, jobs.values())] == ["done"] * 2
        assert len(pacs.stored) == 2
    finally:
        pacs.close()


def test_a_failure_status_other_than_out_of_resources_is_a_refusal(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    pacs = StatusSCP(0xC000)  # Error: Cannot understand
    try:
        jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs"})
        worker = _worker(tmp_path, sessions, pacs.port, max_attempts=2)
        for _ in range(2):
            _due_now(sessions, jobs.values())
            assert worker.run_once()
        [job] = _jobs(sessions, jobs.values())
        assert (job.state, job.attempts) == ("dead", 2)
        assert "C-STORE status 0xC000" in job.last_error
    finally:
        pacs.close()
