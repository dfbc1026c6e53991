"""The serving side of ``dicomnode serve``: web server, systemd notify, SIGHUP reload."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.models.registry import ModelCard
from dicomnode.systemd import Notifier, run_watchdog
from dicomnode.tomlfile import ConfigError

log = logging.getLogger("dicomnode")

# Changed only by a restart: the listener, the web server, the database and storage.
RESTART_ONLY = ("node", "web", "database", "storage.path", "worker.count")


def metrics_dir() -> str | None:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` for this process and its workers (before any metric
    is made); returns the temporary folder to remove at exit, or None when one was given."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    folder = tempfile.mkdtemp(prefix="dicomnode-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


def _restart_only_changes(old: Settings, new: Settings) -> list[str]:
    changed = []
    for name in RESTART_ONLY:
        section, _, key = name.partition(".")
        before, after = getattr(old, section), getattr(new, section)
        if key:
            before, after = getattr(before, key), getattr(after, key)
        if before != after:
            changed.append(name)
    return changed


class Node:
    """The running node's configuration; a reload swaps it whole or not at all."""

    def __init__(
        self,
        config: Path,
        settings: Settings,
        cards: list[ModelCard],
        scp,
        workers: list[subprocess.Popen] | None = None,
    ):
        self.config = config
        self.settings = settings
        self.cards = cards
        self.scp = scp
        self.workers = workers if workers is not None else []
        self._lock = threading.Lock()

    def current(self) -> tuple[Settings, list[ModelCard]]:
        return self.settings, self.cards

    def reload(self, notifier: Notifier | None = None) -> bool:
        """Re-read the configuration and model cards; keep the old ones if anything is wrong."""
        from dicomnode.checkconfig import load_checked

        with self._lock:
            if notifier:
                notifier.reloading()
            try:
                settings, cards = load_checked(self.config)
            except ConfigError as exc:
                log.error("reload refused, the running configuration is kept: %s", exc)
                if notifier:
                    notifier.notify("READY=1\nSTATUS=reload refused; see the log")
                return False
            for name in _restart_only_changes(self.settings, settings):
                log.warning("reload: [%s] changed; it takes effect at the next restart", name)
            # One assignment each: an association reads either the old or the new settings.
            self.cards = cards
            self.settings = settings
            if self.scp is not None:
                self.scp.settings = settings
            for process in self.workers:
                if process.poll() is None:
                    process.send_signal(signal.SIGHUP)
            log.info(
                "configuration reloaded: %d peer(s), %d destination(s), %d model card(s)",
                len(settings.peers),
                len(settings.destinations),
                len(cards),
            )
            if notifier:
                notifier.notify("READY=1\nSTATUS=configuration reloaded")
            return True


def _announce(server, scp_ready, notifier: Notifier, stop: threading.Event) -> None:
    """READY=1 once the web server has started, then watchdog pings until ``stop``."""
    while not server.started:
        if stop.wait(0.05) or server.should_exit:
            return
    notifier.notify("READY=1\nSTATUS=listening")
    log.info("node ready")
    run_watchdog(notifier, stop, healthy=lambda: scp_ready() and not server.should_exit)


def run_web(
    node: Node,
    sessions: sessionmaker[Session],
    stop: threading.Event,
) -> None:
    """Serve the web app in this (main) thread until SIGINT/SIGTERM; SIGHUP reloads."""
    import uvicorn

    from dicomnode.retention import cleaner_loop
    from dicomnode.web.app import create_app
    from dicomnode.web.health import health_router

    notifier = Notifier()
    settings = node.settings
    app = create_app(sessions)
    app.include_router(health_router(sessions, node.current))
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.web.host, port=settings.web.port, log_level="warning")
    )
    # uvicorn captures only SIGINT and SIGTERM; the reload runs off the signal handler.
    signal.signal(
        signal.SIGHUP,
        lambda *_: threading.Thread(
            target=node.reload, args=(notifier,), name="reload", daemon=True
        ).start(),
    )
    threading.Thread(
        target=_announce,
        args=(server, lambda: getattr(node.scp, "_server", True) is not None, notifier, stop),
        name="notify",
        daemon=True,
    ).start()
    threading.Thread(
        target=cleaner_loop,
        args=(sessions, lambda: node.settings, stop),
        name="retention",
        daemon=True,
    ).start()
    # uvicorn re-raises the SIGTERM/SIGINT it caught once it has shut down, with the handler
    # found before it started: make that a no-op so that the caller's clean-up runs.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: None)
    try:
        server.run()
    finally:
        notifier.notify("STOPPING=1")
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def remove_metrics_dir(folder: str | None) -> None:
    """Remove the folder :func:`metrics_dir` made (after the workers have stopped)."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
