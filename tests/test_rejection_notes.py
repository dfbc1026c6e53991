"""IHE IOCM rejection notes for superseded result objects (SQLite and PostgreSQL, the real
pneumothorax model, a real dcmtk storescp as the PACS keeping every object it receives).

Three radiographs analysed and exported (an overlay each, SR, KOS), then a late image: the
new SR and KOS supersede the earlier ones, which the PACS already holds. A destination with
``reject_superseded = true`` then gets a Key Object Selection Document titled (113001, DCM,
"Rejected for Quality Reasons") referencing exactly those two, after the new ones; one
without (the default) gets none, and neither does one that never received them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, spool_and_index, spool_late_instance, storescp, wait_for
from dciodvfy import dciodvfy_errors
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from test_export_refusals import PickySCP

from dicomnode.config import Destination, Settings
from dicomnode.db.models import Instance, Job, ResultObject
from dicomnode.db.session import as_utc, utcnow
from dicomnode.ingest.assembly import queue_ready_studies
from dicomnode.jobs.dead_letters import retry_dead
from dicomnode.jobs.queue import BACKOFF_MAX_SECONDS, enqueue
from dicomnode.models.registry import load_card
from dicomnode.synth.cxr import make_cxr
from dicomnode.worker import Worker

REPO = Path(__file__).resolve().parent.parent
PNEUMOTHORAX = REPO / "models" / "cxr_pneumothorax_demo.toml"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def _keeping_every_copy(folder: Path) -> Iterator[StoreSCP]:
    """A storescp that keeps each object it receives in a file of its own."""
    folder.mkdir()
    with storescp(folder, "--accept-all", "--unique-filenames") as running:
        yield running


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    yield from _keeping_every_copy(tmp_path / "pacs-a")


@pytest.fixture
def other_pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    yield from _keeping_every_copy(tmp_path / "pacs-b")


def _worker(
    tmp_path: Path, sessions: sessionmaker[Session], destinations: list[Destination]
) -> Worker:
    settings = Settings(
        storage={"path": tmp_path / "storage"},
        worker={"threads": 1},
        destinations=destinations,
    )
    return Worker(settings, sessions, [load_card(PNEUMOTHORAX)])


def _destination(name: str, pacs: StoreSCP, **options: object) -> Destination:
    return Destination(name=name, ae_title="PACS", host="127.0.0.1", port=pacs.port, **options)


def _run_all(worker: Worker, sessions: sessionmaker[Session]) -> None:
    """Run the worker's jobs until none is queued or leased (a note put back until the
    objects it follows are sent is due again a moment later)."""

    def idle() -> bool:
        while worker.run_once():
            pass
        with sessions() as session:
            left = session.scalar(
                select(func.count()).select_from(Job).where(Job.state.in_(("queued", "leased")))
            )
        return left == 0

    wait_for(idle, timeout=120, interval=0.1, what="the queue to empty")


def _analyse(worker: Worker, sessions: sessionmaker[Session], study_id: int) -> None:
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    _run_all(worker, sessions)


def _first_analysis(worker: Worker, sessions: sessionmaker[Session]) -> int:
    """Three radiographs with a pneumothorax analysed and exported; returns the study id."""
    with sessions() as session:
        ds, _ = make_cxr(950_301, pneumothorax=True)
        study_id, _ = spool_and_index(session, worker.settings.storage_path, ds)
        for seed in (950_302, 950_303):
            spool_late_instance(session, worker.settings.storage_path, study_id, seed)
    _analyse(worker, sessions, study_id)
    return study_id


def _late_image(worker: Worker, sessions: sessionmaker[Session], study_id: int) -> None:
    with sessions() as session:
        spool_late_instance(session, worker.settings.storage_path, study_id, 950_304)


def _rows(sessions: sessionmaker[Session], study_id: int) -> dict[str, ResultObject]:
    with sessions() as session:
        rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id))
        return {row.sop_instance_uid: row for row in rows}


def _received(
    pacs: StoreSCP, sessions: sessionmaker[Session], destination: str
) -> list[pydicom.Dataset]:
    """What the destination received, once it has written every export to it that is done
    (each one file: its storescp keeps a second copy of a UID in a file of its own)."""
    count = len(_done_exports(sessions, destination))
    files = wait_for(
        lambda: len(pacs.received()) == count and pacs.received(),
        timeout=30,
        what=f"storescp to write {count} objects",
    )
    return [pydicom.dcmread(path) for path in files]


def _done_exports(sessions: sessionmaker[Session], destination: str) -> list[Job]:
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.kind == "export", Job.state == "done"))
        return [job for job in jobs if job.payload["destination"] == destination]


def _rejection_notes(received: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return [
        ds
        for ds in received
        if ds.SOPClassUID == KOS_CLASS and ds.ConceptNameCodeSequence[0].CodeValue == "113001"
    ]


def _evidence(ds: pydicom.Dataset) -> set[str]:
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def _content_references(ds: pydicom.Dataset) -> set[str]:
    return {
        str(reference.ReferencedSOPInstanceUID)
        for item in ds.ContentSequence
        for reference in item.get("ReferencedSOPSequence", [])
    }


def test_a_destination_that_rejects_superseded_objects_gets_a_note_naming_exactly_them(
    sessions: sessionmaker[Session], tmp_path: Path, pacs: StoreSCP
) -> None:
    """The superseded SR and KOS, which the PACS received, are named in one IOCM rejection
    note (KOS, 113001) sent after the new SR and KOS; the unchanged overlays are not named,
    the note is in the source's patient and study and dciodvfy finds no error in it."""
    worker = _worker(tmp_path, sessions, [_destination("pacs", pacs, reject_superseded=True)])
    study_id = _first_analysis(worker, sessions)
    first = _rows(sessions, study_id)
    assert sorted(row.kind for row in first.values()) == [
        "kos",
        "overlay",
        "overlay",
        "overlay",
        "sr",
    ]
    assert _rejection_notes(_received(pacs, sessions, "pacs")) == []
    sent_before = {job.id for job in _done_exports(sessions, "pacs")}

    _late_image(worker, sessions, study_id)
    _analyse(worker, sessions, study_id)

    second = _rows(sessions, study_id)
    second_by_id = {row.id: row for row in second.values()}
    superseded = {uid for uid, row in first.items() if uid not in second}
    assert {first[uid].kind for uid in superseded} == {"sr", "kos"} and len(superseded) == 2
    unchanged = set(first) & set(second)
    assert len(unchanged) == 3
    [note_row] = [row for row in second.values() if row.kind == "rejection"]
    # 5 first, then the late image's overlay, the new SR and KOS, and the note.
    received = _received(pacs, sessions, "pacs")
    assert len(received) == 9
    [note] = _rejection_notes(received)
    assert note.SOPInstanceUID == note_row.sop_instance_uid
    assert note.ConceptNameCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert note.ConceptNameCodeSequence[0].CodeMeaning == "Rejected for Quality Reasons"
    assert _evidence(note) == superseded
    assert _content_references(note) == superseded
    with sessions() as session:
        source = pydicom.dcmread(session.scalars(select(Instance.path)).first())
    assert (note.StudyInstanceUID, note.PatientID) == (source.StudyInstanceUID, source.PatientID)
    descriptions = [item.TextValue for item in note.ContentSequence if item.ValueType == "TEXT"]
    assert any("superseded by a later AI result" in text for text in descriptions)
    assert any("Research demo, not for clinical use" in text for text in descriptions)
    assert dciodvfy_errors(note) == []
    # Sent after the new SR and KOS, which supersede what it rejects; not waiting for the
    # late image's overlay, a new object that replaces nothing.
    exports = [job for job in _done_exports(sessions, "pacs") if job.id not in sent_before]
    [note_job] = [job for job in exports if job.payload["result_id"] == note_row.id]
    kinds = {job.id: second_by_id[job.payload["result_id"]].kind for job in exports}
    superseding = [job for job in exports if kinds[job.id] in ("sr", "kos")]
    assert sorted(note_job.payload["after"]) == sorted(job.id for job in superseding)
    assert len(superseding) == 2 and sorted(kinds.values()) == ["kos", "overlay", "rejection", "sr"]
    assert all(as_utc(note_job.finished_at) >= as_utc(job.finished_at) for job in superseding)


def test_no_note_by_default_nor_to_a_destination_that_never_received_the_objects(
    sessions: sessionmaker[Session], tmp_path: Path, pacs: StoreSCP, other_pacs: StoreSCP
) -> None:
    """``reject_superseded`` off (the default): no note. A destination added after the first
    analysis with the option on received none of the superseded objects: no note either."""
    worker = _worker(tmp_path, sessions, [_destination("pacs", pacs)])
    study_id = _first_analysis(worker, sessions)
    _received(pacs, sessions, "pacs")
    _late_image(worker, sessions, study_id)
    # As a reload adds it.
    worker.settings = worker.settings.model_copy(
        update={
            "destinations": [
                _destination("pacs", pacs),
                _destination("new", other_pacs, reject_superseded=True),
            ]
        }
    )
    _analyse(worker, sessions, study_id)

    assert [row for row in _rows(sessions, study_id).values() if row.kind == "rejection"] == []
    received = _received(pacs, sessions, "pacs")
    assert len(received) == 8
    assert _rejection_notes(received) == []
    # The new destination gets the study's current objects, and no note.
    current = _received(other_pacs, sessions, "new")
    assert len(current) == 6
    assert _rejection_notes(current) == []


def _export_failures(destination: str) -> float:
    return (
        REGISTRY.get_sample_value("dicomnode_export_failures_total", {"destination": destination})
        or 0.0
    )


def _note_held_by_a_dead_export(
    worker: Worker,
    sessions: sessionmaker[Session],
    pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
) -> tuple[dict[str, ResultObject], Job, int]:
    """The radiographs analysed and exported, then the late image, the new SR's export
    dead-lettered before it is sent: returns the first analysis's rows, the dead export job
    and the note's export job id, once the worker has nothing due. The note is not sent and
    is no failure: put back for BACKOFF_MAX_SECONDS without using an attempt (not
    dead-lettered, no export failure counted, no WARNING), its last_error and one INFO line
    naming the dead export."""
    study_id = _first_analysis(worker, sessions)
    first = _rows(sessions, study_id)
    _received(pacs, sessions, "pacs")
    _late_image(worker, sessions, study_id)
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
        last = session.scalar(select(func.max(Job.id)))
    # Until the second results job has queued its exports.
    while worker.run_once():
        with sessions() as session:
            if session.scalar(
                select(func.count()).select_from(Job).where(Job.id > last, Job.kind == "export")
            ):
                break
    with sessions() as session:
        results = {row.id: row for row in session.scalars(select(ResultObject))}
        exports = session.scalars(select(Job).where(Job.kind == "export", Job.id > last)).all()
        [buried] = [
            job
            for job in exports
            if results[job.payload["result_id"]].kind == "sr"
            and results[job.payload["result_id"]].sop_instance_uid not in first
        ]
        buried.state, buried.last_error = "dead", "refused"
        session.commit()
    failures = _export_failures("pacs")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="dicomnode"):
        while worker.run_once():
            pass
        # Claimed again (as it would be by a worker that does not know why it waits): put
        # back again, no second INFO line.
        with sessions() as session:
            [note_job] = [
                job
                for job in session.scalars(select(Job).where(Job.kind == "export", Job.id > last))
                if results[job.payload["result_id"]].kind == "rejection"
            ]
            note_job.run_after = utcnow()
            session.commit()
        while worker.run_once():
            pass
    with sessions() as session:
        note_job = session.get(Job, note_job.id)
        assert (note_job.state, note_job.attempts) == ("queued", 0)
        assert f"export job(s) {buried.id} " in note_job.last_error
        assert "dead-lettered" in note_job.last_error
        # Put back for long: the retry or the covering export makes it due (no polling).
        assert as_utc(note_job.run_after) > utcnow() + timedelta(seconds=BACKOFF_MAX_SECONDS / 2)
    assert _export_failures("pacs") == failures
    noted = [r for r in caplog.records if f"job {note_job.id} " in r.getMessage()]
    assert [r.levelno for r in noted if r.levelno >= logging.INFO] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # The late image's overlay and the new KOS only.
    received = _received(pacs, sessions, "pacs")
    assert len(received) == 7
    assert _rejection_notes(received) == []
    return first, buried, note_job.id


def test_a_note_waits_for_the_superseding_objects_to_reach_the_destination(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The new SR's export dead-lettered before it is sent: the note is put back, no failure
    (see the helper); an admin's retry of the SR's export makes the note due with it, and
    once the SR is sent the note follows."""
    worker = _worker(tmp_path, sessions, [_destination("pacs", pacs, reject_superseded=True)])
    first, buried, note_id = _note_held_by_a_dead_export(worker, sessions, pacs, caplog)
    with sessions() as session:
        retry_dead(session, session.get(Job, buried.id), "admin", utcnow())
        session.commit()
        assert as_utc(session.get(Job, note_id).run_after) <= utcnow()
    _run_all(worker, sessions)
    received = _received(pacs, sessions, "pacs")
    assert len(received) == 9
    [note] = _rejection_notes(received)
    assert _evidence(note) == {uid for uid, row in first.items() if row.kind in ("sr", "kos")}
    with sessions() as session:
        assert session.get(Job, note_id).state == "done"


def test_a_dead_superseding_export_that_another_export_covers_holds_the_note_no_longer(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The new SR's dead export left dead, its object queued again to the destination by
    another export job (as a later results job queues a dead-lettered object): once that one
    has sent it, the note follows by itself (made due by it, not at the end of its
    postponement); the dead job stays dead."""
    worker = _worker(tmp_path, sessions, [_destination("pacs", pacs, reject_superseded=True)])
    first, buried, note_id = _note_held_by_a_dead_export(worker, sessions, pacs, caplog)
    with sessions() as session:
        enqueue(session, "export", buried.study_id, dict(buried.payload))
        session.commit()
    _run_all(worker, sessions)
    received = _received(pacs, sessions, "pacs")
    assert len(received) == 9
    [note] = _rejection_notes(received)
    assert _evidence(note) == {uid for uid, row in first.items() if row.kind in ("sr", "kos")}
    with sessions() as session:
        assert session.get(Job, buried.id).state == "dead"
        assert session.get(Job, note_id).state == "done"


def _first_analysis_until_exports_queued(
    worker: Worker, sessions: sessionmaker[Session], seed: int
) -> int:
    """Three radiographs with a pneumothorax (seeds ``seed`` on) analysed, the worker run
    until the first exports are queued, none sent yet; returns the study id."""
    with sessions() as session:
        ds, _ = make_cxr(seed, pneumothorax=True)
        study_id, _ = spool_and_index(session, worker.settings.storage_path, ds)
        for late in (seed + 1, seed + 2):
            spool_late_instance(session, worker.settings.storage_path, study_id, late)
        assert queue_ready_studies(session, utcnow()) == [study_id]
    while worker.run_once():
        with sessions() as session:
            if session.scalar(select(func.count()).select_from(Job).where(Job.kind == "export")):
                break
    return study_id


def _kos_export(session: Session) -> Job:
    """The one export job of a KOS."""
    kinds = {row.id: row.kind for row in session.scalars(select(ResultObject))}
    [job] = [
        job
        for job in session.scalars(select(Job).where(Job.kind == "export"))
        if kinds[job.payload["result_id"]] == "kos"
    ]
    return job


def test_a_note_names_only_the_superseded_objects_that_reached_the_destination(
    sessions: sessionmaker[Session], tmp_path: Path, pacs: StoreSCP
) -> None:
    """The first KOS's export dead-lettered before it was sent: the destination never had it,
    so the note names the first SR only."""
    worker = _worker(tmp_path, sessions, [_destination("pacs", pacs, reject_superseded=True)])
    study_id = _first_analysis_until_exports_queued(worker, sessions, 950_301)
    with sessions() as session:
        buried = _kos_export(session)
        buried.state, buried.last_error = "dead", "refused"
        session.commit()
    _run_all(worker, sessions)
    first = _rows(sessions, study_id)
    assert len(_received(pacs, sessions, "pacs")) == 4
    _late_image(worker, sessions, study_id)
    _analyse(worker, sessions, study_id)

    [note] = _rejection_notes(_received(pacs, sessions, "pacs"))
    [old_sr] = [uid for uid, row in first.items() if row.kind == "sr"]
    assert _evidence(note) == _content_references(note) == {old_sr}
    assert dciodvfy_errors(note) == []


def test_a_note_names_a_superseded_object_whose_export_was_in_flight(
    sessions: sessionmaker[Session], tmp_path: Path, pacs: StoreSCP
) -> None:
    """The first KOS's export is in flight (leased by another worker, its association open)
    when the late image's results job supersedes it: it may reach the destination after that
    job looked, so the note names it with the first SR. Before, only exports done counted,
    and an object that arrived that way stayed at the PACS, named by no note."""
    worker = _worker(tmp_path, sessions, [_destination("pacs", pacs, reject_superseded=True)])
    study_id = _first_analysis_until_exports_queued(worker, sessions, 950_311)
    with sessions() as session:
        in_flight = _kos_export(session)
        in_flight.state, in_flight.lease_owner = "leased", "another-host:9"
        in_flight.lease_expires_at, in_flight.attempts = utcnow() + timedelta(hours=1), 1
        session.commit()
        in_flight_id = in_flight.id
    while worker.run_once():
        pass
    first = _rows(sessions, study_id)
    _late_image(worker, sessions, study_id)
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    wait_for(
        lambda: not worker.run_once() and _rejection_notes(_received(pacs, sessions, "pacs")),
        timeout=120,
        interval=0.1,
        what="the rejection note",
    )
    [note] = _rejection_notes(_received(pacs, sessions, "pacs"))
    old = {uid for uid, row in first.items() if row.kind in ("sr", "kos")}
    assert len(old) == 2
    assert _evidence(note) == _content_references(note) == old
    # The other worker is gone: its export's lease ends, and it finds its object superseded.
    with sessions() as session:
        session.get(Job, in_flight_id).lease_expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
    _run_all(worker, sessions)


@pytest.fixture
def picky() -> Iterator[PickySCP]:
    """A pynetdicom Storage SCP that keeps the SOP Instance UIDs it stores in the order they
    arrive, and answers a failure status to the SOP class set as its ``refused``."""
    scp = PickySCP(refuse_status=0xC000)
    try:
        yield scp
    finally:
        scp.close()


def _picky_worker(tmp_path: Path, sessions: sessionmaker[Session], picky: PickySCP) -> Worker:
    destination = Destination(
        name="pacs", ae_title="PACS", host="127.0.0.1", port=picky.port, reject_superseded=True
    )
    return _worker(tmp_path, sessions, [destination])


def _drain(worker: Worker) -> None:
    """Run what is due now (a job put back or backing off is left)."""
    while worker.run_once():
        pass


def _note_and_its_exports(
    sessions: sessionmaker[Session], study_id: int, first: dict[str, ResultObject]
) -> tuple[Job, dict[str, Job]]:
    """The note's export job and the second analysis's new objects' export jobs by kind."""
    with sessions() as session:
        rows = {
            row.id: row
            for row in session.scalars(
                select(ResultObject).where(ResultObject.study_id == study_id)
            )
        }
        jobs = {}
        for job in session.scalars(select(Job).where(Job.kind == "export")):
            row = rows.get(job.payload["result_id"])
            if row is not None and row.sop_instance_uid not in first:
                jobs[row.kind] = job
    return jobs.pop("rejection"), jobs


def test_a_note_does_not_wait_for_an_object_the_destination_refuses_that_replaces_nothing(
    sessions: sessionmaker[Session], tmp_path: Path, picky: PickySCP
) -> None:
    """The destination refuses the overlays' SOP class from the second analysis on (as a
    PACS filter would, for good): the late image's new overlay is not sent, but it
    supersedes nothing, so the note waits only for the new SR and KOS, and follows them
    (it used to wait for every export its results job queued to the destination, and failed
    with the overlay's until dead-lettered)."""
    worker = _picky_worker(tmp_path, sessions, picky)
    study_id = _first_analysis(worker, sessions)
    first = _rows(sessions, study_id)
    assert len(picky.stored) == 5
    [overlay_class] = {row.sop_class_uid for row in first.values() if row.kind == "overlay"}
    picky.refused = overlay_class
    _late_image(worker, sessions, study_id)
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    _drain(worker)

    note_job, exports = _note_and_its_exports(sessions, study_id, first)
    assert sorted(note_job.payload["after"]) == sorted((exports["sr"].id, exports["kos"].id))
    assert exports["overlay"].state == "queued" and exports["overlay"].attempts == 1
    assert (note_job.state, exports["sr"].state, exports["kos"].state) == ("done",) * 3
    with sessions() as session:
        uids = {
            job_id: session.get(ResultObject, job.payload["result_id"]).sop_instance_uid
            for job_id, job in [(note_job.id, note_job), *((j.id, j) for j in exports.values())]
        }
    stored = picky.stored[5:]
    assert stored.index(uids[note_job.id]) > max(
        stored.index(uids[exports["sr"].id]), stored.index(uids[exports["kos"].id])
    )
    assert uids[exports["overlay"].id] not in stored


def test_a_note_is_not_sent_before_the_objects_it_follows_nor_in_their_association(
    sessions: sessionmaker[Session], tmp_path: Path, picky: PickySCP
) -> None:
    """The new SR refused once in the association that takes the new overlay and KOS: the
    note, claimed with them, is not sent in it (the SR's outcome is not known before) nor
    after it while the SR waits out its backoff; it is put back until at least the SR is due
    again (not claimed again every second meanwhile). Once the SR is sent the note follows
    it at once: the destination has the new SR before it is told to hide the old one."""
    worker = _picky_worker(tmp_path, sessions, picky)
    study_id = _first_analysis(worker, sessions)
    first = _rows(sessions, study_id)
    [sr_class] = {row.sop_class_uid for row in first.values() if row.kind == "sr"}
    picky.refused = sr_class
    _late_image(worker, sessions, study_id)
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    _drain(worker)

    note_job, exports = _note_and_its_exports(sessions, study_id, first)
    with sessions() as session:
        note_uid = session.get(ResultObject, note_job.payload["result_id"]).sop_instance_uid
    assert (exports["sr"].state, exports["sr"].attempts) == ("queued", 1)
    assert (note_job.state, note_job.attempts) == ("queued", 0)
    assert note_uid not in picky.stored
    assert as_utc(note_job.run_after) >= as_utc(exports["sr"].run_after)

    picky.refused = None
    with sessions() as session:
        session.get(Job, exports["sr"].id).run_after = utcnow()
        session.commit()
    _drain(worker)
    with sessions() as session:
        assert session.get(Job, note_job.id).state == "done"
        sr_uid = session.get(ResultObject, exports["sr"].payload["result_id"]).sop_instance_uid
    assert picky.stored.index(sr_uid) < picky.stored.index(note_uid)
