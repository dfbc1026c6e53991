"""Reload in-process: the node and a worker swap settings whole, or keep the old ones."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import launch_node, wait_for, write_config

from dicomnode.config import load_settings
from dicomnode.models.registry import ModelCard, discover_cards
from dicomnode.serve import Node
from dicomnode.systemd import Notifier, watchdog_interval
from dicomnode.worker import Worker

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
DESTINATION = '\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'


def _config(tmp_path: Path) -> Path:
    config, _, _ = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    return config


def test_node_reload_swaps_settings_and_refuses_a_bad_file(tmp_path: Path) -> None:
    config = _config(tmp_path)
    settings = load_settings(config)
    scp = SimpleNamespace(settings=settings)
    node = Node(config, settings, discover_cards(settings.model_folders), scp)

    config.write_text(config.read_text() + DESTINATION + "port = 104\n")
    assert node.reload()
    assert [d.name for d in scp.settings.destinations] == ["pacs"]
    assert node.current()[0] is scp.settings

    kept = scp.settings
    config.write_text(config.read_text().replace("port = 104", "port = 0"))
    assert not node.reload()
    assert scp.settings is kept and node.settings is kept


def test_node_reload_says_which_changes_wait_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The processes set their logging up once, at start: a reload that changes it says so
    instead of appearing to take it."""
    config = _config(tmp_path)
    settings = load_settings(config)
    node = Node(config, settings, discover_cards(settings.model_folders), None)
    config.write_text('log_level = "DEBUG"\n' + config.read_text())
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        assert node.reload()
    assert node.settings.log_level == "DEBUG"
    assert "reload: [log_level] changed; it takes effect at the next restart" in caplog.text


def test_node_reload_names_only_the_node_settings_that_wait_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The listeners read the peer and called-AE checks and the instance size limit per
    association; the port and the AE title are set up once."""
    config = _config(tmp_path)
    settings = load_settings(config)
    node = Node(config, settings, discover_cards(settings.model_folders), None)
    text = config.read_text().replace(
        "[node]\n", "[node]\nrequire_called_ae = true\nmax_instance_bytes = 1000000\n", 1
    )
    config.write_text(text)
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        assert node.reload()
    assert node.settings.node.require_called_ae
    assert "takes effect at the next restart" not in caplog.text
    config.write_text(text.replace('ae_title = "DICOMNODE"', 'ae_title = "OTHERNODE"', 1))
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        assert node.reload()
    assert "reload: [node.ae_title] changed; it takes effect at the next restart" in caplog.text


def test_serve_reload_compares_restart_only_keys_with_what_it_runs(tmp_path: Path) -> None:
    """A restart-only change set back before any restart is no longer pending: the second
    reload does not warn again about an ae_title the node already runs."""
    config, port, web_port = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", listeners=1
    )
    # One listener, no worker: the reload is what is tested.
    config.write_text(config.read_text().replace("[worker]\ncount = 1", "[worker]\ncount = 0"))
    process, log = launch_node(tmp_path, config, port, web_port)
    warning = "reload: [node.ae_title] changed; it takes effect at the next restart"

    def reload(text: str, reloads: int) -> str:
        config.write_text(text)
        process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: log.read_text().count("configuration reloaded") == reloads, 30, what="reload"
        )
        return log.read_text()

    try:
        running = config.read_text()
        assert warning in reload(running.replace('"DICOMNODE"', '"NEWNODE"', 1), 1)
        undone = reload(running, 2)
        assert undone.count(warning) == 1, undone
        assert "reload: [node.ae_title] is back to the running value" in undone
        # Changed again: pending again.
        assert reload(running.replace('"DICOMNODE"', '"THIRDNODE"', 1), 3).count(warning) == 2
    finally:
        process.terminate()
        try:
            assert process.wait(timeout=30) == 0, log.read_text()
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def _worker_with_a_warm_model(tmp_path: Path) -> tuple[Path, Worker, ModelCard, object]:
    """A worker on a fresh config, its config file, the pneumothorax card and that model's
    warm session."""
    config = _config(tmp_path)
    settings = load_settings(config)
    cards = discover_cards(settings.model_folders)
    worker = Worker(settings, None, cards)
    pneumothorax = next(c for c in cards if c.model.name == "cxr-pneumothorax-demo")
    return config, worker, pneumothorax, worker.runtime.session(pneumothorax)


def test_worker_reload_keeps_old_settings_on_error(tmp_path: Path) -> None:
    config, worker, pneumothorax, warm = _worker_with_a_warm_model(tmp_path)

    config.write_text(config.read_text() + DESTINATION + "port = 104\n")
    assert worker.reload()
    assert [d.name for d in worker.settings.destinations] == ["pacs"]
    # The unchanged model keeps its warm session.
    assert worker.runtime.session(pneumothorax) is warm

    config.write_text(config.read_text().replace("[models]", "[models]\nbogus = 1"))
    assert not worker.reload()
    assert [d.name for d in worker.settings.destinations] == ["pacs"]


def test_worker_reload_logs_no_model_as_loaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload checks every card's ONNX file on a CPU session of its own and keeps the warm
    sessions of unchanged models: no "loaded, running on" line at INFO, which read as if
    every model were reloaded on the CPU."""
    from dicomnode.pipeline import sessions

    # No verdict kept from another test: the reload judges every file, as a worker's first does.
    monkeypatch.setattr(sessions, "_VERDICTS", {})
    _, worker, pneumothorax, warm = _worker_with_a_warm_model(tmp_path)

    with caplog.at_level(logging.DEBUG, logger="dicomnode.runtime"):
        assert worker.reload()
    loaded = [r for r in caplog.records if "loaded, running on" in r.getMessage()]
    assert loaded, "the reload checked no ONNX file"
    assert {r.levelno for r in loaded} == {logging.DEBUG}
    assert worker.runtime.session(pneumothorax) is warm


def test_stand_alone_worker_reload_says_which_changes_wait_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker on another host has no ``dicomnode serve`` to name what its reload did not
    take; one started by serve leaves that to serve (one line, not one per worker)."""
    config = _config(tmp_path)
    settings = load_settings(config)
    worker = Worker(settings, None, discover_cards(settings.model_folders))
    text = config.read_text().replace("[worker]\n", "[worker]\nthreads = 3\n")
    config.write_text('log_level = "DEBUG"\n' + text)
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        assert worker.reload(name_restart_only=False)
    assert "takes effect at the next restart" not in caplog.text

    worker.settings = settings
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        assert worker.reload()
    assert worker.settings.worker.threads == 3
    for name in ("log_level", "worker.threads"):
        assert f"reload: [{name}] changed; it takes effect at the next restart" in caplog.text
    assert "[database] changed" not in caplog.text


def test_stand_alone_worker_reload_compares_restart_only_keys_with_what_it_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart-only change stays pending over further reloads until the worker restarts
    (the second reload compared it with the file's previous contents and said nothing),
    and is no longer pending once set back to the value the worker runs."""
    config = _config(tmp_path)
    settings = load_settings(config)
    worker = Worker(settings, None, discover_cards(settings.model_folders))
    running = config.read_text()
    changed = running.replace("[worker]\n", "[worker]\nthreads = 3\nmetrics_port = 9464\n")
    warnings = [
        f"reload: [{name}] changed; it takes effect at the next restart"
        for name in ("worker.threads", "worker.metrics_port")
    ]
    for reloads in range(2):
        config.write_text(changed)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            assert worker.reload()
        for warning in warnings:
            assert warning in caplog.text, f"reload {reloads + 1}: {caplog.text}"

    config.write_text(running)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        assert worker.reload()
    assert "takes effect at the next restart" not in caplog.text
    for name in ("worker.threads", "worker.metrics_port"):
        assert f"reload: [{name}] is back to the running value; no restart pending" in caplog.text


def test_notifier_speaks_to_abstract_and_path_sockets(tmp_path: Path) -> None:
    name = f"dicomnode-test-{os.getpid()}"
    for address, bind in [(f"@{name}", "\0" + name), (str(tmp_path / "n.sock"),) * 2]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(bind)
            receiver.settimeout(5)
            assert Notifier(address).notify("READY=1")
            assert receiver.recv(100) == b"READY=1"
    assert not Notifier("").notify("READY=1")


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


def test_worker_reload_thread_outlives_a_reload_that_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error in a reload (SIGHUP) is logged with its traceback and the
    running settings kept; the next SIGHUP still reloads (the thread died, and with it
    every later reload)."""
    import threading

    config = _config(tmp_path)
    settings = load_settings(config)
    worker = Worker(settings, None, discover_cards(settings.model_folders))
    reload, calls, buried = worker.reload, [], []

    def failing_once(name_restart_only: bool = True) -> bool:
        calls.append(name_restart_only)
        if len(calls) == 1:
            raise RuntimeError("a bug in reload")
        return reload(name_restart_only)

    worker.reload = failing_once  # type: ignore[method-assign]
    worker.exports.bury_unrouted_exports = lambda: buried.append(1)  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=worker._reload_on_request, args=(stop, True))
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            worker.reload_requested.set()
            wait_for(lambda: calls and not worker.reload_requested.is_set(), 5, interval=0.02)
            config.write_text(config.read_text() + DESTINATION + "port = 104\n")
            worker.reload_requested.set()
            wait_for(lambda: buried, 10, interval=0.02, what="the second reload")
        assert [d.name for d in worker.settings.destinations] == ["pacs"]
        failed = [r for r in caplog.records if "reload failed" in r.getMessage()]
        assert len(failed) == 1 and failed[0].levelno == logging.ERROR, caplog.text
        assert "the running settings are kept" in failed[0].getMessage()
        assert failed[0].exc_info and "a bug in reload" in caplog.text
    finally:
        stop.set()
        worker.reload_requested.set()
        thread.join(5)
    assert not thread.is_alive()


def test_worker_reload_loads_an_onnx_file_replaced_under_the_same_card(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An admin replaces a model's ONNX file, card unchanged, and reloads: the worker loads
    the new file (before, its card compared equal and the old session ran on); the other
    model keeps its warm session. Until the reload the results' context names the file the
    running session was loaded from, not the one on disk, so objects the old session made
    do not stand for the new model's later."""
    from dicomnode.results.inputs import node_context

    models = tmp_path / "models"
    models.mkdir()
    for name in ("cxr_pneumothorax_demo", "cxr_triage_demo"):
        for suffix in (".toml", ".onnx"):
            shutil.copy(REPO_MODELS / f"{name}{suffix}", models / f"{name}{suffix}")
    config = _config(tmp_path)
    config.write_text(config.read_text().replace(str(REPO_MODELS), str(models)))
    settings = load_settings(config)
    cards = discover_cards(settings.model_folders)
    worker = Worker(settings, None, cards)
    pneumothorax, triage = sorted(cards, key=lambda card: card.model.name)
    assert pneumothorax.model.name == "cxr-pneumothorax-demo"
    warm, other = worker.runtime.session(pneumothorax), worker.runtime.session(triage)
    context = node_context(settings, cards, worker.runtime.onnx_identity)

    replaced = pneumothorax.onnx_path
    new = replaced.with_suffix(".new")
    shutil.copy(replaced, new)
    os.utime(new, ns=(replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns + 10**9))
    new.replace(replaced)  # the admin's atomic replace
    assert node_context(settings, cards, worker.runtime.onnx_identity) == context
    assert node_context(settings, cards) != context  # the file on disk is another

    with caplog.at_level(logging.INFO, logger="dicomnode.runtime"):
        assert worker.reload()
    assert worker.runtime.session(pneumothorax) is not warm
    assert worker.runtime.session(triage) is other
    assert "model cxr-pneumothorax-demo:" in caplog.text and "ONNX file changed" in caplog.text
    reloaded = node_context(worker.settings, worker.cards, worker.runtime.onnx_identity)
    assert reloaded != context
