"""A results job on full storage waits for room instead of dying: while storage is below
``[storage] min_free_bytes`` (ingest refuses instances with 0xA700 then), or a write runs
out of space, the job is queued again later without using its attempts, and the files of a
failed write are removed (an SR written before the disk filled stayed with no row). Once
there is room, the study's objects are written.

The full disk is real: a small tmpfs (mounted as root; skipped where that is refused).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import spool_and_index
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db.models import Job, ResultObject
from dicomnode.db.session import as_utc, utcnow
from dicomnode.ingest.spool import free_bytes
from dicomnode.jobs.queue import enqueue
from dicomnode.models.registry import load_card
from dicomnode.results.job import _new_folders, _remove_empty
from dicomnode.synth.cxr import make_cxr
from dicomnode.worker import Worker

REPO = Path(__file__).resolve().parent.parent
PNEUMOTHORAX = REPO / "models" / "cxr_pneumothorax_demo.toml"
MAX_ATTEMPTS = 2


def _worker(sessions: sessionmaker[Session], storage: Path, min_free_bytes: int) -> Worker:
    settings = Settings(
        storage={"path": storage, "min_free_bytes": min_free_bytes},
        worker={"threads": 1, "max_attempts": MAX_ATTEMPTS},
    )
    return Worker(settings, sessions, [load_card(PNEUMOTHORAX)])


def _analysed(worker: Worker, sessions: sessionmaker[Session], seed: int) -> int:
    """A study spooled, analysed (its priority set) and its results job queued; its id."""
    with sessions() as session:
        ds, _ = make_cxr(seed, pneumothorax=True, size=128)
        study_id, _ = spool_and_index(session, worker.settings.storage_path, ds)
        enqueue(session, "analyse", study_id, {"generation": 1})
        session.commit()
    assert worker.run_once()
    return study_id


def _results_job(sessions: sessionmaker[Session], study_id: int) -> Job:
    with sessions() as session:
        return session.scalars(
            select(Job).where(Job.study_id == study_id, Job.kind == "results")
        ).one()


def _tried_again_now(sessions: sessionmaker[Session], worker: Worker) -> None:
    """Make the waiting results job due and run it (its wait is 30 s)."""
    with sessions() as session:
        session.execute(update(Job).where(Job.kind == "results").values(run_after=utcnow()))
        session.commit()
    assert worker.run_once()


def _result_files(storage: Path) -> list[Path]:
    return sorted((storage / "results").rglob("*.dcm"))


def test_results_job_waits_while_storage_is_below_the_watermark(
    tmp_path: Path, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    storage = tmp_path / "storage"
    worker = _worker(sessions, storage, min_free_bytes=free_bytes(tmp_path) + 2**40)
    study_id = _analysed(worker, sessions, 950_001)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        for _ in range(MAX_ATTEMPTS + 2):
            _tried_again_now(sessions, worker)
            job = _results_job(sessions, study_id)
            assert (job.state, job.attempts) == ("queued", 0)
            assert (as_utc(job.run_after) - utcnow()).total_seconds() > 20
    assert _result_files(storage) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "below the free-space watermark" in warnings[0], warnings

    worker.settings.storage.min_free_bytes = 0  # room again
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        _tried_again_now(sessions, worker)
    assert _results_job(sessions, study_id).state == "done"
    with sessions() as session:
        rows = session.scalars(select(ResultObject.path)).all()
    assert sorted(map(Path, rows)) == _result_files(storage) != []
    assert "storage has room again: results jobs run" in caplog.messages


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted after the test."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_results_job_on_a_full_disk_waits_and_leaves_no_partial_files(
    tmp_path: Path, tmpfs: Path, sessions: sessionmaker[Session]
) -> None:
    """The first object (the SR, ~8 KB) fits, the second (~66 KB) does not: before, the SR
    stayed in storage/results with no row and the job was dead after its attempts; then its
    files were removed but the empty study and series folders stayed."""
    storage = tmpfs / "storage"
    # The watermark is not reached: the disk is full for these objects all the same.
    worker = _worker(sessions, storage, min_free_bytes=0)
    study_id = _analysed(worker, sessions, 950_002)
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * max(0, free_bytes(tmpfs) - 24 * 1024))
    assert 16 * 1024 <= free_bytes(tmpfs) <= 32 * 1024
    for _ in range(MAX_ATTEMPTS + 1):
        _tried_again_now(sessions, worker)
        job = _results_job(sessions, study_id)
        assert (job.state, job.attempts) == ("queued", 0), job.last_error
        # Nor the folders the failed write made (the SR's series folder, the study's).
        assert list((storage / "results").rglob("*")) == []

    filler.unlink()
    _tried_again_now(sessions, worker)
    assert _results_job(sessions, study_id).state == "done"
    with sessions() as session:
        rows = session.scalars(select(ResultObject.path)).all()
    assert len(rows) == 2 and sorted(map(Path, rows)) == _result_files(storage)
    shutil.rmtree(storage)


def test_a_failed_write_removes_only_the_empty_folders_it_made(tmp_path: Path) -> None:
    """A study folder another results job wrote into meanwhile stays, with its file."""
    root = tmp_path / "results"
    root.mkdir()
    study, other_series = root / "1.2", root / "1.2" / "1.2.9"
    made = _new_folders(study / "1.2.3" / "1.2.3.4.dcm", root)
    assert sorted(made) == [study, study / "1.2.3"]
    (study / "1.2.3").mkdir(parents=True)
    other_series.mkdir()
    (other_series / "1.2.9.1.dcm").write_bytes(b"result")
    _remove_empty(made)
    assert sorted(root.rglob("*")) == [study, other_series, other_series / "1.2.9.1.dcm"]
