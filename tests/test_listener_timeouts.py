"""``[node] acse_timeout_seconds`` and ``network_timeout_seconds`` over real connections.

With the defaults (30 s, 60 s) a silent connection or an idle association stays open far
past these tests' checks: each one fails unless the setting reaches the listener, from the
configuration (in-process and under ``dicomnode serve``) and from a reload. There is no
DIMSE timeout setting: the node, as Storage and Verification SCP, never waits for a DIMSE
reply.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import stop_node, wait_for
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker
from test_connection_limits import (
    Attempt,
    _closed_by_node,
    _reloaded,
    _silent,
    _two_listener_node,
)
from test_reload import _config
from test_scp import Node
from test_scp import start_node as start_scp

from dicomnode.config import NodeSettings, Settings, load_settings
from dicomnode.models.registry import discover_cards
from dicomnode.serve import LIVE_NODE_KEYS
from dicomnode.serve import Node as RunningConfig

TIMEOUT_KEYS = ("acse_timeout_seconds", "network_timeout_seconds")
# How long after a 1 s timeout the node has closed the connection: the timeout, the
# reactor's tick and a loaded machine's scheduling; far below the 30 s and 60 s defaults,
# and below the 10 s timeouts of the tests' own associations (their abort is not the node's).
CLOSED_WITHIN = 7.0


def _silent_closed_in_time(port: int, count: int = 1) -> None:
    """``count`` connections that send nothing are closed by the node within CLOSED_WITHIN."""
    started = time.monotonic()
    silent = _silent(port, count)
    try:
        wait_for(
            lambda: all(_closed_by_node(c) for c in silent),
            timeout=CLOSED_WITHIN + 6,
            interval=0.05,
            what="the silent connections closed by the node",
        )
        assert time.monotonic() - started < CLOSED_WITHIN
    finally:
        for connection in silent:
            connection.close()


def _idle_aborted_in_time(port: int) -> None:
    """An association that sends nothing once established is aborted by the node within
    CLOSED_WITHIN (the requestor's own timeouts are 10 s: the abort is the node's)."""
    idle = Attempt(port)
    assert idle.established
    started = time.monotonic()
    try:
        wait_for(
            lambda: idle.assoc.is_aborted,
            timeout=CLOSED_WITHIN + 6,
            interval=0.05,
            what="the idle association aborted by the node",
        )
        assert time.monotonic() - started < CLOSED_WITHIN
    finally:
        if idle.assoc.is_established:
            idle.assoc.abort()


@pytest.fixture
def quick_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_scp(
        tmp_path, sessions, {"acse_timeout_seconds": 1, "network_timeout_seconds": 1}
    )


def test_the_listener_ae_has_the_configured_timeouts(quick_node: Node) -> None:
    ae = quick_node.scp.ae
    assert (ae.acse_timeout, ae.network_timeout) == (1, 1)


def test_a_silent_connection_is_closed_at_the_configured_acse_timeout(quick_node: Node) -> None:
    _silent_closed_in_time(quick_node.port)


def test_an_idle_association_is_aborted_at_the_configured_network_timeout(
    quick_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="pynetdicom.association"):
        _idle_aborted_in_time(quick_node.port)
    assert "Network timeout reached" in caplog.text


@pytest.fixture
def default_node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_scp(tmp_path, sessions)


def test_a_reload_applies_the_timeouts(default_node: Node) -> None:
    """To connections accepted after it, and to the idle check of an association already
    established (pynetdicom hands the AE's timeouts to its associations)."""
    established = Attempt(default_node.port)
    assert established.established
    try:
        _reloaded(default_node, acse_timeout_seconds=1.0, network_timeout_seconds=1.0)
        wait_for(
            lambda: established.assoc.is_aborted,
            timeout=CLOSED_WITHIN,
            interval=0.05,
            what="the association established before the reload aborted by the node",
        )
        _silent_closed_in_time(default_node.port)
        _idle_aborted_in_time(default_node.port)
    finally:
        if established.assoc.is_established:
            established.assoc.release()


def test_the_timeouts_are_live_keys_of_a_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert set(TIMEOUT_KEYS) <= LIVE_NODE_KEYS
    config = _config(tmp_path)
    settings = load_settings(config)
    running = RunningConfig(config, settings, discover_cards(settings.model_folders), None)
    keys = "".join(f"{key} = 5.0\n" for key in TIMEOUT_KEYS)
    config.write_text(config.read_text().replace("[node]\n", f"[node]\n{keys}", 1))
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        assert running.reload()
    assert all(getattr(running.settings.node, key) == 5.0 for key in TIMEOUT_KEYS)
    assert "takes effect at the next restart" not in caplog.text


def test_listener_processes_take_the_timeouts_from_the_file_and_a_reload(tmp_path: Path) -> None:
    """Under ``dicomnode serve``: two listener processes, the ACSE timeout from the file at
    start, the network timeout from a SIGHUP reload."""
    running, _ = _two_listener_node(tmp_path, "acse_timeout_seconds = 1.0\n")
    try:
        _silent_closed_in_time(running.port, 2)
        running.config.write_text(
            running.config.read_text().replace(
                "acse_timeout_seconds = 1.0\n",
                "acse_timeout_seconds = 1.0\nnetwork_timeout_seconds = 1.0\n",
            )
        )
        running.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in running.log.read_text(), 30, what="the reload")
        _idle_aborted_in_time(running.port)
        assert "takes effect at the next restart" not in running.log.read_text()
    finally:
        stop_node(running)


@pytest.mark.parametrize("key", TIMEOUT_KEYS)
@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
def test_a_timeout_must_be_a_positive_number_of_seconds(key: str, value: float) -> None:
    with pytest.raises(ValidationError, match=key):
        Settings.model_validate({"node": {key: value}})


def test_the_defaults_are_pynetdicoms() -> None:
    """Unchanged by default: 30 s, 30 s and 60 s, as the listener had before."""
    node = NodeSettings()
    assert [getattr(node, key) for key in TIMEOUT_KEYS] == [30, 60]
