"""An idle node does (almost) nothing: its listener and worker processes block until a
connection, a job or a stop comes, and a job still reaches an idle worker at once.

An idle ``dicomnode serve`` used ~6 % of a core: each listener's acceptor looked for a stop
10 times a second (and pynetdicom garbage-collected every 6 s), the worker read SQLite's
``data_version`` 50 times a second and looked for due jobs 5 times a second per thread.
Now a listener's acceptor blocks (``BlockingAcceptor``), whoever queues a job on SQLite
sends each idle worker a datagram (:mod:`dicomnode.jobs.wakeups`), and an idle worker sleeps
until the next job is due or ``[worker] poll_seconds`` (5 s by default).

Serve itself woke ~13 times a second (0.45 % of a core): uvicorn's main loop 10 times (a
0.1 s sleep to look for a stop), and its listener and worker pools and the assembly check
once a second each. Now its web server waits for a stop, waking once a second for the Date
header (:mod:`dicomnode.web.server`), and the pools wait for a child's exit or the stop
(:mod:`dicomnode.supervision`); the assembly check still looks once a second.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import (
    POSTGRES_URL,
    launch_node,
    queue_notifications,
    require_postgres,
    wait_for,
    worker_config,
    write_config,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_jobs import make_study

from dicomnode.db.models import Job, Study
from dicomnode.db.session import make_engine, make_sessionmaker
from dicomnode.jobs.queue import enqueue, fail, postpone, release_orphaned
from dicomnode.jobs.waiting import JobSignal
from dicomnode.jobs.wakeups import Doorbell, wake_all, wake_folder

# How long the processes are watched idle.
IDLE_SECONDS = 10.0
# Before: ~10 a second per listener, ~75 for the worker (and 0.6 % + 2.3 % of a core).
LISTENER_WAKES_PER_SECOND = 2.0
WORKER_WAKES_PER_SECOND = 8.0
# Serve's own process (before: ~13; now ~2: the Date header's tick, the assembly check).
SERVE_WAKES_PER_SECOND = 4.0
# Serve, listeners and worker together, % of one core (listeners and worker were ~3.5 %;
# serve was ~0.45 % before it stopped polling, ~0.2 % after).
IDLE_CPU_PERCENT = 1.2
# How soon a signal in this process wakes on a job queued (the triage's "queued" stage is
# 15-20 ms at p50 on SQLite). Where these tests use it the signal's own fallback look is 60 s
# away, so a bound of a second tells a wake-up from a look, and a loaded CI (a thread waiting
# a few hundred ms for a core) does not fail a prompt wake-up.
CLAIM_SECONDS = 1.0
# The same for a ``dicomnode worker`` process, whose lead on the test's own process is not
# assured: 4 busy processes on 2 cores delayed a claim by up to 0.22 s. Still well short of
# the signal's fallback look at the database (FALLBACK_CHECK_SECONDS, 2 s) and of the poll.
WORKER_CLAIM_SECONDS = 0.5
# Memory-backed, where the system has it: these tests time wake-ups, and on a disk that other
# tests kept busy a commit's fsync (the queuer's, before it wakes the workers; the claim's)
# took 0.4-0.8 s: a job was claimed 0.98 s after it was due, its worker woken on time.
TMPFS = Path("/dev/shm")


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database for these tests, whose commits do not wait for the disk: what they time is
    how soon a worker is woken. SQLite: a file in :data:`TMPFS` when it is there (else in
    ``tmp_path``). PostgreSQL: a new schema, its sessions' commits not waiting for the WAL's
    flush (``synchronous_commit=off``)."""
    if request.param == "postgresql":
        require_postgres()
        import psycopg

        schema = f"t_{uuid.uuid4().hex[:12]}"
        plain = POSTGRES_URL.replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(plain, autocommit=True) as connection:
            connection.execute(f'CREATE SCHEMA "{schema}"')
        separator = "&" if "?" in POSTGRES_URL else "?"
        options = f"-csearch_path={schema} -csynchronous_commit=off"
        yield f"{POSTGRES_URL}{separator}options={quote(options)}"
        with psycopg.connect(plain, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        return
    if not (TMPFS.is_dir() and os.access(TMPFS, os.W_OK)):
        yield f"sqlite:///{tmp_path / 'dicomnode.db'}"
        return
    folder = Path(tempfile.mkdtemp(prefix="dicomnode-idle-", dir=TMPFS))
    try:
        yield f"sqlite:///{folder / 'dicomnode.db'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Usage:
    """What a process used: CPU seconds, and the times its threads went to sleep."""

    cpu_seconds: float
    wakes: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        wakes = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
            except FileNotFoundError:  # a thread that has just ended
                continue
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    wakes += int(line.split()[1])
        return cls(ticks / os.sysconf("SC_CLK_TCK"), wakes)


def children(pid: int) -> dict[str, list[int]]:
    """``serve``'s child processes by command (``listener``, ``worker``), those its threads
    started again included (each thread's children are listed under it)."""
    found: dict[str, list[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            listed = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that has just ended
            continue
        for child in listed:
            command = Path(f"/proc/{child}/cmdline").read_text().split("\0")
            found.setdefault(command[3], []).append(int(child))
    return found


def watch_idle(pids: list[int], seconds: float) -> dict[int, tuple[float, float]]:
    """Per process: (% of a core, voluntary wake-ups a second) over ``seconds`` of idling."""
    before = {pid: Usage.of(pid) for pid in pids}
    started = time.monotonic()
    time.sleep(seconds)
    after = {pid: Usage.of(pid) for pid in pids}
    spent = time.monotonic() - started
    return {
        pid: (
            100 * (after[pid].cpu_seconds - before[pid].cpu_seconds) / spent,
            (after[pid].wakes - before[pid].wakes) / spent,
        )
        for pid in pids
    }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_idle_nodes_serve_listeners_and_worker_sleep(tmp_path: Path, db_url: str) -> None:
    config, port, web_port = write_config(tmp_path, db_url)
    assert "poll_seconds" not in config.read_text()  # the default poll
    process, log = launch_node(tmp_path, config, port, web_port)
    try:
        wait_for(lambda: " ready (" in log.read_text(), 60, what="the worker ready")
        time.sleep(1.0)  # the start's last steps
        started = children(process.pid)
        listeners, workers = started["listener"], started["worker"]
        used = watch_idle([process.pid, *listeners, *workers], IDLE_SECONDS)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    report = {pid: f"{cpu:.2f} % CPU, {wakes:.1f} wake-ups/s" for pid, (cpu, wakes) in used.items()}
    for pid in listeners:
        assert used[pid][1] < LISTENER_WAKES_PER_SECOND, f"listener {pid}: {report[pid]}"
    for pid in workers:
        assert used[pid][1] < WORKER_WAKES_PER_SECOND, f"worker {pid}: {report[pid]}"
    assert used[process.pid][1] < SERVE_WAKES_PER_SECOND, f"serve: {report[process.pid]}"
    total = sum(cpu for cpu, _ in used.values())
    assert total < IDLE_CPU_PERCENT, report


@contextlib.contextmanager
def _idle_worker(folder: Path, db_url: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A stand-alone ``dicomnode worker`` (poll 60 s) started and ready; its process and
    log. Stopped (SIGTERM, else killed) on the way out unless the test stopped it."""
    # A poll far longer than the test: only a wake-up or the job's time finds the jobs.
    config = worker_config(folder, db_url, "threads = 2\npoll_seconds = 60\n")
    log = folder / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "worker", "--config", str(config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: " ready (" in log.read_text(), 60, what="the worker ready")
        yield process, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _claimed_after(sessions: sessionmaker[Session], job_id: int) -> float:
    """Seconds from when the job was due to its claim (its "queued" stage), once done."""

    def done() -> Job | None:
        with sessions() as session:
            job = session.get(Job, job_id)
            return job if job.state == "done" else None

    job = wait_for(done, 30, interval=0.05, what=f"job {job_id} done")
    return job.payload["seconds"]["queued"]


def _queue_later(sessions: sessionmaker[Session], seconds: float) -> int:
    """A notification job due ``seconds`` from now (as a retry's backoff is); its channel
    is not enabled, so that it is done as soon as it is claimed."""
    with sessions() as session:
        study_id = session.scalar(select(Study.id))
        job = enqueue(
            session,
            "notify",
            study_id,
            {"channel": "webhook"},
            now=datetime.now(UTC) + timedelta(seconds=seconds),
        )
        session.commit()
        return job.id


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_an_idle_worker_takes_a_job_at_once_and_a_later_one_when_due(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str
) -> None:
    """A ``dicomnode worker`` that looks for jobs only every 60 s claims a job that another
    process queues within 0.5 s, and one due 0.5 s later within 0.5 s of that: woken by the
    queuer (SQLite: a datagram; PostgreSQL: a NOTIFY), not by its signal's fallback look at
    an SQLite file, ~1.7 s after either was queued here, nor by its poll."""
    sqlite = db_url.startswith("sqlite")
    folder = wake_folder(db_url.removeprefix("sqlite:///")) if sqlite else None
    with _idle_worker(tmp_path, db_url) as (process, log):
        time.sleep(0.5)  # idle: its threads have looked and sleep
        _put_off_fallback_look(folder)
        (now,) = queue_notifications(sessions, "1.2.826.0.1.3680043.10.1.77", 1)
        assert _claimed_after(sessions, now) < WORKER_CLAIM_SECONDS, log.read_text()
        _put_off_fallback_look(folder)
        later = _queue_later(sessions, 0.5)
        assert _claimed_after(sessions, later) < WORKER_CLAIM_SECONDS, log.read_text()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, log.read_text()
        # Its threads sleep up to the 60 s poll: only a stop that wakes them ends it sooner.
        assert time.monotonic() - started < 5.0, "the idle worker was slow to stop"
    # Its socket is gone with it.
    assert folder is None or not list(folder.iterdir())


def _put_off_fallback_look(folder: Path | None) -> None:
    """Wake the idle worker (it finds nothing new) so that its signal's fallback look at the
    SQLite file, 2 s after its last wake-up, comes ~1.7 s after this returns: a job queued now
    is found sooner only by the queuer's wake-up (a job due later, only through it in time).
    None: PostgreSQL, where it has no such look."""
    if folder is None:
        return
    assert wake_all(folder) == 1
    time.sleep(0.3)


def test_a_job_queued_on_another_connection_wakes_a_waiting_signal_and_a_dead_workers_socket_goes(
    tmp_path: Path,
) -> None:
    """The SQLite signal wakes on the datagram of another connection's commit, not on its
    fallback look at the file; a socket left by a worker that was killed is removed by the
    first wake-up that finds nobody reading it."""
    from dicomnode.db.session import upgrade

    url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    queuer = make_engine(url)
    signal_ = JobSignal(engine, fallback_seconds=60).start()
    folder = wake_folder(str(tmp_path / "dicomnode.db"))
    assert folder is not None
    try:
        wait_for(lambda: folder.is_dir() and any(folder.iterdir()), 5, what="the socket")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        dead.bind(str(folder / "999999999.0"))
        dead.close()  # as a killed worker leaves it
        sessions = make_sessionmaker(queuer)
        with sessions() as session:
            study_id = make_study(session)
        seen = signal_.generation
        woken: list[float] = []

        def waiter() -> None:
            started = time.monotonic()
            signal_.wait(seen, timeout=10)
            woken.append(time.monotonic())
            woken.append(time.monotonic() - started)

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
        assert not woken, "woken with no job queued"
        with sessions() as session:
            enqueue(session, "analyse", study_id)
            session.commit()
            committed = time.monotonic()
        thread.join(5)
        assert woken and woken[0] - committed < CLAIM_SECONDS, woken
        assert not (folder / "999999999.0").exists()
    finally:
        signal_.stop()
        engine.dispose()
        queuer.dispose()
    assert not list(folder.iterdir()), "the signal's socket stayed after its stop"


def test_a_socket_that_fails_otherwise_does_not_keep_the_wake_up_from_the_sockets_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad entry in the wake folder (here stream sockets, which refuse a datagram with
    EPROTOTYPE as they would a root-owned worker's socket with EACCES to another user) costs
    only its own wake-up: the live workers' sockets listed after it are still woken, and the
    trouble is logged once per socket at WARNING, with its path."""
    folder = tmp_path / "dicomnode.db-workers"
    folder.mkdir()
    bad = []
    live: Doorbell | None = None
    try:
        for n in range(8):
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stale.bind(str(folder / f"99999999{n}.0"))
            bad.append(stale)
        # A live socket that the folder lists after a bad one (the order is the file
        # system's: a name that comes first is made again under the next name).
        for _ in range(50):
            live = Doorbell(folder)
            if os.listdir(folder).index(live.name) > 0:
                break
            live.close()
        else:
            pytest.fail(f"every live socket was listed first: {os.listdir(folder)}")
        with caplog.at_level("DEBUG", logger="dicomnode.jobs"):
            assert wake_all(folder) == 1
            assert live.wait(0)
            assert wake_all(folder) == 1
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == len(bad), warnings
        assert all(str(folder / "99999999") in line for line in warnings), warnings
    finally:
        if live is not None:
            live.close()
        for stale in bad:
            stale.close()


def test_a_job_queued_as_soon_as_the_signal_has_started_wakes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal's socket is there before it first looks at the queue (and before start()
    returns): a job queued after that look is rung for, not found by the fallback look.
    The socket is made slowly here, which widened the window in which such a job waited."""
    from dicomnode.db.session import upgrade

    made = Doorbell.__init__

    def slowly(self: Doorbell, folder: Path) -> None:
        time.sleep(0.3)
        made(self, folder)

    monkeypatch.setattr(Doorbell, "__init__", slowly)
    url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    queuer = make_engine(url)
    sessions = make_sessionmaker(queuer)
    with sessions() as session:
        study_id = make_study(session)
    signal_ = JobSignal(engine, fallback_seconds=60).start()
    folder = wake_folder(str(tmp_path / "dicomnode.db"))
    try:
        # A worker says "ready" once start() returns: its socket is there by then.
        assert folder is not None and folder.is_dir() and list(folder.iterdir())
        # Its first look (a job thread's next look at the queue follows it).
        seen = wait_for(lambda: signal_.generation, 5, interval=0.01, what="the first look")
        with sessions() as session:
            enqueue(session, "analyse", study_id)
            session.commit()
        started = time.monotonic()
        assert signal_.wait(seen, timeout=5) > seen
        assert time.monotonic() - started < CLAIM_SECONDS
    finally:
        signal_.stop()
        engine.dispose()
        queuer.dispose()


def _lease_elsewhere(sessions: sessionmaker[Session], owner: str) -> int:
    """A notification job leased to ``owner`` for 5 minutes (an idle worker sleeps until
    its lease ends, or its poll); its id. Its channel is not enabled: it is done as soon as
    it is claimed."""
    now = datetime.now(UTC)
    with sessions() as session:
        study = Study(
            study_instance_uid="1.2.826.0.1.3680043.10.1.78",
            received_at=now,
            last_instance_at=now,
            ready_at=now,
            due_at=now,
        )
        session.add(study)
        session.flush()
        job = enqueue(session, "notify", study.id, {"channel": "webhook"})
        job.state, job.lease_owner, job.attempts = "leased", owner, 1
        job.lease_expires_at = now + timedelta(minutes=5)
        session.commit()
        return job.id


def _fail(session: Session, job: Job, owner: str) -> float:
    assert fail(session, job, "refused", None, owner=owner, backoff_base=1.0)
    return 1.0


def _postpone(session: Session, job: Job, owner: str) -> float:
    assert postpone(session, job, 1.0, owner=owner)
    return 1.0


def _release(session: Session, job: Job, owner: str) -> float:
    assert release_orphaned(session, socket.gethostname()) == [job.id]
    return 0.0


@pytest.mark.parametrize("change", [_fail, _postpone, _release], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_put_back_in_the_queue_wakes_an_idle_worker(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str, change
) -> None:
    """A worker idle until a leased job's lease ends (or its 60 s poll) claims the job when
    its holder fails it (1 s backoff), postpones it (1 s) or is found dead, when it is due,
    not when the worker's old deadline comes."""
    owner = f"{socket.gethostname()}:999999999"  # a worker of this host, gone
    with _idle_worker(tmp_path, db_url) as (_, log):
        # Leased after the worker's start, which frees the jobs of dead workers.
        job_id = _lease_elsewhere(sessions, owner)
        # Idle: its threads have looked and sleep until the lease ends. Past its signal's
        # first fallback look (2 s), which finds the job new to it and wakes them once more.
        time.sleep(2.5)
        with sessions() as session:
            due_in = change(session, session.get(Job, job_id), owner)
        changed = time.monotonic()

        def done() -> bool:
            with sessions() as session:
                return session.get(Job, job_id).state == "done"

        wait_for(done, due_in + 5, interval=0.02, what=f"job {job_id} done")
        # Not found by the signal's fallback look (no job is new): else only at the 60 s poll.
        assert time.monotonic() - changed < due_in + 5.0, log.read_text()
