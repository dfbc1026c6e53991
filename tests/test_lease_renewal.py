"""A running job's worker renews its lease, so that no other worker takes the job over while
it runs, however long that takes; once the renewals stop (its worker died), another takes it
over when the lease runs out.

The acceptance test found analyses of ~4 s run at once on two or three workers with
``lease_seconds = 2`` (nothing renewed a lease: "lease expired while running; another worker
owns it", duplicate result objects), and the default lease of 5 minutes kept a dead host's
jobs for as long. The job here is a critical-result notification whose webhook call is held
until the test lets it go (a real HTTP receiver), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import queue_notifications, wait_for
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import MIN_LEASE_SECONDS, Settings, WorkerSettings, load_settings
from dicomnode.db.models import Job
from dicomnode.db.session import as_utc, utcnow
from dicomnode.tomlfile import ConfigError
from dicomnode.worker import Worker

# Shorter than the configuration allows (set on the settings, unvalidated), so that the test
# outlives a lease in seconds: renewed every second.
LEASE_SECONDS = 3.0


class HeldWebhook:
    """An HTTP receiver whose first request is answered only once ``release`` is set; the
    others at once."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.release = threading.Event()
        self.requests = 0
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    hook.requests += 1
                    first = hook.requests == 1
                if first:
                    hook.held.set()
                    hook.release.wait(120)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[HeldWebhook]:
    hook = HeldWebhook()
    yield hook
    hook.close()


def _lease(sessions: sessionmaker[Session], job_id: int) -> tuple[str, str, datetime, int]:
    """The job's state, lease owner, lease end and attempts."""
    with sessions() as session:
        job = session.get(Job, job_id)
        expires = as_utc(job.lease_expires_at) if job.lease_expires_at else datetime.min
        return job.state, job.lease_owner, expires, job.attempts


def test_a_job_keeps_its_lease_while_its_worker_runs_it_and_is_taken_over_once_renewals_stop(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    webhook: HeldWebhook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(
        storage={"path": tmp_path / "storage"},
        worker={"threads": 1, "poll_seconds": 0.2},
        notify={
            "webhook_enabled": True,
            "webhook_url": webhook.url,
            "webhook_timeout_seconds": 120.0,
        },
    )
    settings.worker.lease_seconds = LEASE_SECONDS
    (job_id,) = queue_notifications(sessions, "1.2.826.0.1.3680043.10.1.81", 1)
    running = Worker(settings, sessions, cards=[])
    other = Worker(settings, sessions, cards=[])
    other.owner = "another-host:2"
    stop = threading.Event()
    runner = threading.Thread(target=running.run_forever, args=(stop,), name="worker-a")
    try:
        with caplog.at_level(logging.WARNING, logger="dicomnode.worker"):
            runner.start()
            assert webhook.held.wait(60), "the worker did not take the job"
            # Read (on SQLite in a write transaction: BEGIN IMMEDIATE) while the call is held:
            # the job thread holds no transaction meanwhile, else this read, and every
            # renewal, waited for the webhook's answer.
            state, owner, claimed_until, attempts = _lease(sessions, job_id)
            assert (state, owner, attempts) == ("leased", running.owner, 1)

            def renewed() -> bool:
                # Past the end of the lease the claim gave, and the lease still has a third
                # of its length to run (renewed, not just about to end).
                state, owner, until, _ = _lease(sessions, job_id)
                now = utcnow()
                return (
                    state == "leased"
                    and owner == running.owner
                    and now > claimed_until
                    and until > now + timedelta(seconds=LEASE_SECONDS / 3)
                )

            wait_for(renewed, timeout=60, interval=0.1, what="the lease renewed past its end")
            # Another worker looks now: the job is not due (before, its lease had ended).
            assert not other.run_once()
            assert _lease(sessions, job_id)[1:4:2] == (running.owner, 1)
            assert webhook.requests == 1

            # The running worker stops renewing (as a dead one does): the other worker takes
            # the job over once the lease runs out, and does it.
            running.leases.stop()
            wait_for(other.run_once, timeout=60, interval=0.1, what="the job taken over")
            state, owner, _, attempts = _lease(sessions, job_id)
            assert (state, owner, attempts) == ("done", other.owner, 2)
            assert webhook.requests == 2

            # The first worker's call is answered at last: it finds the job is another's,
            # as before (nothing recorded).
            webhook.release.set()
            wait_for(
                lambda: "lease expired while running" in caplog.text,
                timeout=60,
                what="the first worker to find it lost the lease",
            )
    finally:
        webhook.release.set()
        stop.set()
        runner.join(timeout=60)
    assert not runner.is_alive()
    assert _lease(sessions, job_id)[:2] == ("done", other.owner)
    assert f"job {job_id}: lease expired while running; another worker owns it" in caplog.text


@pytest.mark.parametrize("value", [0.5, 2.0, 9.9])
def test_a_lease_too_short_to_renew_is_a_configuration_error(tmp_path: Path, value: float) -> None:
    config = tmp_path / "dicomnode.toml"
    config.write_text(f"[worker]\nlease_seconds = {value}\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert "lease_seconds" in message and f"{MIN_LEASE_SECONDS:g} seconds" in message
    assert WorkerSettings().lease_seconds == 60.0
    assert WorkerSettings(lease_seconds=MIN_LEASE_SECONDS).lease_seconds == MIN_LEASE_SECONDS


def _claimed(sessions: sessionmaker[Session], owner: str, study_uid: str, lease: float) -> int:
    """A notification job claimed by ``owner`` with a lease of ``lease`` seconds; its id."""
    from dicomnode.jobs.queue import claim

    (job_id,) = queue_notifications(sessions, study_uid, 1)
    with sessions() as session:
        job = claim(session, owner, ["notify"], lease_seconds=lease)
        assert job is not None and job.id == job_id
    return job_id


def test_a_job_running_longer_than_max_job_seconds_is_no_longer_renewed(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """A job past ``[worker] max_job_seconds`` (its thread may hang: a wedged device call)
    keeps the lease its last renewal gave and no more, with one ERROR, so that another
    worker takes it over, as before leases were renewed; renewals would else keep a hung
    job from every other worker for as long as its process lives."""
    from dicomnode.jobs.leases import LeaseRenewer

    owner = "this-host:1"
    job_id = _claimed(sessions, owner, "1.2.826.0.1.3680043.10.1.91", MIN_LEASE_SECONDS)
    claimed_until = _lease(sessions, job_id)[2]
    renewer = LeaseRenewer(sessions, lambda: owner, lambda: MIN_LEASE_SECONDS, lambda: 0.5)
    renewer.start()
    try:
        with caplog.at_level(logging.ERROR, logger="dicomnode.worker"), renewer.running([job_id]):
            wait_for(
                lambda: "longer than [worker] max_job_seconds" in caplog.text,
                timeout=30,
                what="the job given up",
            )
            assert _lease(sessions, job_id)[2] == claimed_until
    finally:
        renewer.stop()
    assert caplog.text.count(f"job {job_id} has run for") == 1


def test_a_job_claimed_after_a_reload_shortened_the_lease_is_renewed_in_time(
    sessions: sessionmaker[Session],
) -> None:
    """A reload shortens ``lease_seconds`` from 60 to 10 while a job runs (its next renewal
    20 s away); a job claimed then, with a 10 s lease, is renewed within a third of that.
    Before, the renewal thread slept to the deadline of the old lease and the new job's
    lease ran out first: another worker took it over."""
    from dicomnode.jobs.leases import LeaseRenewer

    owner = "this-host:2"
    lease = {"seconds": 60.0}
    asked: list[float] = []

    def lease_seconds() -> float:
        asked.append(lease["seconds"])
        return lease["seconds"]

    first = _claimed(sessions, owner, "1.2.826.0.1.3680043.10.1.92", 60.0)
    renewer = LeaseRenewer(sessions, lambda: owner, lease_seconds)
    renewer.start()
    try:
        with renewer.running([first]):
            # The renewal thread has planned the first job's renewal by the 60 s lease.
            wait_for(lambda: asked, timeout=30, interval=0.01, what="the first renewal planned")
            lease["seconds"] = MIN_LEASE_SECONDS
            second = _claimed(sessions, owner, "1.2.826.0.1.3680043.10.1.93", MIN_LEASE_SECONDS)
            claimed_until = _lease(sessions, second)[2]
            with renewer.running([second]):
                wait_for(
                    lambda: _lease(sessions, second)[2] > claimed_until,
                    timeout=MIN_LEASE_SECONDS * 0.9,  # before its lease ends
                    interval=0.1,
                    what="the new job's lease renewed",
                )
    finally:
        renewer.stop()
