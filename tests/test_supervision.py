"""serve's pools wait for a child's exit or the node's stop without polling (supervision.py)."""

from __future__ import annotations

import logging
import select
import subprocess
import sys
import threading
import time

import pytest

from dicomnode import supervision
from dicomnode.supervision import StopEvent, wait_for_exit


def _readable(event: StopEvent) -> bool:
    return bool(select.select([event], [], [], 0)[0])


def _child(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_stop_event_is_readable_while_set_and_not_after_clear() -> None:
    event = StopEvent()
    assert not _readable(event)
    event.set()
    event.set()  # a second byte, emptied by clear() as well
    assert event.is_set() and _readable(event)
    event.clear()
    assert not event.is_set() and not _readable(event)
    event.set()
    assert _readable(event)


def test_a_wait_ends_when_a_child_exits_and_when_the_node_stops() -> None:
    stop = StopEvent()
    running, ending = _child(30), _child(0.3)
    try:
        started = time.monotonic()
        assert wait_for_exit([running, ending], stop) is False
        assert 0.2 < time.monotonic() - started < 5
        assert ending.poll() == 0  # left for the caller to reap

        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        assert wait_for_exit([running], stop) is True
        assert 0.2 < time.monotonic() - started < 5
    finally:
        running.kill()
        running.wait()


def test_a_wait_after_the_stop_event_is_cleared_blocks_again() -> None:
    # A cleared event whose pipe stayed readable ended every wait at once: a pool's loop spun.
    stop = StopEvent()
    stop.set()
    stop.clear()
    child = _child(0.4)
    try:
        started = time.monotonic()
        assert wait_for_exit([child], stop) is False
        assert time.monotonic() - started > 0.3, "the wait ended at once"
    finally:
        child.kill()
        child.wait()


def test_without_pidfds_the_pools_look_every_second_and_say_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(pid: int) -> int:
        raise PermissionError(1, "Operation not permitted")  # a system-call filter's EPERM

    monkeypatch.setattr(supervision.os, "pidfd_open", refused)
    monkeypatch.setattr(supervision, "_said_polling", False)
    monkeypatch.setattr(supervision, "POLL_SECONDS", 0.1)
    stop = StopEvent()
    child = _child(30)
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode.supervision"):
            assert wait_for_exit([child], stop) is False
            assert wait_for_exit([child], stop) is False
        said = [r.getMessage() for r in caplog.records if r.name == "dicomnode.supervision"]
        assert said == ["no pidfds here: child processes are looked at every 0.1 s"], said
    finally:
        child.kill()
        child.wait()
