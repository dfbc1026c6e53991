"""A model card replaced between a study's analysis and its results job (an upgrade and a
restart, or a reload): the result objects still say what the worklist says (SQLite and
PostgreSQL, real workers, real ONNX sessions, a real dcmtk storescp as the PACS).

Acceptance finding: a study analysed with cxr-pneumothorax-demo 1.0.0 (the worklist's
findings) had its results job run after an upgrade, without the analysis in memory; it ran
the triage models again with 1.1.0 and sent an SR of 1.1.0 with another probability. Now the
results job writes no object of another version: the study is analysed again, and that
analysis's results job writes the objects, of the version its findings show.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, spool_and_index, storescp, wait_for
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import load_settings
from dicomnode.db.models import FindingRow, Job, ResultObject
from dicomnode.db.session import utcnow
from dicomnode.ingest.assembly import queue_ready_studies
from dicomnode.models.registry import discover_cards
from dicomnode.results.agreement import AGAIN_KEY, MAX_ANALYSES_AGAIN
from dicomnode.synth.cxr import make_cxr
from dicomnode.worker import Worker

REPO = Path(__file__).resolve().parent.parent
CARD = REPO / "models" / "cxr_pneumothorax_demo.toml"
MODEL = "cxr-pneumothorax-demo"
OLD, NEW = "1.0.0", "1.1.0"


@pytest.fixture
def keeping_pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """A storescp that keeps every object it receives (a UID received twice: two files)."""
    with storescp(tmp_path, "--accept-all", "--unique-filenames") as running:
        yield running


def _install_card(folder: Path, version: str) -> None:
    """The pneumothorax card and its ONNX file in ``folder``, the card saying ``version`` (as
    an upgrade replaces a models folder's card)."""
    folder.mkdir(exist_ok=True)
    text = CARD.read_text()
    assert f'version = "{NEW}"' in text
    (folder / CARD.name).write_text(text.replace(f'version = "{NEW}"', f'version = "{version}"'))
    onnx = folder / "cxr_pneumothorax_demo.onnx"
    if not onnx.exists():
        shutil.copyfile(CARD.with_suffix(".onnx"), onnx)


def _config(tmp_path: Path, db_url: str, pacs: StoreSCP, handover_mb: int) -> Path:
    """A worker's configuration: the pneumothorax card of ``tmp_path``/models (version OLD),
    one thread, ``handover_mb`` for analyses kept in memory, the PACS as destination."""
    _install_card(tmp_path / "models", OLD)
    config = tmp_path / "dicomnode.toml"
    config.write_text(
        f'[database]\nurl = "{db_url}"\n'
        f'[storage]\npath = "{tmp_path / "storage"}"\n'
        f'[models]\nfolders = ["{tmp_path / "models"}"]\n'
        f"[worker]\nthreads = 1\nhandover_mb = {handover_mb}\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {pacs.port}\n"
    )
    return config


def _worker(config: Path, sessions: sessionmaker[Session]) -> Worker:
    settings = load_settings(config)
    return Worker(settings, sessions, discover_cards(settings.model_folders))


def _queue_study(worker: Worker, sessions: sessionmaker[Session], seed: int) -> int:
    """A pneumothorax radiograph stored and its analysis queued; the study's id."""
    ds, _ = make_cxr(seed, pneumothorax=True)
    with sessions() as session:
        study_id, _ = spool_and_index(session, worker.settings.storage_path, ds)
        assert queue_ready_studies(session, utcnow()) == [study_id]
    return study_id


def _run_one(worker: Worker, sessions: sessionmaker[Session], kind: str) -> None:
    """Run the one queued job, which must be of ``kind``."""
    with sessions() as session:
        queued = session.scalars(select(Job.kind).where(Job.state == "queued")).all()
    assert queued == [kind], queued
    assert worker.run_once()


def _findings(sessions: sessionmaker[Session], study_id: int) -> list[tuple[str, float]]:
    with sessions() as session:
        rows = session.scalars(select(FindingRow).where(FindingRow.study_id == study_id))
        return [(row.model_version, row.probability) for row in rows]


def _sr_values(ds: pydicom.Dataset) -> tuple[set[str], list[float]]:
    """An SR's Algorithm Versions and its Probability measurements."""
    versions: set[str] = set()
    probabilities: list[float] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            meaning = (
                item.ConceptNameCodeSequence[0].CodeMeaning
                if "ConceptNameCodeSequence" in item
                else ""
            )
            if meaning == "Algorithm Version":
                versions.add(str(item.TextValue))
            if meaning == "Probability" and "MeasuredValueSequence" in item:
                probabilities.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return versions, probabilities


def _sent(pacs: StoreSCP, sessions: sessionmaker[Session]) -> list[pydicom.Dataset]:
    """What the PACS received, once it has every export job done."""
    with sessions() as session:
        done = session.scalars(select(Job.id).where(Job.kind == "export", Job.state == "done"))
        count = len(done.all())
    files = wait_for(
        lambda: len(pacs.received()) == count and pacs.received(),
        timeout=30,
        what=f"storescp to write {count} objects",
    )
    return [pydicom.dcmread(path) for path in files]


def _assert_objects_say_the_findings(
    sessions: sessionmaker[Session], study_id: int, pacs: StoreSCP, version: str
) -> None:
    """The study's findings, its result objects and what the PACS received are all of the
    model's ``version``, and the SRs give the findings' probability."""
    [(shown_version, shown_p)] = _findings(sessions, study_id)
    assert shown_version == version
    with sessions() as session:
        rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id))
        written = {(row.model_name, row.model_version, row.kind) for row in rows}
    assert written == {(MODEL, version, kind) for kind in ("sr", "overlay", "kos")}
    sent = _sent(pacs, sessions)
    assert {str(ds.Modality) for ds in sent} >= {"SR", "KO"}
    for ds in sent:
        assert f"{MODEL} {version}" in str(ds.get("SeriesDescription", "")), ds.SeriesDescription
        if ds.Modality == "SR":
            versions, probabilities = _sr_values(ds)
            assert versions == {version}
            assert probabilities and max(probabilities) == pytest.approx(shown_p, abs=1e-6)


@pytest.mark.parametrize(
    ("how", "handover_mb"),
    [("restart", 256), ("reload", 0), ("reload", 256)],
    ids=["upgrade-and-restart", "reload-not-in-memory", "reload-in-memory"],
)
def test_a_card_replaced_before_the_results_job_analyses_the_study_again(
    sessions: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
    how: str,
    handover_mb: int,
) -> None:
    """Analysed with the card's 1.0.0; before its results job runs, the worker gets 1.1.0 (a
    new worker after an upgrade, or a reload, with the analysis in memory or not): no object
    of 1.0.0 nor of 1.1.0 is written from that results job; the study is analysed again
    and its objects, findings and what the PACS got are all of 1.1.0."""
    config = _config(tmp_path, db_url, keeping_pacs, handover_mb)
    worker = _worker(config, sessions)
    study_id = _queue_study(worker, sessions, 953_101)
    _run_one(worker, sessions, "analyse")
    assert [version for version, _ in _findings(sessions, study_id)] == [OLD]

    _install_card(tmp_path / "models", NEW)
    if how == "restart":
        worker = _worker(config, sessions)
    else:
        assert worker.reload()
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        _run_one(worker, sessions, "results")
    with sessions() as session:
        assert session.scalars(select(ResultObject)).all() == []
        assert session.scalars(select(Job).where(Job.kind == "export")).all() == []
        [first_results] = session.scalars(select(Job).where(Job.kind == "results")).all()
        note = first_results.payload["note"]
    assert f"{MODEL} {OLD} on the worklist, {NEW} in this worker" in note
    assert "study analysed again" in note
    assert f"results job {first_results.id} study_id={study_id}: no result object written" in (
        caplog.text
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    if handover_mb and how == "reload":
        assert (
            "the analysis kept in memory was made with model cards since replaced "
            f"({MODEL} {OLD}); the triage models run again" in caplog.text
        )

    while worker.run_once():
        pass
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id))
        states = [(job.kind, job.state) for job in jobs]
        analyses = session.scalars(select(Job).where(Job.kind == "analyse").order_by(Job.id))
        assert [job.payload.get(AGAIN_KEY) for job in analyses] == [None, 1]
    assert states[:4] == [
        ("analyse", "done"),
        ("results", "done"),
        ("analyse", "done"),
        ("results", "done"),
    ]
    assert {state for _, state in states[4:]} == {"done"}
    _assert_objects_say_the_findings(sessions, study_id, keeping_pacs, NEW)


def test_the_same_card_run_again_writes_its_objects_at_once(
    sessions: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A results job of another worker (nothing in memory) with the same card: the models
    run again give the findings' probabilities (no WARNING), the objects are written at once
    and the study is not analysed again."""
    config = _config(tmp_path, db_url, keeping_pacs, 256)
    study_id = _queue_study(_worker(config, sessions), sessions, 953_102)
    _run_one(_worker(config, sessions), sessions, "analyse")
    worker = _worker(config, sessions)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        _run_one(worker, sessions, "results")
        while worker.run_once():
            pass
    assert "recompute=" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with sessions() as session:
        kinds = session.scalars(select(Job.kind).where(Job.kind != "export")).all()
    assert sorted(kinds) == ["analyse", "results"]
    _assert_objects_say_the_findings(sessions, study_id, keeping_pacs, OLD)


def test_workers_with_other_cards_do_not_analyse_a_study_forever(
    sessions: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two workers on one database with different versions of a card, one claiming the
    analyses and the other the results jobs: the study is analysed again twice, then the
    results job writes no object of the disagreeing model and names it as not written (the
    worklist row says the AI results are incomplete), instead of analysing it forever."""
    config = _config(tmp_path, db_url, keeping_pacs, 256)
    analyser = _worker(config, sessions)
    other = tmp_path / "other"
    _install_card(other, NEW)
    settings = load_settings(config)
    writer = Worker(settings, sessions, discover_cards([other]))
    study_id = _queue_study(analyser, sessions, 953_103)
    for _ in range(MAX_ANALYSES_AGAIN):
        _run_one(analyser, sessions, "analyse")
        _run_one(writer, sessions, "results")
    _run_one(analyser, sessions, "analyse")
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        _run_one(writer, sessions, "results")
    with sessions() as session:
        assert session.scalars(select(ResultObject)).all() == []
        assert session.scalars(select(Job).where(Job.state == "queued")).all() == []
        last = session.scalars(select(Job).where(Job.kind == "results").order_by(Job.id)).all()[-1]
        assert last.state == "done"
        [missing] = last.payload["not_written"]
    assert (missing["model"], missing["version"], missing["kind"]) == (MODEL, NEW, "all")
    assert "check that every worker runs the same model cards" in missing["error"]
    assert "check that every worker runs the same model cards" in caplog.text
    assert [version for version, _ in _findings(sessions, study_id)] == [OLD]


@pytest.mark.parametrize(
    ("shown_p", "again"),
    [(0.9, False), (0.1, True)],
    ids=["same-call", "other-call"],
)
def test_the_same_version_giving_other_probabilities_is_logged_or_analysed_again(
    sessions: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
    shown_p: float,
    again: bool,
) -> None:
    """The worklist's finding of the card's version says another probability than the model
    gives now (as if its ONNX file had been replaced under the same version): with the same
    call (above the threshold) a WARNING names both and the objects are written; with the
    other call the study is analysed again (the objects would call present what the worklist
    calls absent), and its objects say what its new findings say."""
    config = _config(tmp_path, db_url, keeping_pacs, 256)
    study_id = _queue_study(_worker(config, sessions), sessions, 953_104)
    _run_one(_worker(config, sessions), sessions, "analyse")
    with sessions() as session:
        [row] = session.scalars(select(FindingRow).where(FindingRow.study_id == study_id))
        assert row.probability > 0.9 and row.threshold < 0.9
        row.probability = shown_p
        session.commit()
    worker = _worker(config, sessions)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        _run_one(worker, sessions, "results")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    with sessions() as session:
        written = session.scalars(select(ResultObject)).all()
        [results] = session.scalars(select(Job).where(Job.kind == "results")).all()
    if again:
        assert written == []
        assert f"p={shown_p:.5f} on the worklist (threshold" in results.payload["note"]
        assert "study analysed again" in results.payload["note"]
        assert warnings == []
    else:
        assert len(written) == 3
        assert "note" not in results.payload
        [warning] = warnings
        assert f"p={shown_p:.5f} on the worklist" in warning
        assert "with the same calls" in warning
    while worker.run_once():
        pass
    if again:
        [(_, p)] = _findings(sessions, study_id)
        assert p > 0.9
        _assert_objects_say_the_findings(sessions, study_id, keeping_pacs, OLD)


def test_an_onnx_file_replaced_and_reloaded_before_the_results_job_runs_the_triage_again(
    sessions: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
    keeping_pacs: StoreSCP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Analysed, the analysis kept in memory; the ONNX file replaced under the same card
    and the worker reloaded before the results job: the triage models run again on the file
    the worker now runs (before, the objects were built from the old session's runs and their
    inputs named the new file, so later versions made by the new model stood as unchanged)."""
    import os

    config = _config(tmp_path, db_url, keeping_pacs, handover_mb=256)
    worker = _worker(config, sessions)
    study_id = _queue_study(worker, sessions, 953_121)
    _run_one(worker, sessions, "analyse")

    onnx = tmp_path / "models" / "cxr_pneumothorax_demo.onnx"
    replacement = onnx.with_suffix(".new")
    shutil.copyfile(onnx, replacement)
    later = onnx.stat().st_mtime_ns + 10**9
    os.utime(replacement, ns=(later, later))
    replacement.replace(onnx)
    assert worker.reload()
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        _run_one(worker, sessions, "results")
    assert (
        "the analysis kept in memory was made with model cards since replaced "
        f"({MODEL} {OLD}); the triage models run again" in caplog.text
    )
    with sessions() as session:
        assert session.scalars(
            select(ResultObject).where(ResultObject.study_id == study_id)
        ).all()  # the same bytes: the findings agree and the objects are written
