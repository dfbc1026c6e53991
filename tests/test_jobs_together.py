"""Jobs claimed together (a study's exports to one destination, sent over one association),
on SQLite and PostgreSQL: the job claimed and those that go with it are taken in one
transaction, and another worker claiming at the same time takes none of them for an
association of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import StoreSCP, free_port, wait_for
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker
from test_export import _jobs, _sample, _worker, study_with_exports

from dicomnode.db.models import Job
from dicomnode.db.session import make_engine, make_sessionmaker
from dicomnode.export import jobs as export_jobs
from dicomnode.export.jobs import TOGETHER
from dicomnode.jobs.queue import Together, claim_together


def test_a_worker_claiming_while_another_takes_a_studys_exports_takes_none_of_them(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path, pacs: StoreSCP
) -> None:
    """A second worker (its own connections) runs as soon as the first worker's claim has
    committed: it finds nothing to do, and the study's four objects reach the PACS over one
    association. Before, the first worker's claim leased its job alone and its study's
    other exports were claimed in a second transaction: the second worker took them in
    between, and the study went over two associations."""
    jobs = study_with_exports(sessions, tmp_path, {f"result-{n}": "pacs" for n in range(4)})
    first = _worker(tmp_path, sessions, pacs.port)
    first.owner = "worker-first"
    engine = make_engine(db_url)
    try:
        second = _worker(tmp_path, make_sessionmaker(engine), pacs.port)
        second.owner = "worker-second"
        took: list[bool] = []

        def then_the_second(session: Session) -> None:
            # The first worker's first commit is its claim's (its look ends in a rollback).
            if not took:
                took.append(second.run_once())

        event.listen(sessions, "after_commit", then_the_second)
        try:
            assert first.run_once()
        finally:
            event.remove(sessions, "after_commit", then_the_second)
    finally:
        engine.dispose()

    assert took == [False]
    done = _jobs(sessions, jobs.values())
    assert [(job.state, job.attempts, job.lease_owner) for job in done] == [
        ("done", 1, "worker-first")
    ] * len(jobs)
    wait_for(lambda: len(pacs.received()) == len(jobs), timeout=10, what="the 4 objects")
    assert pacs.associations() == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_group_whose_oldest_job_is_being_claimed_is_skipped_whole(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    """PostgreSQL: while another transaction holds a group's oldest job locked (a claim under
    way, between that job and the jobs that go with it), a claim skips the whole group, not
    only that job, and takes another group's. Before, it took the group's next job, which the
    claim under way then skipped (locked), and the group was split. (On SQLite a claim's
    transaction holds the write lock from its start: no other claim runs meanwhile.)"""
    jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs", "kos": "pacs", "copy": "archive"})
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as under_way:
            held = under_way.scalars(
                select(Job).where(Job.id == jobs["sr"]).with_for_update()
            ).one()
            assert held.state == "queued"
            with sessions() as session:
                claimed = claim_together(session, "w", ["export"], 30, {"export": TOGETHER})
                assert [job.id for job in claimed] == [jobs["copy"]]
                assert claim_together(session, "w", ["export"], 30, {"export": TOGETHER}) == []
            under_way.rollback()
    finally:
        engine.dispose()
    with sessions() as session:
        claimed = claim_together(session, "w", ["export"], 30, {"export": TOGETHER})
        assert [job.id for job in claimed] == [jobs["sr"], jobs["kos"]]


def test_a_group_larger_than_the_limit_is_claimed_in_parts_oldest_first(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Each claim takes its job and at most ``limit`` others of its group, oldest first; the
    rest are the next claim's (and another worker's, each part over one association)."""
    jobs = study_with_exports(sessions, tmp_path, {f"result-{n}": "pacs" for n in range(5)})
    ids = list(jobs.values())
    two_more = {"export": Together(key=TOGETHER.key, limit=2)}
    with sessions() as session:
        parts = [
            [job.id for job in claim_together(session, f"w{n}", ["export"], 30, two_more)]
            for n in range(3)
        ]
    assert parts == [ids[:3], ids[3:], []]
    assert [job.lease_owner for job in _jobs(sessions, ids)] == ["w0"] * 3 + ["w1"] * 2


def test_an_attempt_that_raises_before_the_send_puts_the_jobs_claimed_with_its_job_back(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jobs claimed with an export job whose attempt raises something unexpected before
    the send (here: reading how long they were queued) are retried with it, each counted once
    as not sent, not left leased until their leases end (5 minutes)."""

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("unexpected")

    jobs = study_with_exports(sessions, tmp_path, {"sr": "pacs", "kos": "pacs", "seg": "pacs"})
    worker = _worker(tmp_path, sessions, free_port())
    monkeypatch.setattr(export_jobs, "queued_seconds", broken)
    objects = _sample("dicomnode_export_failures_total", "pacs")
    attempts = _sample("dicomnode_export_attempts_failed_total", "pacs")

    assert worker.run_once()

    assert [(job.state, job.attempts) for job in _jobs(sessions, jobs.values())] == [
        ("queued", 1)
    ] * 3
    assert all(
        "RuntimeError: unexpected" in job.last_error for job in _jobs(sessions, jobs.values())
    )
    assert _sample("dicomnode_export_attempts_failed_total", "pacs") == attempts + 1
    assert _sample("dicomnode_export_failures_total", "pacs") == objects + 3
