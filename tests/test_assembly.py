"""Indexing instances and assembling studies into analysis jobs, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from conftest import wait_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import WorklistSettings
from dicomnode.db.models import Instance, Job, Series, Study
from dicomnode.db.session import as_utc, utcnow
from dicomnode.ingest.arrival import InstanceFacts
from dicomnode.ingest.assembly import (
    ReadyTimes,
    association_ended,
    next_ready_at,
    queue_ready_studies,
)
from dicomnode.ingest.index import index_instance
from dicomnode.serve import assembly_loop
from dicomnode.worklist.policy import MAX_WAIT

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
QUIET = 2.0
STUDY_UID = "1.2.826.0.1.3680043.8.498.10"
FACTS = InstanceFacts(
    study_instance_uid=STUDY_UID,
    series_instance_uid="1.2.826.0.1.3680043.8.498.11",
    sop_instance_uid="1.2.826.0.1.3680043.8.498.12",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
    patient_id="PAT-1",
    patient_name="Doe^Jane",
    accession_number="ACC-1",
    modality="DX",
    body_part="CHEST",
    view_position="PA",
    instance_number=1,
)


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def index(session: Session, facts: InstanceFacts, now: datetime) -> bool:
    return index_instance(
        session,
        facts,
        path=f"/spool/{facts.sop_instance_uid}.dcm",
        size_bytes=1234,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        now=now,
        quiet_seconds=QUIET,
        worklist=WorklistSettings(),
    )


def count(session: Session, table: type) -> int:
    return session.scalar(select(func.count()).select_from(table))


def the_study(sessions: sessionmaker[Session]) -> Study:
    with sessions() as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == STUDY_UID)).one()


def test_index_instance_creates_rows_once(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        assert index(session, FACTS, T0) is True
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        series = session.scalars(select(Series)).one()
        instance = session.scalars(select(Instance)).one()
        assert (study.study_instance_uid, study.patient_id, study.accession_number) == (
            STUDY_UID,
            "PAT-1",
            "ACC-1",
        )
        assert study.received_generation == 1
        assert as_utc(study.ready_at) == seconds(QUIET)
        # On the worklist from the first instance on, routine until analysed.
        assert (study.tier, study.reason) == ("routine", "awaiting AI analysis")
        assert T0 <= as_utc(study.due_at) <= T0 + MAX_WAIT["routine"]
        assert (series.study_id, series.body_part, series.view_position) == (
            study.id,
            "CHEST",
            "PA",
        )
        assert instance.series_id == series.id
        assert instance.sop_instance_uid == FACTS.sop_instance_uid
        assert instance.calling_ae == "MODALITY"

    with sessions() as session:
        assert index(session, FACTS, seconds(1)) is False
    with sessions() as session:
        assert (count(session, Study), count(session, Series), count(session, Instance)) == (
            1,
            1,
            1,
        )
        study = session.scalars(select(Study)).one()
        # A duplicate is not new data: no new generation, deadline unchanged.
        assert study.received_generation == 1
        assert as_utc(study.ready_at) == seconds(QUIET)


def test_second_series_joins_the_same_study(sessions: sessionmaker[Session]) -> None:
    other = replace(
        FACTS,
        series_instance_uid="1.2.826.0.1.3680043.8.498.21",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.22",
    )
    with sessions() as session:
        assert index(session, FACTS, T0)
        assert index(session, other, seconds(1))
    with sessions() as session:
        assert (count(session, Study), count(session, Series), count(session, Instance)) == (
            1,
            2,
            2,
        )
        assert session.scalars(select(Study)).one().received_generation == 2


def test_study_is_queued_once_after_quiet_period(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        index(session, FACTS, T0)
        study_id = session.scalars(select(Study.id)).one()

    with sessions() as session:
        assert queue_ready_studies(session, seconds(QUIET - 0.1)) == []
        assert count(session, Job) == 0
        assert queue_ready_studies(session, seconds(QUIET)) == [study_id]
        assert queue_ready_studies(session, seconds(QUIET + 10)) == []
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.kind, job.study_id, job.state, job.payload) == (
            "analyse",
            study_id,
            "queued",
            {"generation": 1},
        )
    assert the_study(sessions).analysis_status == "queued"

    # A late instance (new SOP Instance UID) re-runs the analysis after its own quiet period.
    late = replace(FACTS, sop_instance_uid="1.2.826.0.1.3680043.8.498.13", instance_number=2)
    with sessions() as session:
        assert index(session, late, seconds(30))
        assert queue_ready_studies(session, seconds(30 + QUIET - 0.1)) == []
        assert queue_ready_studies(session, seconds(30 + QUIET)) == [study_id]
        assert queue_ready_studies(session, seconds(60)) == []
    with sessions() as session:
        payloads = [job.payload for job in session.scalars(select(Job).order_by(Job.id))]
    assert payloads == [{"generation": 1}, {"generation": 2}]

    # A duplicate of a known instance does not queue the study again.
    with sessions() as session:
        assert index(session, late, seconds(70)) is False
        assert queue_ready_studies(session, seconds(100)) == []
        assert count(session, Job) == 2


def test_analysed_study_goes_back_to_receiving_on_late_instance(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        index(session, FACTS, T0)
        study = session.scalars(select(Study)).one()
        study.analysis_status = "analysed"
        session.commit()
        late = replace(FACTS, sop_instance_uid="1.2.826.0.1.3680043.8.498.14")
        assert index(session, late, seconds(5))
    assert the_study(sessions).analysis_status == "receiving"


def test_the_nodes_own_results_routed_back_start_no_new_analysis(
    sessions: sessionmaker[Session],
) -> None:
    """A PACS that routes a study back sends the node's results with it: they are stored and
    indexed, but the analysed study is not analysed (and its results sent) again. A new
    instance of the study still is."""
    with sessions() as session:
        index(session, FACTS, T0)
        assert queue_ready_studies(session, seconds(10)) == [the_study(sessions).id]
        study = session.scalars(select(Study)).one()
        study.analysis_status = "analysed"
        session.commit()
        own = replace(FACTS, sop_instance_uid="1.2.826.0.1.3680043.8.498.15", own_result=True)
        assert index(session, own, seconds(20))
        assert count(session, Instance) == 2
        assert queue_ready_studies(session, seconds(40)) == []
    assert the_study(sessions).analysis_status == "analysed"
    with sessions() as session:
        late = replace(FACTS, sop_instance_uid="1.2.826.0.1.3680043.8.498.16")
        assert index(session, late, seconds(50))
        assert queue_ready_studies(session, seconds(60)) == [the_study(sessions).id]


def test_own_results_are_known_by_their_manufacturer() -> None:
    from pydicom import Dataset

    from dicomnode.ingest.arrival import instance_facts

    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.SOPInstanceUID, ds.SOPClassUID = "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.88.34"
    assert not instance_facts(ds).own_result
    ds.Manufacturer = "dicomnode"
    assert instance_facts(ds).own_result
    ds.Manufacturer = "dicomnode synth"  # the phantoms are analysed
    assert not instance_facts(ds).own_result


def test_association_end_pushes_ready_at(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        index(session, FACTS, T0)
        association_ended(session, [STUDY_UID, "9.9.9"], seconds(1), quiet_seconds=5)
    assert as_utc(the_study(sessions).ready_at) == seconds(6)
    with sessions() as session:
        # Not ready at the instance's own deadline any more.
        assert queue_ready_studies(session, seconds(QUIET)) == []
        assert queue_ready_studies(session, seconds(6)) == [the_study(sessions).id]
        # The end of another association with no new instance does not queue again.
        association_ended(session, [STUDY_UID], seconds(7), quiet_seconds=5)
        assert queue_ready_studies(session, seconds(20)) == []
        association_ended(session, [], seconds(8), quiet_seconds=5)
    assert as_utc(the_study(sessions).ready_at) == seconds(12)


def test_next_ready_at_is_the_earliest_waiting_study(sessions: sessionmaker[Session]) -> None:
    other = replace(
        FACTS,
        study_instance_uid="1.2.826.0.1.3680043.8.498.20",
        series_instance_uid="1.2.826.0.1.3680043.8.498.21",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.22",
    )
    with sessions() as session:
        assert next_ready_at(session) is None
        index(session, FACTS, T0)
        index(session, other, seconds(1))
        assert next_ready_at(session) == seconds(QUIET)
        assert queue_ready_studies(session, seconds(QUIET)) == [the_study(sessions).id]
        # The queued study no longer waits; the other one does, until its own deadline.
        assert next_ready_at(session) == seconds(1 + QUIET)
        assert len(queue_ready_studies(session, seconds(1 + QUIET))) == 1
        assert next_ready_at(session) is None


def _assembly_loop(
    sessions: sessionmaker[Session], period: float
) -> tuple[list[float], ReadyTimes, threading.Event, threading.Thread]:
    """The supervisor's assembly loop, started in a thread; the times of its checks."""
    checks: list[float] = []

    def counted() -> Session:
        checks.append(time.monotonic())
        return sessions()

    ready, stop = ReadyTimes(), threading.Event()
    loop = threading.Thread(
        target=assembly_loop, args=(counted, stop, ready, period), daemon=True, name="assembly"
    )
    loop.start()
    return checks, ready, stop, loop


def _stopped(ready: ReadyTimes, stop: threading.Event, loop: threading.Thread) -> None:
    stop.set()
    ready.written(utcnow())
    loop.join(timeout=10)
    assert not loop.is_alive()


def test_the_assembly_check_runs_when_a_quiet_period_the_writer_reports_ends(
    sessions: sessionmaker[Session],
) -> None:
    """The supervisor's assembly check waits for the earliest quiet period's end (told by the
    index writer as it writes), not for a polling period: an idle node checks once per
    period, and a study is queued as soon as its quiet period is over."""
    # Idle, with a period of 1 s: not more than once per period (a slow machine checks
    # less often, never more), and again and again.
    checks, ready, stop, loop = _assembly_loop(sessions, 1.0)
    try:
        time.sleep(2.3)
        assert len(checks) <= 4, checks
        wait_for(lambda: len(checks) >= 3, timeout=30, interval=0.05, what="a third check")
    finally:
        _stopped(ready, stop, loop)

    # With a period far longer than the test waits, the study is queued when the quiet
    # period the writer reports ends, not at the next periodic check (in 2 minutes).
    checks, ready, stop, loop = _assembly_loop(sessions, 120.0)
    try:
        wait_for(lambda: checks, timeout=30, interval=0.01, what="the first check")
        with sessions() as session:
            now = utcnow()
            index_instance(
                session,
                FACTS,
                path="/spool/x.dcm",
                size_bytes=1,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                calling_ae="MODALITY",
                now=now,
                quiet_seconds=0.2,
                worklist=WorklistSettings(),
            )
        ready.written(now + timedelta(seconds=0.2))
        wait_for(
            lambda: the_study(sessions).analysis_status == "queued",
            timeout=30,
            interval=0.01,
            what="the study queued",
        )
        queued_after = (utcnow() - now).total_seconds()
        # Not before the quiet period's end; at it, or as soon as a loaded machine gets there.
        assert 0.2 <= queued_after < 30, queued_after
    finally:
        _stopped(ready, stop, loop)
