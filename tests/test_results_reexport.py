"""Late images and exports: a study analysed and exported, then analysed again after late
instances, sends the destination only its new and changed result objects (SQLite and
PostgreSQL, real models, a real dcmtk storescp keeping every object it receives).

An object built again with the same SOP Instance UID and the same content is not sent again
(it was sent twice before: ~600 duplicates for a 99-slice CT); one whose content changed (a
2.5D model's slice whose neighbours arrived late) is a new instance with a new UID; the new
report names the earlier one, which the destination keeps too. An export that was
dead-lettered is queued again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import StoreSCP, spool_and_index, spool_late_instance, storescp, wait_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Destination, Settings
from dicomnode.db.models import Job, ResultObject
from dicomnode.db.session import utcnow
from dicomnode.ingest.assembly import queue_ready_studies
from dicomnode.jobs.queue import enqueue
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.results.versions import content_digest, revision_uid
from dicomnode.synth.ct import make_ct_series
from dicomnode.synth.cxr import make_cxr
from dicomnode.worker import Worker

REPO = Path(__file__).resolve().parent.parent
PNEUMOTHORAX = REPO / "models" / "cxr_pneumothorax_demo.toml"
CT_NODULE = REPO / "models" / "ct_nodule_demo.toml"


@pytest.fixture
def keeping_pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """A storescp that keeps each object it receives in a file of its own (a second copy of
    a SOP Instance UID does not overwrite the first)."""
    with storescp(tmp_path, "--accept-all", "--unique-filenames") as running:
        yield running


def _worker(tmp_path: Path, sessions: sessionmaker[Session], pacs: StoreSCP, card: Path) -> Worker:
    settings = Settings(
        storage={"path": tmp_path / "storage"},
        worker={"threads": 1},
        destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)],
    )
    return Worker(settings, sessions, [load_card(card)])


def _analyse_and_export(worker: Worker, sessions: sessionmaker[Session], study_id: int) -> None:
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    while worker.run_once():
        pass
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.study_id == study_id)).all()
        assert {(job.kind, job.state) for job in jobs} <= {
            ("analyse", "done"),
            ("results", "done"),
            ("export", "done"),
            ("export", "dead"),
        }


def _received(pacs: StoreSCP, sessions: sessionmaker[Session]) -> Counter[str]:
    """How many times the destination received each SOP Instance UID, once it has received
    every export job done."""
    with sessions() as session:
        sent = session.scalars(
            select(Job.id).where(Job.kind == "export", Job.state == "done")
        ).all()
    files = wait_for(
        lambda: len(pacs.received()) == len(sent) and pacs.received(),
        timeout=30,
        what=f"storescp to write {len(sent)} objects",
    )
    return Counter(str(pydicom.dcmread(path).SOPInstanceUID) for path in files)


def _rows(sessions: sessionmaker[Session], study_id: int) -> dict[str, ResultObject]:
    with sessions() as session:
        rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id))
        return {row.sop_instance_uid: row for row in rows}


def test_late_images_send_only_new_objects_and_the_superseding_report(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three radiographs analysed and exported (an overlay each, SR, KOS), one export
    dead-lettered before it was sent, one file lost; a late image: the destination gets the
    late image's overlay, the new SR and KOS, and the object whose export was dead-lettered,
    each once; the first three overlays are not sent again."""
    worker = _worker(tmp_path, sessions, keeping_pacs, PNEUMOTHORAX)
    with sessions() as session:
        ds, _ = make_cxr(940_201, pneumothorax=True)
        study_id, _ = spool_and_index(session, worker.settings.storage_path, ds)
        for seed in (940_202, 940_203):
            spool_late_instance(session, worker.settings.storage_path, study_id, seed)
    with sessions() as session:
        assert queue_ready_studies(session, utcnow()) == [study_id]
    while worker.run_once():
        with sessions() as session:
            exports = session.scalars(select(Job).where(Job.kind == "export")).all()
            if exports:
                break
    # One export dead-lettered before it was tried (e.g. refused, then given up on).
    with sessions() as session:
        buried = next(
            job
            for job in session.scalars(select(Job).where(Job.kind == "export").order_by(Job.id))
            if session.get(ResultObject, job.payload["result_id"]).kind == "overlay"
        )
        buried.state = "dead"
        buried.last_error = "refused"
        buried_result = buried.payload["result_id"]
        session.commit()
    while worker.run_once():
        pass
    first = _rows(sessions, study_id)
    assert sorted(row.kind for row in first.values()) == [
        "kos",
        "overlay",
        "overlay",
        "overlay",
        "sr",
    ]
    assert sum(_received(keeping_pacs, sessions).values()) == 4

    # One sent overlay's file lost meanwhile: written again under its UID, not sent again.
    lost = next(row for row in first.values() if row.kind == "overlay" and row.id != buried_result)
    Path(lost.path).unlink()
    with sessions() as session:
        late = spool_late_instance(session, worker.settings.storage_path, study_id, 940_204)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        _analyse_and_export(worker, sessions, study_id)

    second = _rows(sessions, study_id)
    received = _received(keeping_pacs, sessions)
    duplicates = {uid: n for uid, n in received.items() if n > 1}
    assert duplicates == {}, f"{len(duplicates)} objects sent more than once"
    overlays = {uid for uid, row in second.items() if row.kind == "overlay"}
    unchanged = overlays & set(first)
    assert len(unchanged) == 3 and len(overlays) == 4  # the late image's overlay is new
    # Every object the node holds reached the destination, and the superseded SR and KOS
    # (sent after the first analysis) are kept there too.
    assert set(received) == set(second) | set(first)
    new_sr = next(row for row in second.values() if row.kind == "sr")
    old_sr = next(row for row in first.values() if row.kind == "sr")
    assert new_sr.sop_instance_uid != old_sr.sop_instance_uid
    report = pydicom.dcmread(new_sr.path)
    [study] = report.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [
        old_sr.sop_instance_uid
    ]
    assert late in {
        r.ReferencedSOPInstanceUID
        for item in report.CurrentRequestedProcedureEvidenceSequence
        for s in item.ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    # The unchanged overlays keep their rows and files (those sent), the lost one written again.
    for uid in unchanged:
        assert (second[uid].id, second[uid].path) == (first[uid].id, first[uid].path)
        assert second[uid].created_at == first[uid].created_at
    assert pydicom.dcmread(lost.path).SOPInstanceUID == lost.sop_instance_uid
    # The dead-lettered object was exported again by the second results job (once).
    with sessions() as session:
        again = [
            job
            for job in session.scalars(select(Job).where(Job.kind == "export"))
            if job.payload["result_id"] == buried_result and job.state == "done"
        ]
    assert len(again) == 1
    assert "6 result objects (3 unchanged), 2 earlier version(s) superseded" in caplog.text


def _ct_with_late_slices(
    worker: Worker, sessions: sessionmaker[Session]
) -> tuple[int, dict[str, ResultObject], dict[str, str], dict[str, ResultObject]]:
    """A CT analysed and exported, then again after four slices in its middle arrived late:
    its study id, its result rows and their content digests after the first analysis, and
    its result rows after the second."""
    series, _ = make_ct_series(11, rows=160, slices=40, nodules=(4, 6))
    late = set(range(18, 22))
    with sessions() as session:
        for index, ds in enumerate(series):
            if index not in late:
                study_id, _ = spool_and_index(session, worker.settings.storage_path, ds)
    _analyse_and_export(worker, sessions, study_id)
    first = _rows(sessions, study_id)
    first_digests = {uid: content_digest(pydicom.dcmread(row.path)) for uid, row in first.items()}
    with sessions() as session:
        for index in sorted(late):
            spool_and_index(session, worker.settings.storage_path, series[index])
    _analyse_and_export(worker, sessions, study_id)
    return study_id, first, first_digests, _rows(sessions, study_id)


def _changed(first: dict[str, ResultObject], second: dict[str, ResultObject]) -> set[str]:
    """The UIDs of ``second``'s objects that are later versions of one of ``first``."""
    return {
        uid
        for uid, row in second.items()
        if uid not in first and row.first_sop_instance_uid != row.sop_instance_uid
    }


def test_an_object_whose_content_changed_with_late_slices_is_a_new_instance(
    sessions: sessionmaker[Session], tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """A CT's nodule detector reads 3 adjacent slices: four slices arriving late in the
    middle change what it draws on their neighbours. Those overlays and presentation states
    are new instances (same UID, other content, was sent under the old UID, which a PACS may
    ignore); the others are not sent again."""
    worker = _worker(tmp_path, sessions, keeping_pacs, CT_NODULE)
    _, first, first_digests, second = _ct_with_late_slices(worker, sessions)

    received = _received(keeping_pacs, sessions)
    duplicates = {uid: n for uid, n in received.items() if n > 1}
    assert duplicates == {}, f"{len(duplicates)} objects sent more than once"
    assert set(received) == set(first) | set(second)
    kept = set(first) & set(second)
    per_image = {uid for uid, row in second.items() if row.kind in ("overlay", "gsps")}
    assert len(kept & per_image) >= 10
    # Each UID names one content: a version with a new content has a new UID.
    for uid in kept:
        assert content_digest(pydicom.dcmread(second[uid].path)) == first_digests[uid]
    changed = _changed(first, second)
    assert changed, "no object changed: the case this test is for did not occur"
    for uid in changed:
        first_uid = second[uid].first_sop_instance_uid
        assert first_uid in first and first_uid not in second
        assert not Path(first[first_uid].path).exists()
        assert second[uid].sop_instance_uid == revision_uid(
            first_uid, content_digest(pydicom.dcmread(second[uid].path))
        )


def test_a_new_version_whose_file_moved_is_still_known_as_its_first_uids(
    sessions: sessionmaker[Session], tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """The objects of the CT above, revised with its late slices, moved to other storage
    and each file named by its own SOP Instance UID (as a copy or restore may name them),
    their rows following; the study's results made again: each later version is still the
    current version of the UID it was first made with (its row says so, not its file's
    name), so the job keeps every row and sends nothing. Before migration 0006 the first UID
    was read from the file name: a moved version was taken for a new object, whose first UID
    was written and sent again with the new content."""
    worker = _worker(tmp_path, sessions, keeping_pacs, CT_NODULE)
    study_id, first, _, second = _ct_with_late_slices(worker, sessions)
    assert _changed(first, second), "no object changed: the case this test is for did not occur"
    moved = tmp_path / "moved"
    moved.mkdir()
    with sessions() as session:
        for row in session.scalars(select(ResultObject).where(ResultObject.study_id == study_id)):
            path = moved / f"{row.sop_instance_uid}.dcm"
            Path(row.path).rename(path)
            row.path = str(path)
        exports = session.scalar(select(func.count()).where(Job.kind == "export"))
        enqueue(session, "results", study_id, {})
        session.commit()
    while worker.run_once():
        pass

    third = _rows(sessions, study_id)
    assert {uid: (row.id, row.path) for uid, row in third.items()} == {
        uid: (row.id, str(moved / f"{uid}.dcm")) for uid, row in second.items()
    }
    with sessions() as session:
        assert session.scalar(select(func.count()).where(Job.kind == "export")) == exports
        last = session.scalars(select(Job).where(Job.kind == "results").order_by(Job.id.desc()))
        assert last.first().state == "done"
    assert sorted(moved.iterdir()) == sorted(moved / f"{uid}.dcm" for uid in second)
    received = _received(keeping_pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
    assert set(received) == set(first) | set(second)


def _not_bitwise_repeatable(worker: Worker, seed: int) -> None:
    """From now on the worker's inference differs from run to run in its last bits, as on a
    GPU whose convolution algorithms are picked per batch size and run in TF32: noise of 0.01
    on the maps a model returns (the pneumothorax CAM spans about -50..100), its
    probabilities untouched. The models themselves run as always."""
    run = worker.runtime.run
    rng = np.random.default_rng(seed)

    def noisy(card: ModelCard, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {
            name: (
                value + (0.01 * rng.standard_normal(value.shape)).astype(value.dtype)
                if value.dtype.kind == "f" and value.ndim > 2
                else value
            )
            for name, value in run(card, batch).items()
        }

    worker.runtime.run = noisy  # type: ignore[method-assign]


def _radiographs_with_a_late_image(
    worker: Worker, sessions: sessionmaker[Session], before_late: Callable[[], None]
) -> tuple[dict[str, ResultObject], dict[str, ResultObject]]:
    """Two radiographs analysed and exported; ``before_late`` called; a late image analysed
    and exported: the result rows after each analysis."""
    with sessions() as session:
        ds, _ = make_cxr(940_301, pneumothorax=True)
        study_id, _ = spool_and_index(session, worker.settings.storage_path, ds)
        spool_late_instance(session, worker.settings.storage_path, study_id, 940_302)
    _analyse_and_export(worker, sessions, study_id)
    first = _rows(sessions, study_id)
    before_late()
    with sessions() as session:
        spool_late_instance(session, worker.settings.storage_path, study_id, 940_303)
    _analyse_and_export(worker, sessions, study_id)
    return first, _rows(sessions, study_id)


def test_objects_made_again_from_the_same_inputs_stand_when_inference_is_not_repeatable(
    sessions: sessionmaker[Session], tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """A late image after inference that is not bitwise repeatable: the overlays of the two
    earlier images are made from the same images, settings and model, so they stand (rows,
    files, UIDs) and are not sent again, though their rebuilt bytes differ (the next test
    shows they do). Before, bytes decided and each became a new version, sent again."""
    worker = _worker(tmp_path, sessions, keeping_pacs, PNEUMOTHORAX)
    first, second = _radiographs_with_a_late_image(
        worker, sessions, lambda: _not_bitwise_repeatable(worker, 1)
    )
    overlays = {uid for uid, row in first.items() if row.kind == "overlay"}
    assert len(overlays) == 2
    for uid in overlays:
        assert (second[uid].id, second[uid].path) == (first[uid].id, first[uid].path)
    assert _changed(first, second) == set()
    received = _received(keeping_pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
    # The late image's overlay, the new SR and KOS: sent once each, and nothing else.
    assert set(received) - set(first) == set(second) - set(first)
    assert len(set(second) - set(first)) == 3


def test_a_replaced_model_file_means_the_contents_are_compared(
    sessions: sessionmaker[Session], tmp_path: Path, keeping_pacs: StoreSCP
) -> None:
    """The same, but the model's ONNX file replaced before the late image (same card, same
    bytes, a new file) and the worker reloaded: what the objects were made from changed (the
    session that makes them was loaded from the new file), so their contents are
    compared, and the noisy rebuild of the overlay with a heat map is a new version, sent
    once. A digest of inputs that missed the model file would keep them."""
    models = tmp_path / "models"
    models.mkdir()
    card = models / PNEUMOTHORAX.name
    shutil.copy(PNEUMOTHORAX, card)
    onnx = models / load_card(PNEUMOTHORAX).model.onnx
    shutil.copy(PNEUMOTHORAX.with_name(onnx.name), onnx)
    worker = _worker(tmp_path, sessions, keeping_pacs, card)

    def replace_model() -> None:
        _not_bitwise_repeatable(worker, 2)
        replacement = onnx.with_suffix(".new")
        shutil.copy(onnx, replacement)
        replacement.replace(onnx)
        os.utime(onnx, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        # What the reload that follows does with the unchanged card (Worker.reload).
        worker.runtime.keep_only({(c.model.name, c.model.version) for c in worker.cards})

    first, second = _radiographs_with_a_late_image(worker, sessions, replace_model)
    overlays = {uid for uid, row in first.items() if row.kind == "overlay"}
    # The pneumothorax image's overlay (its heat map drawn) changed under the noise.
    changed = {second[uid].first_sop_instance_uid for uid in _changed(first, second)}
    assert changed & overlays, "no overlay changed: the case this test is for did not occur"
    received = _received(keeping_pacs, sessions)
    assert {uid: n for uid, n in received.items() if n > 1} == {}
    assert set(received) == set(first) | set(second)
