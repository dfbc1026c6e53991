"""A ``dicomnode worker`` run by itself serves its own Prometheus metrics over HTTP
(``[worker] metrics_port``); the workers ``dicomnode serve`` starts do not (they report
through the node's ``/metrics``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import queue_notifications, wait_for, worker_config
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job
from dicomnode.ports import free_port
from dicomnode.supervision import TERMINATED

REPO = Path(__file__).resolve().parent.parent
MODEL_CARD = "ct_lung_seg_demo"

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def webhook() -> Iterator[str]:
    """A webhook receiver that answers every notification 200; its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def _config(folder: Path, db_url: str, webhook_url: str, metrics_port: int) -> Path:
    return worker_config(
        folder,
        db_url,
        f"threads = 1\npoll_seconds = 0.1\nmetrics_port = {metrics_port}\n",
        f'[notify]\nwebhook_enabled = true\nwebhook_url = "{webhook_url}"\n',
    )


def _queue_notification(sessions: sessionmaker[Session]) -> int:
    (job_id,) = queue_notifications(sessions, "1.2.826.0.1.3680043.10.1.9", 1)
    return job_id


def _wait_done(sessions: sessionmaker[Session], job_id: int) -> None:
    def done() -> bool:
        with sessions() as session:
            return session.scalar(select(Job.state).where(Job.id == job_id)) == "done"

    wait_for(done, 60, what=f"job {job_id} done")


def _start_worker(folder: Path, config: Path, *options: str) -> tuple[subprocess.Popen, Path]:
    """A real ``dicomnode worker`` logging to worker.log; returned once it says it is ready."""
    log = folder / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "worker", "--config", str(config), *options],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: " ready" in log.read_text() or process.poll() is not None, 60, what="ready"
        )
        assert process.poll() is None, log.read_text()
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, log


def _stop(process: subprocess.Popen, log: Path, status: int = 0) -> None:
    """SIGTERM, and the exit ``status`` expected: 0 run by itself, TERMINATED (128 + SIGTERM,
    telling serve it was stopped from outside) when serve started it."""
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=30) == status, log.read_text()
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def _listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_stand_alone_worker_serves_its_job_metrics(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str, webhook: str
) -> None:
    port = free_port()
    config = _config(tmp_path, db_url, webhook, port)
    process, log = _start_worker(tmp_path, config)
    try:
        assert f"serves its metrics at 127.0.0.1 port {port}" in log.read_text()
        _wait_done(sessions, _queue_notification(sessions))
        # Observed just after the job is marked done: scraped until it shows.
        metric = 'dicomnode_job_duration_seconds_count{kind="notify",stage="total"} 1.0'

        def scraped() -> str | None:
            text = _scrape(port)
            return text if metric in text else None

        text = wait_for(scraped, 10, what=metric)
        assert "dicomnode_inference_seconds" in text
    finally:
        _stop(process, log)
    assert "Traceback" not in log.read_text()


def test_worker_started_by_serve_serves_no_metrics_of_its_own(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str, webhook: str
) -> None:
    port = free_port()
    config = _config(tmp_path, db_url, webhook, port)
    process, log = _start_worker(tmp_path, config, "--parent-pid", str(os.getpid()))
    try:
        assert not _listens(port)
        assert "serves its metrics" not in log.read_text()
    finally:
        _stop(process, log, TERMINATED)


def test_metrics_port_on_the_command_line_replaces_the_configured_one(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str, webhook: str
) -> None:
    """Several workers on one host share the configuration file: each needs a port. A
    reload that changes the file's port does not claim that a restart would take it."""
    configured, given = free_port(), free_port()
    config = _config(tmp_path, db_url, webhook, configured)
    # A reload is refused without a model card: one small one.
    for name in (f"{MODEL_CARD}.toml", f"{MODEL_CARD}.onnx"):
        shutil.copy(REPO / "models" / name, tmp_path / "no-models" / name)
    process, log = _start_worker(tmp_path, config, "--metrics-port", str(given))
    try:
        assert "dicomnode_job_duration_seconds" in _scrape(given)
        assert not _listens(configured)
        config.write_text(config.read_text().replace(str(configured), str(free_port())))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: " reloaded" in log.read_text(), what="reload")
        assert "takes effect at the next restart" not in log.read_text()
    finally:
        _stop(process, log)


def test_a_metrics_port_in_use_is_logged_and_the_worker_runs_its_jobs(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str, webhook: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, db_url, webhook, port)
        process, log = _start_worker(tmp_path, config)
        try:
            _wait_done(sessions, _queue_notification(sessions))
        finally:
            _stop(process, log)
    text = log.read_text()
    assert f"serves no metrics: cannot listen on 127.0.0.1 port {port}" in text, text
    assert "Traceback" not in text
