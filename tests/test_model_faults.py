"""A broken model does not stop the node: a corrupt ONNX is reported at worker start-up
(naming the card), ingest goes on, and the study's analysis fails with the reason in the API.

Choice: the node runs without the broken model rather than refusing to start, because a
triage node that stops listening loses more than one model's results; ``dicomnode models
verify`` and ``check-config`` fail fast for operators who want a hard stop.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import REPO, start_node, stop_node, wait_for, write_config

from dicomnode.config import Settings
from dicomnode.models.registry import discover_cards
from dicomnode.synth.cxr import make_cxr
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


def test_corrupt_onnx_fails_the_study_with_reason_and_ingest_continues(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(REPO / "models" / "cxr_pneumothorax_demo.toml", models)
    (models / "cxr_pneumothorax_demo.onnx").write_bytes(b"this is not an ONNX protobuf" * 10)
    config, port, web_port = write_config(tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}")
    text = config.read_text().replace(str(REPO / "models"), str(models))
    one_attempt = text.replace("poll_seconds = 0.1\n", "poll_seconds = 0.1\nmax_attempts = 1\n")
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

        def failed(uid: str) -> dict | None:
            study = httpx.get(f"{node.web}/api/studies/{uid}", headers=node.headers, timeout=10)
            body = study.json()
            return body if body["analysis_status"] == "failed" else None

        for uid in uids:
            study = wait_for(lambda uid=uid: failed(uid), timeout=60, what="analysis failed")
            assert "cannot load" in study["analysis_error"]
            assert "cxr-pneumothorax-demo" in study["analysis_error"]
        # Both studies stay on the worklist, in arrival order.
        assert {row["study_instance_uid"] for row in node.worklist()} >= set(uids)
    finally:
        stop_node(node)
    log = node.log.read_text()
    assert "cxr_pneumothorax_demo.toml cannot be used" in log
