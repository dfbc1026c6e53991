"""The database job queue on SQLite and PostgreSQL: leases, backoff, dead letters, and
concurrent claims."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job, Study
from dicomnode.db.session import as_utc
from dicomnode.jobs.queue import claim, complete, due, enqueue, fail, postpone

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def make_study(session: Session, uid: str = "1.2.3.4") -> int:
    study = Study(
        study_instance_uid=uid, received_at=T0, last_instance_at=T0, ready_at=T0, due_at=T0
    )
    session.add(study)
    session.commit()
    return study.id


def queued_job(sessions: sessionmaker[Session], kind: str) -> int:
    """The id of a ``kind`` job queued at T0 for a new study."""
    with sessions() as session:
        job = enqueue(session, kind, make_study(session), now=T0)
        session.commit()
        return job.id


def stored(sessions: sessionmaker[Session], job_id: int) -> Job:
    """The job as the database has it (a fresh session, nothing cached)."""
    with sessions() as session:
        return session.get(Job, job_id)


def test_enqueue_then_claim_leases_to_owner(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        study_id = make_study(session)
        job = enqueue(session, "analyse", study_id, {"generation": 1}, now=T0)
        session.commit()
        job_id = job.id

    with sessions() as session:
        claimed = claim(session, "worker-a", ["analyse"], lease_seconds=30, now=seconds(1))
        assert claimed is not None
        assert claimed.id == job_id
        assert claimed.lease_owner == "worker-a"
        assert claimed.attempts == 1
        assert claimed.payload == {"generation": 1}

    row = stored(sessions, job_id)
    assert row.state == "leased"
    assert row.lease_owner == "worker-a"
    assert row.attempts == 1
    assert as_utc(row.lease_expires_at) == seconds(31)

    with sessions() as session:
        assert claim(session, "worker-b", ["analyse"], 30, now=seconds(2)) is None


def test_claim_skips_other_kinds_and_future_jobs(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        study_id = make_study(session)
        later = enqueue(session, "analyse", study_id, now=seconds(60))
        export = enqueue(session, "export", study_id, now=T0)
        session.commit()
        later_id, export_id = later.id, export.id

    with sessions() as session:
        assert claim(session, "w", ["analyse"], 30, now=seconds(59)) is None
        claimed = claim(session, "w", ["analyse"], 30, now=seconds(60))
        assert claimed is not None and claimed.id == later_id
        claimed = claim(session, "w", ["export", "analyse"], 30, now=seconds(61))
        assert claimed is not None and claimed.id == export_id


def test_claim_takes_oldest_due_job_first(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        study_id = make_study(session)
        newer = enqueue(session, "analyse", study_id, now=seconds(5))
        older = enqueue(session, "analyse", study_id, now=seconds(1))
        session.commit()
        order = [older.id, newer.id]
    with sessions() as session:
        assert [claim(session, "w", ["analyse"], 30, now=seconds(10)).id for _ in order] == order


def test_expired_lease_is_claimed_by_another_owner(sessions: sessionmaker[Session]) -> None:
    job_id = queued_job(sessions, "analyse")
    with sessions() as session:
        assert claim(session, "dead-worker", ["analyse"], 10, now=T0).id == job_id
        # Still leased at the deadline itself.
        assert claim(session, "worker-b", ["analyse"], 10, now=seconds(10)) is None
        taken = claim(session, "worker-b", ["analyse"], 10, now=seconds(10.5))
        assert taken is not None and taken.id == job_id
    row = stored(sessions, job_id)
    assert row.lease_owner == "worker-b"
    assert row.attempts == 2
    assert as_utc(row.lease_expires_at) == seconds(20.5)


def test_fail_backs_off_exponentially_then_dead_letters(sessions: sessionmaker[Session]) -> None:
    job_id = queued_job(sessions, "export")

    now = T0
    for attempt, backoff in ((1, 2), (2, 4), (3, 8)):
        with sessions() as session:
            job = claim(session, "w", ["export"], 30, now=now)
            assert job is not None and job.id == job_id and job.attempts == attempt
            fail(session, job, f"PACS refused #{attempt}", max_attempts=4, now=now)
        row = stored(sessions, job_id)
        assert row.state == "queued"
        assert as_utc(row.run_after) == now + timedelta(seconds=backoff)
        assert row.lease_expires_at is None
        with sessions() as session:
            early = now + timedelta(seconds=backoff - 0.5)
            assert claim(session, "w", ["export"], 30, now=early) is None
        now = now + timedelta(seconds=backoff)

    with sessions() as session:
        job = claim(session, "w", ["export"], 30, now=now)
        assert job.attempts == 4
        fail(session, job, "PACS refused #4", max_attempts=4, now=now)
    row = stored(sessions, job_id)
    assert row.state == "dead"
    assert row.last_error == "PACS refused #4"
    assert as_utc(row.finished_at) == now
    with sessions() as session:
        assert claim(session, "w", ["export"], 30, now=now + timedelta(days=1)) is None


def test_postpone_requeues_without_using_an_attempt(sessions: sessionmaker[Session]) -> None:
    job_id = queued_job(sessions, "results")
    with sessions() as session, sessions() as other:
        job = claim(session, "w", ["results"], 30, now=T0)
        assert postpone(session, job, 1.5, now=seconds(1), owner="w")
        # Not due until 1.5 s later; then claimed with its first attempt still to use.
        assert claim(other, "w", ["results"], 30, now=seconds(2)) is None
        again = claim(other, "w", ["results"], 30, now=seconds(2.5))
        assert (again.id, again.attempts) == (job_id, 1)
        # A worker that lost the lease cannot put the job back.
        assert not postpone(session, job, 1.5, now=seconds(40), owner="late")
    assert stored(sessions, job_id).state == "leased"


def test_complete_marks_done(sessions: sessionmaker[Session]) -> None:
    job_id = queued_job(sessions, "analyse")
    with sessions() as session:
        job = claim(session, "w", ["analyse"], 5, now=T0)
        complete(session, job, now=seconds(3))
    row = stored(sessions, job_id)
    assert row.state == "done"
    assert as_utc(row.finished_at) == seconds(3)
    assert row.lease_expires_at is None
    with sessions() as session:
        # Done is final: not claimed again, not even after the old lease would have expired.
        assert claim(session, "w", ["analyse"], 5, now=seconds(3600)) is None


def claim_in_threads(
    sessions: sessionmaker[Session], kinds: list[str], workers: int = 3
) -> dict[str, list[tuple[str, int]]]:
    """``workers`` threads, each with its own session, claim jobs of ``kinds`` at the same
    time until none is left; the (kind, id) of what each owner claimed, in order."""
    claimed: dict[str, list[tuple[str, int]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def worker(owner: str) -> None:
        mine = claimed.setdefault(owner, [])
        try:
            start.wait()
            with sessions() as session:
                while (job := claim(session, owner, kinds, 300)) is not None:
                    mine.append((job.kind, job.id))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return claimed


def test_concurrent_claims_take_each_job_exactly_once(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        study_id = make_study(session)
        for _ in range(30):
            enqueue(session, "analyse", study_id, now=T0)
        session.commit()
        ids = sorted(job.id for job in session.scalars(select(Job)))
    assert len(ids) == 30

    claimed = {
        owner: [job_id for _, job_id in jobs]
        for owner, jobs in claim_in_threads(sessions, ["analyse"]).items()
    }
    everything = [job_id for jobs in claimed.values() for job_id in jobs]
    assert sorted(everything) == ids, claimed
    with sessions() as session:
        owners = session.execute(
            select(Job.lease_owner, func.count()).where(Job.attempts == 1).group_by(Job.lease_owner)
        ).all()
    assert {owner: count for owner, count in owners} == {o: len(j) for o, j in claimed.items() if j}


def test_worker_that_lost_its_lease_cannot_finish_or_fail_the_job(
    sessions: sessionmaker[Session],
) -> None:
    job_id = queued_job(sessions, "analyse")
    with sessions() as slow, sessions() as fast:
        stale = claim(slow, "slow-worker", ["analyse"], 10, now=T0)
        assert claim(fast, "fast-worker", ["analyse"], 10, now=seconds(11)).id == job_id
        assert not complete(slow, stale, now=seconds(12), owner="slow-worker")
        assert not fail(slow, stale, "late failure", 5, now=seconds(12), owner="slow-worker")
    row = stored(sessions, job_id)
    assert (row.state, row.lease_owner, row.last_error) == ("leased", "fast-worker", "")
    with sessions() as session:
        assert complete(session, session.get(Job, job_id), now=seconds(13), owner="fast-worker")
    assert stored(sessions, job_id).state == "done"


def test_claim_takes_the_most_urgent_kind_first_then_the_oldest(
    sessions: sessionmaker[Session],
) -> None:
    # Enqueued oldest first in the reverse of their urgency (and an unknown kind oldest of all).
    order = ["other", "results", "results", "export", "export", "analyse", "notify", "analyse"]
    with sessions() as session:
        study_id = make_study(session)
        jobs = [enqueue(session, kind, study_id, now=seconds(n)) for n, kind in enumerate(order)]
        session.commit()
        expected = [jobs[n].id for n in (6, 5, 7, 3, 4, 1, 2, 0)]
    with sessions() as session:
        claimed = [claim(session, "w", sorted(set(order)), 30, now=seconds(10)) for _ in order]
        assert [job.id for job in claimed] == expected
        assert claim(session, "w", sorted(set(order)), 30, now=seconds(10)) is None


def test_concurrent_claims_of_mixed_kinds_each_take_the_most_urgent_left(
    sessions: sessionmaker[Session],
) -> None:
    # PostgreSQL: FOR UPDATE SKIP LOCKED with the ORDER BY on the kind's priority.
    kinds = ["results", "export", "analyse", "notify"] * 8
    with sessions() as session:
        study_id = make_study(session)
        for n, kind in enumerate(kinds):
            enqueue(session, kind, study_id, now=seconds(n))
        session.commit()
    priority = {"notify": 0, "analyse": 1, "export": 2, "results": 3}
    claimed = {
        owner: [(priority[kind], job_id) for kind, job_id in jobs]
        for owner, jobs in claim_in_threads(sessions, list(priority)).items()
    }
    everything = sorted(job_id for jobs in claimed.values() for _, job_id in jobs)
    assert len(everything) == len(kinds) == len(set(everything))
    # Nothing more urgent was left when each job was claimed: every owner's claims are in
    # order of urgency (jobs of one kind oldest first).
    for jobs in claimed.values():
        assert jobs == sorted(jobs), jobs


def test_due_says_whether_claim_would_find_a_job(sessions: sessionmaker[Session]) -> None:
    job_id = queued_job(sessions, "analyse")
    with sessions() as session:
        assert not due(session, ["export", "results"], now=seconds(1))  # other kinds only
        assert due(session, ["analyse"], now=T0)
        assert claim(session, "w", ["analyse"], 10, now=T0).id == job_id
        assert not due(session, ["analyse"], now=seconds(5))  # leased
        assert due(session, ["analyse"], now=seconds(11))  # the lease expired
        session.get(Job, job_id).state = "done"
        session.commit()
        assert not due(session, ["analyse"], now=seconds(11))


def test_an_idle_worker_polls_without_taking_the_sqlite_write_lock(tmp_path) -> None:
    # Idle workers poll several times a second; a poll that took the write lock would hold
    # up the index writer, and a worker frozen in it (SIGSTOP, swapped out) would stop ingest
    # from indexing until its busy timeout.
    from dicomnode.config import Settings
    from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
    from dicomnode.worker import Worker

    path = tmp_path / "dicomnode.db"
    upgrade(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}")
    sessions = make_sessionmaker(engine)
    job_id = queued_job(sessions, "analyse")
    with sessions() as session:
        session.get(Job, job_id).run_after = datetime(2999, 1, 1, tzinfo=UTC)  # not due
        session.commit()
    worker = Worker(Settings(), sessions, cards=[])
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process's write transaction, held
    polls: list[bool] = []
    poll = threading.Thread(target=lambda: polls.append(worker.run_once()), daemon=True)
    try:
        poll.start()
        poll.join(5)
        assert polls == [False], "the idle poll waited for the write lock"
    finally:
        writer.rollback()
        poll.join(35)
        writer.close()
        engine.dispose()


def test_a_starting_worker_takes_over_at_once_what_its_hosts_dead_workers_held(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """After a crash or a kill the restarted node's worker frees the leases of this host's
    worker processes that are gone (they ran for lease_seconds, a minute by default); a live
    process's lease and another host's stay."""
    from dicomnode.config import Settings
    from dicomnode.db.session import utcnow
    from dicomnode.worker import Worker

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    owners = [f"{host}:{gone.pid}", f"{host}:{os.getpid()}", "another-host:1"]
    held = []
    for index, owner in enumerate(owners):
        with sessions() as session:
            enqueue(session, "analyse", make_study(session, f"1.2.3.{index}"), now=T0)
            session.commit()
        with sessions() as session:
            held.append(claim(session, owner, ["analyse"], lease_seconds=300, now=utcnow()).id)

    with caplog.at_level(logging.WARNING, logger="dicomnode.worker"):
        Worker(Settings(), sessions, cards=[]).free_orphaned_jobs()

    with sessions() as session:
        taken = claim(session, "restarted", ["analyse"], lease_seconds=300, now=utcnow())
        assert taken is not None and taken.id == held[0]
        assert taken.attempts == 2  # the interrupted attempt counts
        assert claim(session, "restarted", ["analyse"], lease_seconds=300, now=utcnow()) is None
    assert f"jobs {held[0]} were held by worker processes of this host that are gone" in (
        caplog.text
    )


def test_the_jobs_of_a_dead_worker_are_taken_over_and_said_once_by_the_workers_that_start(
    db_url: str, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """After a crash each worker that starts frees the jobs of the dead ones: the second
    found the leases the first had ended and ended them again, and both logged "jobs ...
    were held by worker processes of this host that are gone; taken over now" for the same
    jobs. Only the worker whose takeover changed the rows says so; each worker has its own
    engine, as in its own process."""
    from dicomnode.config import Settings
    from dicomnode.db.session import make_engine, make_sessionmaker, utcnow
    from dicomnode.jobs.queue import release_orphaned
    from dicomnode.worker import Worker

    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = f"{socket.gethostname()}:{gone.pid}"
    held = []
    for index in range(2):
        with sessions() as session:
            enqueue(session, "analyse", make_study(session, f"1.2.4.{index}"), now=T0)
            session.commit()
        with sessions() as session:
            held.append(claim(session, owner, ["analyse"], lease_seconds=300, now=utcnow()).id)

    other = make_engine(db_url)
    try:
        with caplog.at_level(logging.WARNING, logger="dicomnode.worker"):
            Worker(Settings(), sessions, cards=[]).free_orphaned_jobs()
            Worker(Settings(), make_sessionmaker(other), cards=[]).free_orphaned_jobs()
        with make_sessionmaker(other)() as session:
            assert release_orphaned(session, socket.gethostname()) == []
    finally:
        other.dispose()
    said = [r.getMessage() for r in caplog.records if "held by worker processes" in r.getMessage()]
    assert said == [
        f"jobs {', '.join(map(str, held))} were held by worker processes of this host that "
        "are gone; taken over now"
    ]
    with sessions() as session:
        taken = {claim(session, "restarted", ["analyse"], 300, now=utcnow()).id for _ in held}
        assert taken == set(held)
