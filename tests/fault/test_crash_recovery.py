"""Crash safety: SIGKILL the node while a modality sends, restart, nothing acknowledged is lost.

The trials run ``benchmarks/fault_injection.py`` (which runs 100 of them at random kill
times); here two fixed kill times: mid-association and during assembly/analysis.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from dicomnode.config import MaxWaitMinutes, WorklistSettings
from dicomnode.db.models import Instance, Study
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
from dicomnode.ingest.recover import recover_spool
from dicomnode.synth.cxr import make_cxr

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from fault_injection import run_trial  # noqa: E402


def one_model(folder: Path, name: str = "cxr_pneumothorax_demo") -> Path:
    """A models folder with one of the repository's cards (and its ONNX file): the node's
    jobs are the same, with one model's results per study instead of thirteen (~3 s a
    study on two cores, which the trial waits for after the restart)."""
    folder.mkdir()
    for suffix in (".toml", ".onnx"):
        (folder / f"{name}{suffix}").symlink_to(REPO / "models" / f"{name}{suffix}")
    return folder


@pytest.mark.parametrize("kill_after", [0.3, 1.6])
def test_sigkill_loses_no_acknowledged_instance(tmp_path: Path, kill_after: float) -> None:
    models = one_model(tmp_path / "models")
    # Two listener processes on the one socket (the default is 4: each costs both of the
    # node's starts ~1 s of CPU on two cores; one association reaches one of them).
    result = run_trial(tmp_path, seed=7, kill_after=kill_after, models=models, listeners=2)
    assert result.acked > 0 or kill_after < 0.5
    assert result.lost == []
    assert result.duplicated == []
    assert result.unsettled == []


def test_recovery_indexes_orphans_and_removes_temporary_files(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    storage = tmp_path / "storage"
    ds, _ = make_cxr(11, pneumothorax=False, size=64)
    folder = storage / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
    folder.mkdir(parents=True)
    # Killed after the rename, before the commit: a file without a row.
    orphan = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(orphan, enforce_file_format=True)
    # Killed before the rename: a temporary file.
    stale = folder / f".{ds.SOPInstanceUID}.dcm.123.456.tmp"
    stale.write_bytes(b"partial")
    # Results the node wrote are not received instances.
    result = storage / "results" / "1.2" / "1.3" / "1.4.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"not scanned")
    # The same instance sent again under another study, both copies unindexed at the kill:
    # the first found (folders in order) is indexed, the other removed.
    second = storage / "1.2.9" / "1.2.9.1" / f"{ds.SOPInstanceUID}.dcm"
    second.parent.mkdir(parents=True)
    ds.save_as(second, enforce_file_format=True)
    try:
        with sessions() as session:
            first = recover_spool(session, storage, 0.5, WorklistSettings())
        with sessions() as session:
            again = recover_spool(session, storage, 0.5, WorklistSettings())
            rows = session.scalar(select(func.count()).select_from(Instance))
            path = session.scalar(select(Instance.path))
    finally:
        engine.dispose()
    assert (first.indexed, first.temporary_removed, first.unreadable) == (1, 1, 0)
    assert (again.indexed, again.temporary_removed) == (0, 0)
    assert rows == 1 and path == str(orphan)
    assert not stale.exists() and not second.exists()
    assert pydicom.dcmread(orphan).SOPInstanceUID == ds.SOPInstanceUID


def test_recovery_places_a_study_by_the_configured_worklist(tmp_path: Path) -> None:
    """A study that recovery indexes gets the configured max wait, not the default one
    (before, recovery placed it by the default settings: a routine study due in 24 hours
    where the site reads routine studies within 2)."""
    url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    storage = tmp_path / "storage"
    ds, _ = make_cxr(12, pneumothorax=False, size=64)
    folder = storage / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
    folder.mkdir(parents=True)
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    worklist = WorklistSettings(max_wait_minutes=MaxWaitMinutes(urgent=60, routine=120))
    try:
        with sessions() as session:
            assert recover_spool(session, storage, 0.5, worklist).indexed == 1
            study = session.scalars(select(Study)).one()
            tier, waited = study.tier, study.due_at - study.received_at
    finally:
        engine.dispose()
    assert (tier, waited.total_seconds()) == ("routine", 120 * 60)
