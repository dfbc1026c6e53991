"""A destination that refuses some objects and takes the others, over real associations to a
pynetdicom Storage SCP (SQLite and PostgreSQL): an object whose SOP class it does not support,
alone in its association, and one it answers 0xA700 for (a PACS filter refusing one SOP
class) are refused objects, retried with backoff and dead-lettered after their attempts; the
destination is not taken for down, and the objects sent with them are delivered."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import free_port, wait_for
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import SegmentationStorage, Verification
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_export import _due_now, _jobs, _worker, study_with_exports
from test_scp import secondary_capture
from web_server import add_users, serve
from worklist_seed import add_study

from dicomnode.config import Destination, Settings
from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.db.session import utcnow
from dicomnode.export.echo import echo
from dicomnode.export.jobs import REFUSED_WHILE_STORING
from dicomnode.export.scu import DestinationUnavailable, ExportError, send_files
from dicomnode.web.app import create_app
from dicomnode.worker import Worker


class PickySCP:
    """A pynetdicom Storage SCP (AE PACS) that supports every storage SOP class but those of
    ``unsupported`` (their presentation contexts rejected, abstract syntax not supported),
    and Verification; it answers ``refuse_status`` to a C-STORE of ``refused``, and 0xA700 to
    every one once it stored ``room`` objects (its disk full); keeps the SOP Instance UIDs of
    those it stored."""

    def __init__(
        self,
        unsupported: Iterable[str] = (),
        refused: str | None = None,
        refuse_status: int = 0xA700,
        room: int | None = None,
    ) -> None:
        self.refused, self.refuse_status, self.room = refused, refuse_status, room
        self.stored: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        left_out = set(unsupported)
        ae.supported_contexts = [
            cx for cx in AllStoragePresentationContexts if cx.abstract_syntax not in left_out
        ]
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )

    def _store(self, event: evt.Event) -> int:
        if event.request.AffectedSOPClassUID == self.refused:
            return self.refuse_status
        if self.room is not None and len(self.stored) >= self.room:
            return 0xA700
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def _as_segmentation(sessions: sessionmaker[Session], job_id: int) -> str:
    """Make the export job's result object a Segmentation Storage object (its SOP class
    rewritten in its file); returns its SOP Instance UID."""
    with sessions() as session:
        result = session.get(ResultObject, session.get(Job, job_id).payload["result_id"])
        path = Path(result.path)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SegmentationStorage)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def test_send_files_with_no_context_accepted_refuses_each_file(tmp_path: Path) -> None:
    """An association accepted with none of its presentation contexts (pynetdicom aborts it,
    'No accepted presentation contexts') is a refusal of each file's SOP class, not a
    destination that cannot be reached."""
    pacs = PickySCP(unsupported=[SegmentationStorage])
    try:
        path = tmp_path / "seg.dcm"
        ds = secondary_capture()
        ds.SOPClassUID = UID(SegmentationStorage)
        ds.save_as(path, enforce_file_format=True)
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)
        [outcome] = send_files([path], destination, calling_ae="DICOMNODE", timeout=10)
        assert isinstance(outcome, ExportError)
        assert not isinstance(outcome, DestinationUnavailable)
        assert "Segmentation Storage in Explicit VR Little Endian not accepted" in str(outcome)
        assert echo(destination, "DICOMNODE", timeout=10).answered  # the destination is up
    finally:
        pacs.close()


def test_a_sop_class_not_supported_alone_in_its_association_is_dead_lettered_not_an_outage(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Acceptance (HIGH): a SEG to a destination that does not support Segmentation Storage,
    alone in its association, failed as 'association not accepted (No accepted presentation
    contexts)': taken for an outage, retried every 10 minutes for ever, never dead-lettered,
    the destination logged as down. It is refused as where it shared the association with
    objects the destination took: retried with backoff, dead after max_attempts."""
    pacs = PickySCP(unsupported=[SegmentationStorage])
    try:
        jobs = study_with_exports(sessions, tmp_path, {"seg": "pacs"})
        _as_segmentation(sessions, jobs["seg"])
        worker = _worker(tmp_path, sessions, pacs.port, max_attempts=2)
        with caplog.at_level(logging.INFO, logger="dicomnode.worker"):
            assert worker.run_once()
            [job] = _jobs(sessions, jobs.values())
            assert (job.state, job.attempts) == ("queued", 1)
            assert job.last_error.startswith("ExportError: "), job.last_error
            assert "Segmentation Storage in Explicit VR Little Endian not accepted" in (
                job.last_error
            )
            _due_now(sessions, jobs.values())
            assert worker.run_once()
        [job] = _jobs(sessions, jobs.values())
        assert (job.state, job.attempts) == ("dead", 2)
        assert "dead after 2 attempts" in caplog.text
        assert "unreachable" not in caplog.text and "failing since" not in caplog.text
        assert worker.exports.outages.answered("pacs") is None  # never taken for down
        # The destination takes the study's other objects.
        other = study_with_exports(sessions, tmp_path, {"sr": "pacs"}, study_id=job.study_id)
        assert worker.run_once()
        assert [j.state for j in _jobs(sessions, other.values())] == ["done"]
        assert len(pacs.stored) == 1
    finally:
        pacs.close()


def test_a_failure_status_for_one_object_does_not_hold_back_the_rest_of_its_association(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Acceptance (MEDIUM): a PACS filter answered 0xA700 to the SEG; it and the SR sent after
    it stayed queued for ever (taken for a full disk), though the PACS took the study's other
    objects. Each object now has its own outcome: the others are delivered, and the SEG,
    refused while the destination stores others, uses its attempts and is dead-lettered."""
    pacs = PickySCP(refused=SegmentationStorage, refuse_status=0xA700)
    try:
        jobs = study_with_exports(sessions, tmp_path, {"kos": "pacs", "seg": "pacs", "sr": "pacs"})
        _as_segmentation(sessions, jobs["seg"])
        worker = _worker(tmp_path, sessions, pacs.port, max_attempts=2)
        with caplog.at_level(logging.INFO, logger="dicomnode.worker"):
            assert worker.run_once()
            state = dict(zip(jobs, _jobs(sessions, jobs.values()), strict=True))
            assert {name: job.state for name, job in state.items()} == {
                "kos": "done",
                "seg": "queued",
                "sr": "done",
            }
            assert len(pacs.stored) == 2
            seg = state["seg"]
            assert seg.attempts == 1 and "C-STORE status 0xA700" in seg.last_error
            assert seg.last_error.startswith("ExportError: ")
            assert REFUSED_WHILE_STORING in seg.last_error
            # Alone in its association now, it is still this object's refusal.
            _due_now(sessions, [seg.id])
            assert worker.run_once()
        [seg] = _jobs(sessions, [seg.id])
        assert (seg.state, seg.attempts) == ("dead", 2)
        assert "dead after 2 attempts" in caplog.text
        assert "out of resources in" not in caplog.text
    finally:
        pacs.close()


def test_an_object_refused_alone_is_a_refusal_once_the_destination_stores_others(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A SEG alone in its association, answered 0xA700, cannot be told from a full disk and
    waits as for one, using none of its attempts; once the destination takes another
    export (another study's) since, the same answer is a refusal of the SEG and uses its
    attempts: it is dead-lettered, not retried each time another study's objects get
    through."""
    pacs = PickySCP(refused=SegmentationStorage, refuse_status=0xA700)
    try:
        jobs = study_with_exports(sessions, tmp_path, {"seg": "pacs"})
        _as_segmentation(sessions, jobs["seg"])
        worker = _worker(tmp_path, sessions, pacs.port, max_attempts=2)
        assert worker.run_once()
        [seg] = _jobs(sessions, jobs.values())
        assert (seg.state, seg.attempts) == ("queued", 1)
        assert seg.last_error.startswith("DestinationOutOfResources: ")
        # Another study's export gets through; the SEG, waiting for the destination, is due.
        other = study_with_exports(sessions, tmp_path, {"sr": "pacs"})
        assert worker.run_once()
        assert [j.state for j in _jobs(sessions, other.values())] == ["done"]
        assert worker.run_once()
        [seg] = _jobs(sessions, jobs.values())
        assert (seg.state, seg.attempts) == ("dead", 2), seg.last_error
        assert REFUSED_WHILE_STORING in seg.last_error
    finally:
        pacs.close()


def test_a_destination_whose_disk_fills_during_an_association_is_waited_for(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A PACS whose disk fills after the study's first object answers 0xA700 to the rest,
    and to each retry: nothing stored after them, nor since, so they wait as for a
    destination that is down, past max_attempts, and are sent once it has room again.
    Retries here after their real backoff (0.2 s base), not made due by hand."""
    pacs = PickySCP(room=1)
    try:
        jobs = study_with_exports(sessions, tmp_path, {"kos": "pacs", "seg": "pacs", "sr": "pacs"})
        settings = Settings(
            storage={"path": tmp_path / "storage"},
            worker={"threads": 1, "backoff_base_seconds": 0.2, "max_attempts": 2},
            destinations=[
                Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)
            ],
        )
        worker = Worker(settings, sessions, cards=[])
        assert worker.run_once()
        for _ in range(3):  # more attempts than max_attempts
            wait_for(worker.run_once, timeout=30, interval=0.05, what="a retry to be due")
        states = [(job.state, job.attempts) for job in _jobs(sessions, jobs.values())]
        assert states == [("done", 1), ("queued", 4), ("queued", 4)]
        assert all(
            job.last_error.startswith("DestinationOutOfResources: ")
            for job in _jobs(sessions, jobs.values())
            if job.state == "queued"
        )
        pacs.room = None
        wait_for(worker.run_once, timeout=30, interval=0.05, what="a retry to be due")
        assert [job.state for job in _jobs(sessions, jobs.values())] == ["done"] * 3
        assert len(pacs.stored) == 3
    finally:
        pacs.close()


def test_the_worklist_and_the_study_say_an_export_is_retrying_until_it_is_sent_or_dead(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Acceptance (MEDIUM): objects stuck retrying showed on the worklist and in the API as
    no export problem at all (export_error ""). An export queued again after a failed
    attempt says so on its worklist row ("destination: retrying (N failed: reason)") until
    it is sent or dead-lettered (then "destination: reason", as before)."""
    tokens = add_users(sessions)
    with sessions() as session:
        uid = add_study(session, "ACC1", now=utcnow(), probability=0.9)
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
    jobs = study_with_exports(sessions, tmp_path, {"seg": "pacs"}, study_id=study_id)
    _as_segmentation(sessions, jobs["seg"])
    pacs = PickySCP(unsupported=[SegmentationStorage])
    headers = {"Authorization": f"Bearer {tokens['dr_house']}"}
    try:
        worker = _worker(tmp_path, sessions, pacs.port, max_attempts=2)
        with (
            serve(create_app(sessions)) as url,
            httpx.Client(base_url=url, headers=headers, timeout=10) as client,
        ):

            def shown() -> tuple[str, str, list[str]]:
                """The worklist row's export_error; the study's, and its export_errors."""
                [row] = client.get("/api/worklist").json()["rows"]
                detail = client.get(f"/api/studies/{uid}").json()
                return row["export_error"], detail["export_error"], detail["export_errors"]

            assert shown() == ("", "", [])
            assert worker.run_once()
            why = (
                f"ExportError: pacs (PACS@127.0.0.1:{pacs.port}): Segmentation Storage in "
                "Explicit VR Little Endian not accepted"
            )
            # The study's page lists dead letters ("Export failed"); its result objects'
            # export summaries say "retrying (1 failed: ...)" already.
            retrying = f"pacs: retrying (1 failed: {why})"
            assert shown() == (retrying, retrying, [])
            _due_now(sessions, jobs.values())
            assert worker.run_once()
            dead = f"pacs: {why}"
            assert shown() == (dead, dead, [dead])
    finally:
        pacs.close()
