"""How failed export attempts are counted and logged: every failed attempt in
``dicomnode_export_attempts_failed_total`` once, one WARNING per failed association and no
pynetdicom ERROR lines (also when the association ends after it was established), and a
destination that stays down warned of at most once per :data:`OUTAGE_WARNING_SECONDS`
(SQLite and PostgreSQL)."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import dcmtk, free_port, storescp, wait_for, wait_for_port
from pynetdicom import evt
from pynetdicom.association import Association
from sqlalchemy.orm import Session, sessionmaker
from test_export import _due_now, _jobs, _sample, _worker, study_with_exports

from dicomnode.db.models import Job
from dicomnode.export import jobs as export_jobs
from dicomnode.export import scu


@contextmanager
def _storescp_process(where: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A dcmtk storescp (AE title PACS) whose process the test can stop or kill."""
    port = free_port()
    folder = where / "pacs"
    folder.mkdir()
    log = where / "storescp.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [dcmtk("storescp"), "--aetitle", "PACS", "--output-directory", str(folder), str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, log=log)
        yield port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait(timeout=10)


@pytest.mark.parametrize("fault", ["stops answering", "dies"])
def test_an_association_that_fails_once_established_is_one_warning_without_pynetdicom_errors(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """The PACS accepts the association, then stops answering (SIGSTOP: pynetdicom's DIMSE
    timeout, then it aborts) or dies (SIGKILL: the connection closes under the send). One
    WARNING naming the destination says so; pynetdicom's own ERROR lines for it ("DIMSE
    timeout reached while waiting for message response", "Connection closed ...") are at
    DEBUG. Before: those ERRORs besides the WARNING."""
    faulted: list[str] = []
    with _storescp_process(tmp_path) as (port, process):
        established = scu.keep_responses

        def fault_once_sent(event: evt.Event) -> None:
            if process.poll() is None and not faulted:
                faulted.append(fault)
                process.send_signal(
                    signal.SIGSTOP if fault == "stops answering" else signal.SIGKILL
                )

        def then_fault(assoc: Association) -> None:
            # Once the first C-STORE request is out, as the send waits for its response.
            assoc.bind(evt.EVT_DIMSE_SENT, fault_once_sent)
            established(assoc)

        monkeypatch.setattr(scu, "keep_responses", then_fault)
        jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs", "kos": "pacs"})
        worker = _worker(tmp_path, sessions, port, timeout_seconds=1.0)

        with caplog.at_level(logging.DEBUG):
            assert worker.run_once()
        assert faulted

    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, r.name) for r in loud] == [("WARNING", "dicomnode.worker")], [
        (r.name, r.getMessage()) for r in loud
    ]
    assert loud[0].getMessage().startswith(f"export to pacs (PACS@127.0.0.1:{port}) failed")
    quiet = [r for r in caplog.records if r.name.startswith("pynetdicom")]
    assert quiet and all(r.levelno <= logging.INFO for r in quiet)
    said = [r.getMessage() for r in caplog.records if "pynetdicom:" in r.getMessage()]
    assert all(line.startswith("association to pacs (") for line in said), said
    if fault == "stops answering":
        assert "DIMSE timeout reached" in loud[0].getMessage()
    assert [(job.state, job.attempts) for job in _jobs(sessions, jobs.values())] == [
        ("queued", 1)
    ] * 2


@pytest.mark.parametrize(
    "where", ["before the send", "while recording the job", "while recording the failure"]
)
def test_an_export_attempt_that_raises_counts_once_as_a_failed_attempt(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """An export attempt that raises something unexpected (here: reading how long its jobs
    were queued; recording the claimed job's failed attempt; reading when its jobs are tried next,
    after the failures were recorded) is a failed attempt in
    ``dicomnode_export_attempts_failed_total`` once, and its object not sent in
    ``dicomnode_export_failures_total`` once; before, one that raised before the send counted
    only in the latter, and one that raised after the failures were counted counted its object
    twice (the worker's record of the failure counted it again)."""

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("unexpected")

    jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs"})
    worker = _worker(tmp_path, sessions, free_port())
    if where == "while recording the job":
        record = worker.record_failed_attempt
        raised: list[int] = []

        def broken_once(session: Session, job: Job, reason: str, unreachable: bool) -> bool:
            if not raised:
                raised.append(job.id)
                raise RuntimeError("unexpected")
            return record(session, job, reason, unreachable)

        monkeypatch.setattr(worker, "record_failed_attempt", broken_once)
    else:
        monkeypatch.setattr(
            export_jobs, "queued_seconds" if where == "before the send" else "as_utc", broken
        )
    objects = _sample("dicomnode_export_failures_total", "pacs")
    attempts = _sample("dicomnode_export_attempts_failed_total", "pacs")

    assert worker.run_once()

    [job] = _jobs(sessions, jobs.values())
    assert (job.state, job.attempts) == ("queued", 1)
    assert _sample("dicomnode_export_attempts_failed_total", "pacs") == attempts + 1
    assert _sample("dicomnode_export_failures_total", "pacs") == objects + 1


def test_a_destination_down_for_many_studies_is_warned_of_once_a_minute(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three studies wait for a destination that is down: each study's exports are still
    tried and backed off on their own, but only the outage's first failed attempt is a
    WARNING, and then one a minute at most, saying how many attempts failed since; the others
    are at INFO. An INFO says when it answers again, and a new outage is warned of at once.
    Before: a WARNING per study and retry round."""
    port = free_port()
    studies = [study_with_exports(sessions, tmp_path, {f"sr-{n}": "pacs"}) for n in range(3)]
    ids = [job_id for study in studies for job_id in study.values()]
    worker = _worker(tmp_path, sessions, port)
    clock = [1000.0]
    worker.exports.outages.clock = lambda: clock[0]

    def retry_round() -> list[tuple[str, str]]:
        caplog.clear()
        _due_now(sessions, ids)
        for _ in ids:
            assert worker.run_once()
        return [
            (r.levelname, r.getMessage())
            for r in caplog.records
            if r.getMessage().startswith("export to pacs")
        ]

    with caplog.at_level(logging.INFO, logger="dicomnode.worker"):
        first = retry_round()
        assert [level for level, _ in first] == ["WARNING", "INFO", "INFO"]
        assert "failing since" not in first[0][1]  # the outage's first attempt
        clock[0] += 30
        assert [level for level, _ in retry_round()] == ["INFO"] * 3
        clock[0] += 31
        third = retry_round()
        assert [level for level, _ in third] == ["WARNING", "INFO", "INFO"]
        assert "7 failed attempt(s), 5 of them since the last warning (at INFO)" in third[0][1]
        assert [(job.state, job.attempts) for job in _jobs(sessions, ids)] == [("queued", 3)] * 3

        with storescp(tmp_path, port=port) as pacs:
            caplog.clear()
            _due_now(sessions, ids[:1])
            assert worker.run_once()
            [answers] = [r for r in caplog.records if "answers again" in r.getMessage()]
            assert answers.levelname == "INFO"
            assert answers.getMessage().startswith(
                "destination pacs answers again: 2 waiting export(s) due now; failing since "
            )
            assert answers.getMessage().endswith(", 9 failed attempt(s)")
            assert worker.run_once() and worker.run_once()
            assert len(wait_for(lambda: len(pacs.received()) == 3 and pacs.received())) == 3
        assert [job.state for job in _jobs(sessions, ids)] == ["done"] * 3

        more = study_with_exports(sessions, tmp_path, {"sr-3": "pacs"})
        caplog.clear()
        assert worker.run_once()
        [again] = [r for r in caplog.records if r.getMessage().startswith("export to pacs")]
        assert again.levelname == "WARNING"  # a new outage: warned of at once
        assert _jobs(sessions, more.values())[0].state == "queued"
