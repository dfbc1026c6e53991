"""A broken model does not stop the node: a corrupt ONNX is reported at worker start-up
(naming the card and the file), ingest goes on, and studies are analysed by the other
models, the broken one left out until it is fixed and the node reloaded.

Choice: the node runs without the broken model rather than refusing to start, because a
triage node that stops listening loses more than one model's results; ``dicomnode models
verify``, ``check-config`` and ``/readyz`` fail for operators who want a hard stop. A node
configuration fault never dead-letters studies.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from conftest import REPO, spool_and_index, start_node, stop_node, wait_for, write_config
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings, load_settings
from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.jobs.queue import enqueue
from dicomnode.models.registry import discover_cards
from dicomnode.synth.cxr import make_cxr
from dicomnode.web.health import readiness
from dicomnode.worker import Worker


def test_worker_warms_every_demo_model_without_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ensemble card has no ONNX file of its own: start-up must not call it unusable."""
    cards = discover_cards([REPO / "models"])
    assert any(card.ensemble is not None for card in cards)
    worker = Worker(Settings(storage={"path": tmp_path}), None, cards)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        worker.warm_up()
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []
    loaded = {r.args[0] for r in caplog.records if r.msg.startswith("model %s %s loaded")}
    assert loaded == {card.model.name for card in cards if card.ensemble is None}


def test_corrupt_onnx_is_left_out_and_the_other_models_analyse(tmp_path: Path) -> None:
    """A truncated ONNX file (the admin review's repro: ``head -c 20000 good.onnx``) is a
    node configuration fault, not a study's: its model is left out (one ERROR naming the
    file), the other models analyse every study and no job is dead-lettered, even with one
    attempt per job; ``/readyz`` says the models are not ready."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("cxr_pneumothorax_demo", "cxr_lung_seg_demo"):
        shutil.copy(REPO / "models" / f"{name}.toml", models)
    shutil.copy(REPO / "models" / "cxr_lung_seg_demo.onnx", models)
    corrupt = models / "cxr_pneumothorax_demo.onnx"
    corrupt.write_bytes((REPO / "models" / "cxr_pneumothorax_demo.onnx").read_bytes()[:20000])
    database = tmp_path / "dicomnode.db"
    config, port, web_port = write_config(tmp_path, f"sqlite:///{database}")
    text = config.read_text().replace(str(REPO / "models"), str(models))
    one_attempt = text.replace("[worker]\n", "[worker]\nmax_attempts = 1\n")
    config.write_text(one_attempt)
    node = start_node(tmp_path, config, port, web_port)
    try:
        uids = []
        for seed in (930_001, 930_002):
            ds, _ = make_cxr(seed, pneumothorax=False, size=128)
            path = tmp_path / f"{seed}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sent = node.storescu(path)
            assert sent.returncode == 0, sent.stderr  # ingest is not affected
            uids.append(str(ds.StudyInstanceUID))

        def jobs() -> list[tuple[str, str, str]]:
            with closing(sqlite3.connect(database)) as db:
                return db.execute("SELECT kind, state, last_error FROM jobs").fetchall()

        def settled() -> bool:
            states = [state for _, state, _ in jobs()]
            return "dead" in states or (len(states) >= 4 and set(states) == {"done"})

        wait_for(settled, timeout=120, what="analyses and results jobs settled")
        assert [job for job in jobs() if job[1] == "dead"] == []
        for uid in uids:
            study = httpx.get(f"{node.web}/api/studies/{uid}", headers=node.headers, timeout=10)
            assert study.json()["analysis_status"] == "analysed"
        with closing(sqlite3.connect(database)) as db:
            written = db.execute("SELECT DISTINCT model_name FROM results").fetchall()
        assert written == [("cxr-lung-seg-demo",)]
        # The pneumothorax model would have read these radiographs: each row says the AI
        # results are incomplete, not that the AI found nothing.
        for uid in uids:
            row = httpx.get(f"{node.web}/api/studies/{uid}", headers=node.headers, timeout=10)
            assert row.json()["results_incomplete"] is True
            (missing,) = row.json()["results_missing"]
            assert (missing["model"], missing["kind"]) == ("cxr-pneumothorax-demo", "run")
            assert missing["error"].startswith("not run: the model cannot be loaded")
        settings = load_settings(config)
        checks = readiness(_no_database, settings, discover_cards(settings.model_folders))
        assert "cxr-pneumothorax-demo" in checks["models"]
        assert not checks["models"].startswith("ok")
    finally:
        stop_node(node)
    log = node.log.read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert str(corrupt) in errors[0]
    assert "cxr_pneumothorax_demo.toml cannot be used" in errors[0]
    # serve's start-up line lists the cards it read, not models it loaded (it loads none).
    (cards,) = [line for line in log.splitlines() if "cxr-pneumothorax-demo 1.1.0" in line]
    assert "2 model card(s), each model loaded by the workers: " in cards


def test_a_study_a_corrupt_model_would_have_read_does_not_read_as_cleared(
    tmp_path: Path, db_url: str
) -> None:
    """The acceptance test's repro: the pneumothorax model's ONNX file truncated, a
    pneumothorax phantom sent (one the nodule model scores 0.22, below its 0.33 threshold:
    the demo model flags some phantoms). The nodule model ran and found nothing, the
    pneumothorax model did not run: the worklist must not say "no finding above threshold"
    of the study as if every model had looked, and the row names the model as not run, in
    the same words."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("cxr_pneumothorax_demo", "cxr_nodule_demo"):
        shutil.copy(REPO / "models" / f"{name}.toml", models)
    shutil.copy(REPO / "models" / "cxr_nodule_demo.onnx", models)
    corrupt = models / "cxr_pneumothorax_demo.onnx"
    corrupt.write_bytes((REPO / "models" / "cxr_pneumothorax_demo.onnx").read_bytes()[:20000])
    config, port, web_port = write_config(tmp_path, db_url)
    config.write_text(config.read_text().replace(str(REPO / "models"), str(models)))
    node = start_node(tmp_path, config, port, web_port)
    try:
        ds, _ = make_cxr(930_033, pneumothorax=True, size=512)
        path = tmp_path / "pneumothorax.dcm"
        ds.save_as(path, enforce_file_format=True)
        sent = node.storescu(path)
        assert sent.returncode == 0, sent.stderr
        url = f"{node.web}/api/studies/{ds.StudyInstanceUID}"

        def settled() -> dict | None:
            row = httpx.get(url, headers=node.headers, timeout=10).json()
            return row if row.get("results_state") in ("done", "dead") else None

        row = wait_for(settled, timeout=120, what="the study's results job settled")
        assert row["analysis_status"] == "analysed"
        assert row["priority"] == "routine"
        assert row["reason"] == (
            "AI: no finding above threshold from the models that ran; "
            "not run: cxr-pneumothorax-demo"
        )
        assert row["results_incomplete"] is True
        (missing,) = row["results_missing"]
        assert (missing["model"], missing["kind"]) == ("cxr-pneumothorax-demo", "run")
        assert missing["error"].startswith("not run: ")
    finally:
        stop_node(node)


def _no_database():
    raise RuntimeError("not needed")


def _warm_worker(tmp_path: Path, sessions: sessionmaker[Session]) -> tuple[Path, Settings, Worker]:
    """A worker of the pneumothorax and lung segmentation models (copied to a folder of the
    test's: their files may be spoiled), both loaded and warmed up, one attempt per job."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("cxr_pneumothorax_demo", "cxr_lung_seg_demo"):
        shutil.copy(REPO / "models" / f"{name}.toml", models)
        shutil.copy(REPO / "models" / f"{name}.onnx", models)
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"max_attempts": 1})
    worker = Worker(settings, sessions, discover_cards([models]))
    worker.warm_up()
    return models, settings, worker


def test_model_failing_to_load_at_first_use_is_left_out_without_using_an_attempt(
    tmp_path: Path, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """The file replaced on disk after the worker's start-up check: the analysis that first
    loads it runs again at once without that model (no attempt used), the others' work is
    done, and the model stays out of later studies with one ERROR in all."""
    models, settings, worker = _warm_worker(tmp_path, sessions)
    # Both loaded; only the lung segmentation's session is kept warm.
    worker.runtime.keep_only({("cxr-lung-seg-demo", "1.0.0")})
    onnx = models / "cxr_pneumothorax_demo.onnx"
    onnx.write_bytes(onnx.read_bytes()[:20000])
    study_ids = []
    with sessions() as session:
        for seed in (930_011, 930_012):
            ds, _ = make_cxr(seed, pneumothorax=True, size=128)
            study_id, _ = spool_and_index(session, settings.storage_path, ds)
            enqueue(session, "analyse", study_id, {"generation": 1})
            study_ids.append(study_id)
        session.commit()
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        while worker.run_once():
            pass
    with sessions() as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert {(job.kind, job.state) for job in jobs} == {("analyse", "done"), ("results", "done")}
        assert [job.attempts for job in jobs if job.kind == "analyse"] == [1, 1]
        for study_id in study_ids:
            study = session.get(Study, study_id)
            assert study.analysis_status == "analysed"
            # Pneumothorax phantoms: the model that would flag them did not run, which must
            # not read as the AI finding nothing; they keep their no-AI place (routine).
            assert study.tier == "routine"
            assert study.reason == (
                "no AI finding model ran (not run: cxr-pneumothorax-demo); read in arrival order"
            )
        written = session.scalars(select(ResultObject.model_name).distinct()).all()
        assert written == ["cxr-lung-seg-demo"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(onnx) in errors[0], errors
    assert worker.models.unusable.keys() == {"cxr-pneumothorax-demo"}


def test_a_results_model_failing_to_load_is_left_out_and_named_on_the_job(
    tmp_path: Path, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """The lung segmentation (a results-job model) replaced on disk after start-up: its first
    results job leaves it out and runs again at once without it, naming it as not run; later
    studies name it too, with one ERROR in all (not one per study)."""
    models, settings, worker = _warm_worker(tmp_path, sessions)
    worker.runtime.keep_only({("cxr-pneumothorax-demo", "1.1.0")})
    onnx = models / "cxr_lung_seg_demo.onnx"
    onnx.write_bytes(onnx.read_bytes()[:20000])
    with sessions() as session:
        for seed in (930_021, 930_022):
            ds, _ = make_cxr(seed, pneumothorax=True, size=128)
            study_id, _ = spool_and_index(session, settings.storage_path, ds)
            enqueue(session, "analyse", study_id, {"generation": 1})
        session.commit()
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        while worker.run_once():
            pass
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.kind == "results")).all()
        assert [job.state for job in jobs] == ["done", "done"]
        assert [job.attempts for job in jobs] == [1, 1]
        for job in jobs:
            (missing,) = job.payload["not_written"]
            assert (missing["model"], missing["kind"]) == ("cxr-lung-seg-demo", "run")
            assert missing["error"].startswith("not run: the model cannot be loaded")
        written = session.scalars(select(ResultObject.model_name).distinct()).all()
        assert written == ["cxr-pneumothorax-demo"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(onnx) in errors[0], errors
    assert worker.models.unusable.keys() == {"cxr-lung-seg-demo"}
