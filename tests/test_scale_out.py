"""Scale-out on PostgreSQL: three real ``dicomnode worker`` processes share one database.

Sixty critical-result notification jobs (a real handler: an HTTP POST to a webhook that
counts what it receives and answers) are each done exactly once, each worker doing some of
them, and the job of a worker killed with SIGKILL while holding its lease is taken over by
another worker once the lease expires, and done once. Until the kill its worker renews the
lease (past the end its claim gave), and no other worker takes the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import queue_notifications, wait_for, worker_config
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job
from dicomnode.db.session import as_utc, utcnow

JOBS = 60
WORKERS = 3
# The shortest lease the configuration allows: the held job's worker renews it every
# third of it while it lives, and its takeover comes this long after the kill at most.
LEASE_SECONDS = 10.0


class Webhook:
    """An HTTP receiver that counts requests and answers per Idempotency-Key. The very first
    request (its key becomes ``stall_key``) is held without an answer until the test ends;
    the others are answered once ``WORKERS`` requests have been in at once: with one thread
    per worker, one from each worker, so that each does some of the jobs however unevenly a
    loaded machine wakes them."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.stall_key = ""
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.in_flight = 0
        self.all_asked = threading.Event()
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                key = self.headers["Idempotency-Key"]
                with hook.lock:
                    hook.received[key] += 1
                    stall = not hook.stall_key
                    if stall:
                        hook.stall_key = key
                    hook.in_flight += 1
                    if hook.in_flight >= WORKERS:
                        hook.all_asked.set()
                if stall:
                    hook.stalled.set()
                    hook.release.wait(60)
                    return  # no answer: the worker was killed waiting for it
                hook.all_asked.wait(60)
                time.sleep(0.01)  # a receiver takes a little time; jobs spread over workers
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with hook.lock:
                    hook.answered[key] += 1
                    hook.in_flight -= 1

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
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _config(folder: Path, db_url: str, webhook_url: str) -> Path:
    return worker_config(
        folder,
        db_url,
        f"threads = 1\nlease_seconds = {LEASE_SECONDS}\npoll_seconds = 0.2\n",
        f'[notify]\nwebhook_enabled = true\nwebhook_url = "{webhook_url}"\n'
        "webhook_timeout_seconds = 60\n",
    )


def _queue_notifications(sessions: sessionmaker[Session]) -> list[int]:
    return queue_notifications(sessions, "1.2.826.0.1.3680043.10.1.8", JOBS)


def _jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_three_workers_do_every_job_once_and_take_over_a_killed_workers_job(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str, webhook: Webhook
) -> None:
    config = _config(tmp_path, db_url, webhook.url)
    workers = {}
    for index in range(WORKERS):
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "worker", "--config", str(config)],
            stdout=(tmp_path / f"worker{index}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        workers[process.pid] = process
    try:
        # Every worker started before the jobs are queued, so that they all take part and
        # the first job's lease is still held when it is read below, and before the kill:
        # one starting after it would free the dead worker's lease at once
        # (Worker.free_orphaned_jobs), not when the lease runs out.
        wait_for(
            lambda: all(
                " ready" in (tmp_path / f"worker{index}.log").read_text()
                for index in range(WORKERS)
            ),
            timeout=60,
            what="every worker ready",
        )
        ids = _queue_notifications(sessions)
        # The first job a worker takes: its webhook call hangs until its worker is killed.
        assert webhook.stalled.wait(60), "no worker took a job"
        stalled_id = int(webhook.stall_key.rsplit("-", 1)[1])
        holder = next(job for job in _jobs(sessions) if job.id == stalled_id)
        assert holder.state == "leased"
        killed = int(holder.lease_owner.rsplit(":", 1)[1])
        assert killed in workers
        claimed_until = as_utc(holder.lease_expires_at)

        def renewed() -> bool:
            # Past the end its claim gave, the job is still its worker's: its lease renewed.
            job = next(job for job in _jobs(sessions) if job.id == stalled_id)
            assert (job.state, job.lease_owner, job.attempts) == ("leased", holder.lease_owner, 1)
            return utcnow() > claimed_until and as_utc(job.lease_expires_at) > utcnow()

        wait_for(renewed, timeout=60, interval=0.2, what="the held job's lease renewed")
        os.kill(killed, signal.SIGKILL)
        workers[killed].wait(timeout=10)
        killed_at = time.monotonic()

        def all_done() -> list[Job] | None:
            jobs = _jobs(sessions)
            return jobs if all(job.state == "done" for job in jobs) else None

        jobs = wait_for(all_done, timeout=90, interval=0.2, what="every job done")
        taken_over_after = time.monotonic() - killed_at
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.terminate()
        for process in workers.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("worker*.log")))

    keys = {f"dicomnode-notify-{job_id}" for job_id in ids}
    # Every notification was answered exactly once; only the killed worker's was sent twice.
    assert webhook.answered == Counter(keys), logs
    assert webhook.received == Counter(keys) + Counter({webhook.stall_key: 1}), logs
    by_id = {job.id: job for job in jobs}
    taken = by_id[stalled_id]
    assert taken.attempts == 2
    assert int(taken.lease_owner.rsplit(":", 1)[1]) not in (killed, 0)
    assert all(by_id[job_id].attempts == 1 for job_id in ids if job_id != stalled_id)
    # The work was shared: both surviving workers did jobs.
    owners = Counter(int(job.lease_owner.rsplit(":", 1)[1]) for job in jobs)
    assert set(owners) == set(workers) - {killed}, owners
    # Taken over once the lease ran out (claimed again at run_after + queued seconds), not
    # before it and not much later.
    taken_over_at = as_utc(taken.run_after) + timedelta(seconds=taken.payload["seconds"]["queued"])
    assert taken_over_at >= as_utc(holder.lease_expires_at)
    assert taken_over_after < LEASE_SECONDS + 30
    assert "Traceback" not in logs
