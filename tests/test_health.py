"""What an admin sees of trouble: /readyz's checks (a model that cannot load, storage below
its watermark), the ERROR line of a dead-lettered analysis, and the database gauges of dead
jobs and failed analyses."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import REPO, spool_and_index
from sqlalchemy import select
from web_server import serve

from dicomnode.config import Settings
from dicomnode.db.models import Job, Study
from dicomnode.jobs.queue import enqueue
from dicomnode.metrics import exposition
from dicomnode.models.registry import load_card
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.sessions import onnx_problem
from dicomnode.synth.cxr import make_cxr
from dicomnode.web.app import create_app
from dicomnode.web.health import health_router, readiness
from dicomnode.worker import Worker


def _no_database():
    raise RuntimeError("not used")


def test_readiness_names_a_model_whose_onnx_file_cannot_be_loaded(tmp_path: Path) -> None:
    """/readyz's models check loads each ONNX file (once per state of the file): a truncated
    one makes the node not ready, naming the model; put right, it is ready again."""
    shutil.copy(REPO / "models" / "cxr_view_demo.toml", tmp_path / "view.toml")
    onnx = (REPO / "models" / "cxr_view_demo.onnx").read_bytes()
    (tmp_path / "cxr_view_demo.onnx").write_bytes(onnx[:20_000])
    card = load_card(tmp_path / "view.toml")
    settings = Settings(storage={"path": tmp_path / "storage"})
    (tmp_path / "storage").mkdir()

    models = readiness(_no_database, settings, [card])["models"]
    assert models.startswith("ONNX file unusable: cxr-view-demo: cannot load"), models
    (tmp_path / "cxr_view_demo.onnx").write_bytes(onnx)
    assert readiness(_no_database, settings, [card])["models"].startswith("ok: cxr-view-demo")


def test_checking_a_model_file_does_not_log_it_as_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """/readyz, check-config and a reload's validation judge each ONNX file on a CPU
    session of their own: no INFO "loaded, running on CPUExecutionProvider" line, which read
    as if every model were reloaded on the CPU; the worker's own load keeps that line (it
    says which provider runs)."""
    shutil.copy(REPO / "models" / "cxr_view_demo.toml", tmp_path / "view.toml")
    shutil.copy(REPO / "models" / "cxr_view_demo.onnx", tmp_path / "cxr_view_demo.onnx")
    card = load_card(tmp_path / "view.toml")  # files of its own: not a verdict kept from before
    caplog.set_level(logging.DEBUG, logger="dicomnode.runtime")

    assert onnx_problem(card) == ""
    loaded = [r for r in caplog.records if "loaded, running on" in r.getMessage()]
    assert [r.levelno for r in loaded] == [logging.DEBUG]

    caplog.clear()
    Runtime(["CPUExecutionProvider"]).session(card)
    loaded = [r for r in caplog.records if "loaded, running on" in r.getMessage()]
    assert [r.levelno for r in loaded] == [logging.INFO]
    assert loaded[0].getMessage().startswith("model cxr-view-demo ")


def test_readiness_says_when_storage_is_below_its_watermark(tmp_path: Path) -> None:
    """Below [storage] min_free_bytes every instance is refused (0xA700): not ready."""
    (tmp_path / "storage").mkdir()
    full = Settings(storage={"path": tmp_path / "storage", "min_free_bytes": 2**62})
    storage = readiness(_no_database, full, [])["storage"]
    assert storage.startswith("below the free-space watermark:"), storage
    roomy = Settings(storage={"path": tmp_path / "storage", "min_free_bytes": 1})
    assert readiness(_no_database, roomy, [])["storage"] == "ok"


def test_readiness_says_when_the_storage_has_no_free_inodes(tmp_path: Path) -> None:
    """Free bytes but no free inode: no instance can be spooled, so not ready (a tmpfs of 40
    inodes, filled with empty files)."""
    storage = tmp_path / "storage"
    storage.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=40", "tmpfs", str(storage)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        settings = Settings(storage={"path": storage, "min_free_bytes": 1})
        assert readiness(_no_database, settings, [])["storage"] == "ok"
        with pytest.raises(OSError):
            for index in range(100):
                (storage / f"f{index}").touch()
        assert readiness(_no_database, settings, [])["storage"] == (
            "no free inodes on the storage file system"
        )
    finally:
        subprocess.run(["umount", str(storage)], check=True)


def test_a_dead_analysis_is_an_error_line_and_a_gauge(
    sessions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(storage={"path": tmp_path / "storage"}, worker={"max_attempts": 1})
    with sessions() as session:
        ds, _ = make_cxr(940_051, pneumothorax=True)
        study_id, _ = spool_and_index(session, settings.storage_path, ds)
        enqueue(session, "analyse", study_id, {"generation": 1})
        session.commit()

    def dies(*args, **kwargs):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr("dicomnode.worker.analyse_study", dies)
    worker = Worker(settings, sessions, [])
    with caplog.at_level(logging.WARNING, logger="dicomnode.worker"):
        assert worker.run_once()
    with sessions() as session:
        job = session.scalars(select(Job).where(Job.study_id == study_id)).one()
        assert job.state == "dead"
        assert session.get(Study, study_id).analysis_status == "failed"
    [line] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert line.getMessage().startswith(f"job {job.id} analyse study_id={study_id} dead after 1")
    assert f"POST /api/jobs/{job.id}/retry" in line.getMessage()

    text = exposition(sessions).decode()
    assert 'dicomnode_queue_depth{kind="analyse",state="dead"} 1.0' in text
    assert "dicomnode_analyses_failed 1.0" in text


def _queue_depth(url: str) -> dict[tuple[str, str], float]:
    """dicomnode_queue_depth's samples as /metrics serves them, by (kind, state)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    [family] = [
        f for f in text_string_to_metric_families(text) if f.name == "dicomnode_queue_depth"
    ]
    return {(s.labels["kind"], s.labels["state"]): s.value for s in family.samples}


def test_queue_depth_is_zero_for_every_kind_and_state_without_jobs(
    sessions, tmp_path: Path
) -> None:
    """An idle node's /metrics has dicomnode_queue_depth 0 for every job kind and state (a
    dashboard or a state="dead" > 0 alert sees 0, not "no data"); a series that had a job
    goes back to 0 once the job is done."""
    settings = Settings(storage={"path": tmp_path / "storage"})
    app = create_app(sessions)
    app.include_router(health_router(sessions, lambda: (settings, [])))
    every = {
        (kind, state)
        for kind in ("notify", "analyse", "export", "results")
        for state in ("queued", "leased", "dead")
    }
    with serve(app) as url:
        assert _queue_depth(url) == dict.fromkeys(every, 0.0)

        with sessions() as session:
            ds, _ = make_cxr(940_052, pneumothorax=False)
            study_id, _ = spool_and_index(session, settings.storage_path, ds)
            job = enqueue(session, "export", study_id, {"generation": 1})
            job.state = "dead"
            session.commit()
            job_id = job.id
        assert _queue_depth(url) == {**dict.fromkeys(every, 0.0), ("export", "dead"): 1.0}

        with sessions() as session:
            session.get(Job, job_id).state = "done"
            session.commit()
        assert _queue_depth(url) == dict.fromkeys(every, 0.0)
