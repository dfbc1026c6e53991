"""Serve's own process sleeps while idle and still acts at once: its web server stops as soon
as it is told to (not on a 0.1 s tick), and its pools notice a child's death as it happens
(not on a 1 s look). How idle serve is: tests/test_idle.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import launch_node, source_digest, wait_for, write_config
from test_idle import children

from dicomnode.ports import free_port
from dicomnode.web.server import WebServer

# How soon serve sees that a child has died: a guard that restarts stay prompt (a look once
# a second took up to 1 s; what fails on such looks is test_idle's count of serve's wake-ups).
# Half a second leaves room for a busy machine running other tests.
NOTICED_SECONDS = 0.5

# uvicorn's code that dicomnode.web.server replaces (main_loop) or relies on: on_tick's
# Date header on every tenth count, handle_exit setting should_exit. A new uvicorn that
# changes any of it fails here: compare it with WebServer, carry the change over, then
# update the digest.
REPLACED = {
    uvicorn.Server.main_loop: "afccb353a119333f",
    uvicorn.Server.on_tick: "60ea49b06ccf68c1",
    uvicorn.Server.handle_exit: "553276efa26e09ea",
    # should_exit set in __init__ (the property's setter takes it), and main_loop run by
    # _serve only while should_exit is not set (a stop asked for before it ran).
    uvicorn.Server.__init__: "c150b55284f7511e",
    uvicorn.Server._serve: "4575b7a50adfede8",
}


@pytest.mark.parametrize("replaced", list(REPLACED), ids=lambda f: f.__qualname__)
def test_replaced_uvicorn_code_is_the_reviewed_version(replaced) -> None:
    assert source_digest(replaced) == REPLACED[replaced], (
        f"uvicorn's {replaced.__qualname__} changed: review dicomnode/web/server.py"
    )


async def _hello(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def test_the_web_server_answers_with_a_date_and_stops_as_soon_as_it_is_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its main loop sleeps a second at a time; setting ``should_exit`` (as serve's threads
    and uvicorn's signal handler do) ends it at once, and the Date header keeps up."""
    port = free_port()
    server = WebServer(uvicorn.Config(_hello, host="127.0.0.1", port=port, log_level="warning"))
    ticks: list[float] = []
    on_tick = server.on_tick

    async def counted(counter: int) -> bool:
        ticks.append(time.monotonic())
        return await on_tick(counter)

    server.on_tick = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_for(lambda: server.started, 10, interval=0.01, what="the web server started")
        first = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert first.text == "hello" and first.headers["date"].endswith(" GMT")
        time.sleep(2.2)
        later = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert later.headers["date"] != first.headers["date"]
        # Its next wait a minute long, so that a stop found only at the tick after it and a
        # prompt one on a loaded machine (uvicorn's shutdown itself sleeps 0.1 s) are far
        # apart; the wait has begun once a tick has come after the change.
        monkeypatch.setattr("dicomnode.web.server.TICK_SECONDS", 60.0)
        seen = len(ticks)
        wait_for(lambda: len(ticks) > seen, 10, interval=0.01, what="a tick")
        told = time.monotonic()
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the web server waited for its tick to stop"
        assert time.monotonic() - told < 10, "the web server waited for its tick to stop"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_killed_worker_and_listener_are_noticed_at_once_and_restarted(tmp_path: Path) -> None:
    config, port, web_port = write_config(tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}")
    process, log = launch_node(tmp_path, config, port, web_port)
    try:
        wait_for(lambda: " ready (" in log.read_text(), 60, what="the worker ready")
        started = children(process.pid)
        (worker,), listener = started["worker"], started["listener"][0]
        time.sleep(1.5)  # idle: the pools' threads wait
        for pid, line in (
            (worker, r"worker 0 exited with status -9; restarting in 2 s"),
            (listener, r"DICOM listener \d exited with status -9; restarting in 2 s"),
        ):
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda line=line: re.search(line, log.read_text()),
                10,
                interval=0.005,
                what=line,
            )
            assert time.monotonic() - killed < NOTICED_SECONDS, log.read_text()
        _replaced(process, log, worker, listener)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()


def _replaced(process: subprocess.Popen, log: Path, worker: int, listener: int) -> None:
    """Serve has started a new worker and a new listener in place of ``worker`` and
    ``listener`` (one worker, two listeners, as configured)."""
    wait_for(
        lambda: (
            log.read_text().count(" ready (") == 2
            and log.read_text().count("listening for DICOM") == 3
        ),
        60,
        what="a new worker and listener",
    )
    again = children(process.pid)
    assert worker not in again["worker"] and listener not in again["listener"]
    assert len(again["worker"]) == 1 and len(again["listener"]) == 2


def test_a_worker_and_listener_stopped_by_a_sigterm_from_outside_are_started_again_quietly(
    tmp_path: Path,
) -> None:
    # A SIGTERM that serve did not send (kill by hand; systemd's KillMode=control-group sends
    # one to every process of the unit) is no crash: no ERROR, the child is started again.
    config, port, web_port = write_config(tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}")
    process, log = launch_node(tmp_path, config, port, web_port)
    try:
        wait_for(lambda: " ready (" in log.read_text(), 60, what="the worker ready")
        started = children(process.pid)
        (worker,), listener = started["worker"], started["listener"][0]
        for pid in (worker, listener):
            os.kill(pid, signal.SIGTERM)
        _replaced(process, log, worker, listener)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    output = log.read_text()
    assert " ERROR " not in output, output
    assert re.search(r"INFO dicomnode: worker 0 stopped on a SIGTERM from outside", output)
    assert re.search(r"INFO dicomnode.ingest: DICOM listener \d stopped on a SIGTERM from", output)
