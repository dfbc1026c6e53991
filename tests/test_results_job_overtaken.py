"""A results job and what happens while it runs, and the inputs an object is decided by (SQLite
and PostgreSQL, real models, a real dcmtk storescp keeping every object it receives).

An object built again from the same inputs stands (:mod:`dicomnode.results.inputs`), so the
inputs named must be exactly what it was built from: not a slice indexed while the job ran
(the object built again with it would stand, stale), and the result objects a KOS references
by the UIDs they have now. A results job overtaken by a newer analysis while it ran writes
nothing, and leaves the newer job's objects as they are.

Each interleaving is forced in the job's own thread by a hook at a step of
:func:`dicomnode.results.job.write_results` (no sleeps).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, spool_and_index, spool_late_instance, storescp
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from test_results_reexport import (
    CT_NODULE,
    PNEUMOTHORAX,
    _changed,
    _not_bitwise_repeatable,
    _received,
    _rows,
    _worker,
)

import dicomnode.results.job as job_module
from dicomnode.config import Destination, Settings
from dicomnode.db.models import Instance, Job, ResultObject, Series
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade, utcnow
from dicomnode.ingest.assembly import queue_ready_studies
from dicomnode.jobs.dead_letters import retry_dead
from dicomnode.jobs.queue import enqueue
from dicomnode.models.registry import load_card
from dicomnode.results.versions import content_digest, revision_uid
from dicomnode.synth.ct import make_ct_series
from dicomnode.synth.cxr import make_cxr
from dicomnode.worker import Worker

PER_IMAGE = ("overlay", "gsps")


@pytest.fixture
def keeping_pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """A storescp that keeps each object it receives in a file of its own."""
    with storescp(tmp_path, "--accept-all", "--unique-filenames") as running:
        yield running


def _run_all(worker: Worker, sessions: sessionmaker[Session]) -> None:
    """Run every job, a postponed one again at once (bounded: a job postponed for ever fails
    the test)."""
    for _ in range(50):
        while worker.run_once():
            pass
        with sessions() as session:
            waiting = session.scalars(select(Job).where(Job.state.in_(("queued", "leased")))).all()
            if not waiting:
                return
            for job in waiting:
                job.run_after = utcnow()
            session.commit()
    pytest.fail("jobs still waiting after 50 rounds")


def _study_files(storage: Path) -> set[str]:
    return {str(path) for path in (storage / "results").rglob("*.dcm")}


def test_a_slice_indexed_while_the_results_job_runs_is_not_among_its_inputs(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CT's nodule detector reads 3 adjacent slices. Four slices in its middle are indexed
    after its models ran, while the results job builds its objects: those were built without
    them, so they must not count among their inputs. The next analysis (with the slices) then
    writes and sends the neighbours' changed overlays and presentation states, as a study
    that had every slice from the start has them. Before, the first job's digests named the
    late slices, the objects built again with them had the same digest and the stale ones
    stood (never sent again)."""
    worker = _worker(tmp_path, sessions, keeping_pacs, CT_NODULE)
    storage = worker.settings.storage_path
    series, _ = make_ct_series(11, rows=160, slices=40, nodules=(4, 6))
    late = range(18, 22)
    with sessions() as session:
        for index, ds in enumerate(series):
            if index not in late:
                study_id, _ = spool_and_index(session, storage, ds)

    indexed: list[bool] = []
    earlier_versions = job_module.earlier_versions

    def index_late_slices(session: Session, study: int) -> dict[str, ResultObject]:
        # After the models ran, before the job reads the study's instances for its digests.
        if not indexed:
            indexed.append(True)
            with sessions() as other:
                for index in late:
                    spool_and_index(other, storage, series[index])
        return earlier_versions(session, study)

    monkeypatch.setattr(job_module, "earlier_versions", index_late_slices)
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    while worker.run_once():
        pass
    assert indexed
    # The late slices make the study ready for its next analysis.
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    _run_all(worker, sessions)
    _assert_as_if_every_slice_came_first(tmp_path, series, sessions, study_id, keeping_pacs)


def test_a_slice_a_failed_analysis_read_is_not_among_the_earlier_results_jobs_inputs(
    sessions: sessionmaker[Session], tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """The same CT: its first analysis A1 ran without the four slices; they arrive and their
    analysis A2 fails (dead-lettered: the study shows A1's findings); then A1's results job
    runs, its objects made from the slices A1 read (ids up to its ``instances_up_to``), not
    from all the study holds now. A2 retried by an admin writes and sends the neighbours'
    changed objects. Before, A1's results job named the four slices in its digests and A2's
    objects built with them stood as A1's stale ones."""
    card = load_card(CT_NODULE)
    settings = Settings(
        storage={"path": tmp_path / "storage"},
        worker={"threads": 1, "max_attempts": 1},
        destinations=[
            Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=keeping_pacs.port)
        ],
    )
    worker = Worker(settings, sessions, [card])
    storage = settings.storage_path
    series, _ = make_ct_series(11, rows=160, slices=40, nodules=(4, 6))
    late = range(18, 22)
    with sessions() as session:
        for index, ds in enumerate(series):
            if index not in late:
                study_id, _ = spool_and_index(session, storage, ds)
        assert queue_ready_studies(session, utcnow()) == [study_id]
    assert worker.run_once()  # A1 (an analysis runs before any results job)
    with sessions() as session:
        for index in late:
            spool_and_index(session, storage, series[index])
        assert queue_ready_studies(session, utcnow()) == [study_id]
        a2 = session.scalars(select(Job).where(Job.kind == "analyse").order_by(Job.id)).all()[-1]

    run = worker.runtime.run

    def device_lost(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("inference device lost")

    worker.runtime.run = device_lost  # type: ignore[method-assign]
    assert worker.run_once()  # A2 fails, dead after its one attempt
    worker.runtime.run = run  # type: ignore[method-assign]
    with sessions() as session:
        assert session.get(Job, a2.id).state == "dead"
    while worker.run_once():  # A1's results job, its exports
        pass
    with sessions() as session:
        retry_dead(session, session.get(Job, a2.id), "admin", utcnow())
        session.commit()
    _run_all(worker, sessions)
    _assert_as_if_every_slice_came_first(tmp_path, series, sessions, study_id, keeping_pacs)


def _assert_as_if_every_slice_came_first(
    tmp_path: Path,
    series: list[pydicom.Dataset],
    sessions: sessionmaker[Session],
    study_id: int,
    pacs: StoreSCP,
) -> None:
    """The study's overlays and presentation states are those of the same CT with every slice
    from the start (a database and storage of its own), and each reached ``pacs`` once."""
    final = _rows(sessions, study_id)
    control_url = f"sqlite:///{tmp_path / 'control.db'}"
    upgrade(control_url)
    engine = make_engine(control_url)
    try:
        control_sessions = make_sessionmaker(engine)
        control = Worker(
            Settings(storage={"path": tmp_path / "control"}, worker={"threads": 1}),
            control_sessions,
            [load_card(CT_NODULE)],
        )
        with control_sessions() as session:
            for ds in series:
                control_id, _ = spool_and_index(session, control.settings.storage_path, ds)
            assert queue_ready_studies(session, utcnow()) == [control_id]
        _run_all(control, control_sessions)
        expected = {
            row.first_sop_instance_uid: content_digest(pydicom.dcmread(row.path))
            for row in _rows(control_sessions, control_id).values()
            if row.kind in PER_IMAGE
        }
    finally:
        engine.dispose()

    got = {
        row.first_sop_instance_uid: content_digest(pydicom.dcmread(row.path))
        for row in final.values()
        if row.kind in PER_IMAGE
    }
    assert len(got) == len(expected) >= 10
    stale = {uid for uid, digest in got.items() if expected.get(uid) != digest}
    assert stale == set(), f"{len(stale)} objects built without their late neighbours stand"
    received = _received(pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
    assert set(final) <= set(received)


def test_a_kos_referencing_an_object_that_became_a_new_version_is_one_too(
    sessions: sessionmaker[Session], tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """A KOS selects the study's images with critical findings and the model's result objects.
    One of those (the pneumothorax overlay, its heat map drawn) becomes a new version, while
    the images the KOS references stay the same: the KOS names the overlay's new UID, so it
    is a new version too, sent once, and references no UID the node has deleted. Before, its
    inputs digest counted the study's images only: the earlier KOS stood, naming the overlay's
    deleted first version at the destination."""
    worker = _worker(tmp_path, sessions, keeping_pacs, PNEUMOTHORAX)
    storage = worker.settings.storage_path
    with sessions() as session:
        ds, _ = make_cxr(940_401, pneumothorax=True)
        study_id, _ = spool_and_index(session, storage, ds)
        spool_late_instance(session, storage, study_id, 940_402)
        assert queue_ready_studies(session, utcnow()) == [study_id]
    _run_all(worker, sessions)
    first = _rows(sessions, study_id)
    [first_kos] = [row for row in first.values() if row.kind == "kos"]

    # The overlays made, as far as their rows say, from other inputs than they will be now
    # (the KOS's own inputs unchanged), and inference no longer bitwise repeatable: the
    # pneumothorax overlay's content changes, it becomes a new version.
    _not_bitwise_repeatable(worker, 4)
    with sessions() as session:
        for row in session.scalars(
            select(ResultObject).where(
                ResultObject.study_id == study_id, ResultObject.kind == "overlay"
            )
        ):
            row.inputs_digest = "made from other inputs"
        up_to = session.scalar(
            select(func.max(Instance.id)).join(Series).where(Series.study_id == study_id)
        )
        enqueue(session, "results", study_id, {"instances_up_to": up_to})
        session.commit()
    _run_all(worker, sessions)
    second = _rows(sessions, study_id)

    changed = {second[uid].first_sop_instance_uid for uid in _changed(first, second)}
    overlays = {uid for uid, row in first.items() if row.kind == "overlay"}
    assert changed & overlays, "no overlay changed: the case this test is for did not occur"
    [kos] = [row for row in second.values() if row.kind == "kos"]
    assert kos.sop_instance_uid != first_kos.sop_instance_uid
    assert kos.first_sop_instance_uid == first_kos.sop_instance_uid
    assert kos.sop_instance_uid == revision_uid(
        first_kos.sop_instance_uid, content_digest(pydicom.dcmread(kos.path))
    )
    assert not Path(first_kos.path).exists()
    with sessions() as session:
        study_uids = set(
            session.scalars(
                select(Instance.sop_instance_uid).join(Series).where(Series.study_id == study_id)
            )
        )
    referenced = {
        str(element.value)
        for element in pydicom.dcmread(kos.path).iterall()
        if element.keyword == "ReferencedSOPInstanceUID"
    }
    assert referenced - study_uids <= set(second)
    assert {uid for uid in _changed(first, second) if second[uid].kind == "overlay"} <= referenced
    received = _received(keeping_pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
    assert kos.sop_instance_uid in received


def test_a_results_job_overtaken_by_a_newer_analysis_writes_nothing(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Results job R1 passes its checks and writes its files; meanwhile a late image arrives,
    its analysis A2 runs on another worker and A2's results job R2 commits its objects; then
    R1 takes the study's lock to record its rows. R1 sees R2 under the lock and ends
    superseded: it records nothing, R2's rows and files stay as they are, R1's own files are
    removed, every object is sent once. Before, R1 went on: it failed on R2's rows (the same
    UIDs) and removed the files it had written at their paths, R2's included."""
    worker = _worker(tmp_path, sessions, keeping_pacs, PNEUMOTHORAX)
    other = _worker(tmp_path, sessions, keeping_pacs, PNEUMOTHORAX)
    storage = worker.settings.storage_path
    with sessions() as session:
        ds, _ = make_cxr(940_501, pneumothorax=True)
        study_id, _ = spool_and_index(session, storage, ds)
        spool_late_instance(session, storage, study_id, 940_502)
        assert queue_ready_studies(session, utcnow()) == [study_id]

    overtaken: list[bool] = []
    lock_studies = job_module.lock_studies

    def newer_analysis_first(session: Session, study_ids: list[int]) -> None:
        # R1, its files written, about to take the lock: the late image, its analysis and
        # results job run to the end on the other worker first.
        if not overtaken:
            overtaken.append(True)
            with sessions() as late:
                spool_late_instance(late, storage, study_id, 940_503)
                assert queue_ready_studies(late, utcnow()) == [study_id]
            while other.run_once():
                pass
        lock_studies(session, study_ids)

    monkeypatch.setattr(job_module, "lock_studies", newer_analysis_first)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        while worker.run_once():
            pass
    assert overtaken
    with sessions() as session:
        r1, r2 = session.scalars(select(Job).where(Job.kind == "results").order_by(Job.id)).all()
        assert (r1.state, r1.last_error or None, r1.attempts) == ("done", None, 1)
        assert r2.state == "done"
    assert f"superseded by results job {r2.id} of a newer analysis" in caplog.text

    rows = _rows(sessions, study_id)
    assert sorted(row.kind for row in rows.values()) == [
        "kos",
        "overlay",
        "overlay",
        "overlay",
        "sr",
    ]
    # R2's objects, each with its file; no file without a row.
    assert _study_files(storage) == {row.path for row in rows.values()}
    received = _received(keeping_pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
    assert set(received) == set(rows)


def test_a_kept_object_whose_file_is_gone_is_written_again_in_the_current_storage(
    sessions: sessionmaker[Session], tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """A study's result files moved elsewhere (an earlier storage root), their rows following;
    one of them lost. The study's results made again from the same inputs: the lost object
    stands (same UID, not sent again) and is written again under the node's current storage,
    its row naming the new file. Before, it was written again at the row's old path."""
    worker = _worker(tmp_path, sessions, keeping_pacs, PNEUMOTHORAX)
    storage = worker.settings.storage_path
    with sessions() as session:
        ds, _ = make_cxr(940_601, pneumothorax=True)
        study_id, _ = spool_and_index(session, storage, ds)
        assert queue_ready_studies(session, utcnow()) == [study_id]
    _run_all(worker, sessions)
    old_root = tmp_path / "old-storage"
    old_root.mkdir()
    with sessions() as session:
        for row in session.scalars(select(ResultObject).where(ResultObject.study_id == study_id)):
            path = old_root / f"{row.sop_instance_uid}.dcm"
            Path(row.path).rename(path)
            row.path = str(path)
        up_to = session.scalar(
            select(func.max(Instance.id)).join(Series).where(Series.study_id == study_id)
        )
        enqueue(session, "results", study_id, {"instances_up_to": up_to})
        session.commit()
    first = _rows(sessions, study_id)
    lost = next(row for row in first.values() if row.kind == "overlay")
    Path(lost.path).unlink()
    _run_all(worker, sessions)

    second = _rows(sessions, study_id)
    assert set(second) == set(first)
    row = second[lost.sop_instance_uid]
    assert row.id == lost.id
    assert Path(row.path).is_relative_to(storage / "results")
    assert pydicom.dcmread(row.path).SOPInstanceUID == lost.sop_instance_uid
    assert not Path(lost.path).exists()
    received = _received(keeping_pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
