"""``dicomnode serve``: start-up, DICOM listener processes, workers, web server, systemd
notify, SIGHUP reload, shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from dicomnode import RESEARCH_DEMO_NOTICE, sigint
from dicomnode.checkconfig import check_settings, config_warnings
from dicomnode.config import NodeSettings, Settings, load_settings, restart_changes
from dicomnode.models.registry import ModelCard, discover_cards
from dicomnode.pipeline.sessions import WORKERS_ON_HOST
from dicomnode.runfolders import METRICS_PREFIX, RUN_PREFIX, make_run_folder, remove_stale_folders
from dicomnode.supervision import StopEvent, wait_for_exit, wait_to_restart
from dicomnode.systemd import Notifier, run_watchdog
from dicomnode.tomlfile import ConfigError

if TYPE_CHECKING:
    import uvicorn

    from dicomnode.ingest.assembly import ReadyTimes
    from dicomnode.ingest.indexer import IndexService
    from dicomnode.ingest.listeners import ListenerPool

log = logging.getLogger("dicomnode")

# The assembly check runs when a study's quiet period ends (the supervisor's index writer
# says when), and at least this often for rows written by other processes.
ASSEMBLY_PERIOD_SECONDS = 1.0
# While the check fails (the database down, its disk full): retried after a period, doubling
# up to this (sooner when the index writer reports a quiet period, i.e. the database is
# back); one line when the failures start, a reminder at most this often, one when they end
# (a traceback a second made 3,000 lines of log in 30 s of a database outage).
ASSEMBLY_RETRY_LAST_SECONDS = 5.0
ASSEMBLY_REMINDER_SECONDS = 60.0
# How long serve's stop waits for its workers (told to stop as its listeners are) before it
# kills them; the listeners get as long (listeners.STOP_TIMEOUT). systemd/dicomnode.service's
# TimeoutStopSec leaves room for both and the web server's stop.
WORKER_STOP_SECONDS = 10.0

# [node] settings the listeners read per association or instance: a reload applies them.
LIVE_NODE_KEYS = frozenset(
    {
        "require_known_peers",
        "require_called_ae",
        "max_instance_bytes",
        "max_associations_per_address",
        # Onto the listener's AE, read as each connection is accepted (scp.apply_timeouts).
        "acse_timeout_seconds",
        "network_timeout_seconds",
    }
)
# Changed only by a restart: the listener's socket, AE and processes (every other [node] key,
# a new one included), the web server, the database, storage and the processes' logging,
# which each sets up once (a reload logs which of them changed).
RESTART_ONLY = (
    *(f"node.{key}" for key in NodeSettings.model_fields if key not in LIVE_NODE_KEYS),
    "web",
    "database",
    "storage.path",
    "worker.count",
    "worker.threads",
    "log_level",
    "logging",
)


def web_server_config(app: object, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for the web page and API: ``[web]`` host and port, and the proxies
    whose forwarded client address and scheme are believed."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.web.host,
        port=settings.web.port,
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips=settings.web.trusted_proxies,
    )


def web_sockets(host: str, port: int) -> list[socket.socket]:
    """The ``[web]`` host and port bound and listening (OSError when taken or not this
    host's), for :func:`run_web` to hand to uvicorn: serve binds them before it starts any
    process, so that a port that is taken is one line and status 1, as a taken DICOM port is
    (uvicorn binding it logged its own error line once the listeners and workers had started,
    and exited with its status 3).

    One socket per address the host resolves to, as uvicorn's own binding (asyncio's
    ``create_server``) made them: "localhost" is 127.0.0.1 and ::1, an empty host every
    address of both families; IPv6 sockets are IPv6 only."""
    addresses = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    bound: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((a[0], a[4]) for a in addresses):
            server = socket.socket(family, socket.SOCK_STREAM)
            bound.append(server)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            server.bind(address)
            server.listen(2048)  # uvicorn's default backlog
    except OSError:
        for server in bound:
            server.close()
        raise
    return bound


def _bind_reason(exc: OSError) -> str:
    """Why an address could not be bound, without the "(while attempting to bind on address
    ...)" of socket.create_server: the line that says it names the address already."""
    return (exc.strerror or str(exc)).split(" (while attempting to bind", 1)[0]


def metrics_dir() -> str | None:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` for this process and its workers (before any metric
    is made); returns the temporary folder to remove at exit, or None when one was given."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    folder = str(make_run_folder(METRICS_PREFIX))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


class Node:
    """The running node's configuration; a reload swaps it whole or not at all."""

    def __init__(
        self,
        config: Path,
        settings: Settings,
        cards: list[ModelCard],
        scp,
        workers: list[subprocess.Popen] | None = None,
        listeners=None,
        sessions: sessionmaker[Session] | None = None,
    ):
        """``scp``: an in-process listener (or None); ``listeners``: a
        :class:`~dicomnode.ingest.listeners.ListenerPool` (or None); ``sessions``: the
        database where a reload publishes the cards (:mod:`dicomnode.nodestate`), or None."""
        self.config = config
        self.settings = settings
        # What the listeners, the web server and the database run: a reload does not change
        # the restart-only keys (RESTART_ONLY) of it, so reloads compare against these.
        self.running = settings
        self.cards = cards
        self.scp = scp
        self.workers = workers if workers is not None else []
        self.listeners = listeners
        self.sessions = sessions
        # Set once every DICOM listener listens (at once for an in-process listener):
        # serve starts the web server and the workers while its listeners start.
        self.started = threading.Event()
        self.failed = False  # a listener did not start
        if listeners is None:
            self.started.set()
        self._lock = threading.Lock()

    def current(self) -> tuple[Settings, list[ModelCard]]:
        return self.settings, self.cards

    def listening(self) -> bool:
        """True once every DICOM listener has started, while each runs."""
        if self.listeners is not None:
            return self.started.is_set() and self.listeners.healthy()
        return getattr(self.scp, "_server", True) is not None

    def reload(self, notifier: Notifier | None = None) -> bool:
        """Re-read the configuration and model cards; keep the old ones if anything is wrong."""
        from dicomnode.checkconfig import load_checked

        # A SIGHUP during start-up is applied once the listeners listen (they read their
        # reload lines from the pipe their "ready" comes on).
        self.started.wait()
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
            pending, undone = restart_changes(self.running, self.settings, settings, RESTART_ONLY)
            for name in pending:
                log.warning("reload: [%s] changed; it takes effect at the next restart", name)
            for name in undone:
                log.info("reload: [%s] is back to the running value; no restart pending", name)
            # One assignment each: an association reads either the old or the new settings.
            self.cards = cards
            self.settings = settings
            if self.scp is not None:
                self.scp.settings = settings
            if self.listeners is not None and not self.listeners.reload(settings):
                log.error("reload: a DICOM listener did not confirm the new configuration")
            # Before the workers reload: each compares its new cards with these.
            self._publish_cards(cards)
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

    def _publish_cards(self, cards: list[ModelCard]) -> None:
        """The cards every worker must run now; a database that is down is logged (the
        workers keep comparing with the cards published before)."""
        from dicomnode.nodestate import publish_cards
        from dicomnode.outage import database_reason, database_unavailable

        if self.sessions is None:
            return
        try:
            with self.sessions() as session:
                publish_cards(session, cards)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            log.error(
                "reload: the model cards were not published (database unavailable: %s); "
                "workers on other hosts compare theirs with the previous ones until the "
                "next reload",
                database_reason(exc),
            )


def _announce(
    server, node: Node, start: Callable[[], None], notifier: Notifier, stop: threading.Event
) -> None:
    """``start`` the listening (while the web server starts), then READY=1 once both have,
    then watchdog pings until ``stop``. A listener that does not start is logged and stops
    the web server (serve then exits with status 1)."""
    try:
        start()
    except RuntimeError as exc:
        if stop.is_set():
            return  # stopped (SIGTERM, Ctrl-C) while the listeners started: no failure
        log.error("%s", exc)
        node.failed = True
        server.should_exit = True
        return
    node.started.set()
    while not server.started:
        if stop.wait(0.05) or server.should_exit:
            return
    notifier.notify("READY=1\nSTATUS=listening")
    log.info("node ready")
    run_watchdog(notifier, stop, healthy=lambda: node.listening() and not server.should_exit)


def run_web(
    node: Node,
    sessions: sessionmaker[Session],
    stop: threading.Event,
    start: Callable[[], None] = lambda: None,
    listening: list[socket.socket] | None = None,
) -> None:
    """Serve the web app in this (main) thread until SIGINT/SIGTERM; SIGHUP reloads.
    ``start`` (the listeners' start-up) runs in a thread meanwhile; READY=1 follows it.
    ``listening``: the ``[web]`` port already bound (:func:`web_sockets`; closed when the
    server stops), else uvicorn binds it."""
    from dicomnode.retention import cleaner_loop
    from dicomnode.web.app import create_app
    from dicomnode.web.health import health_router
    from dicomnode.web.server import WebServer

    notifier = Notifier()
    settings = node.settings
    app = create_app(sessions, lambda: node.settings.worklist)
    app.include_router(health_router(sessions, node.current, node.listening))
    server = WebServer(web_server_config(app, settings))
    # uvicorn captures only SIGINT and SIGTERM; the reload runs off the signal handler.
    signal.signal(
        signal.SIGHUP,
        lambda *_: threading.Thread(
            target=node.reload, args=(notifier,), name="reload", daemon=True
        ).start(),
    )
    threading.Thread(
        target=_announce,
        args=(server, node, start, notifier, stop),
        name="notify",
        daemon=True,
    ).start()
    threading.Thread(
        target=cleaner_loop,
        args=(sessions, lambda: node.settings, stop),
        name="retention",
        daemon=True,
    ).start()
    # uvicorn takes SIGTERM and SIGINT once its event loop runs, and re-raises the one it
    # caught after it has shut down, with the handler found before it started: this one,
    # so that the caller's clean-up runs, and so that one that comes before uvicorn takes
    # them (a Ctrl-C while it starts; a no-op handler lost it) stops the server too.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: setattr(server, "should_exit", True))
    if sigint.requested.is_set():  # a Ctrl-C or SIGTERM whose exception Python dropped
        server.should_exit = True
    try:
        server.run(sockets=listening)
    finally:
        notifier.notify("STOPPING=1")
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def remove_metrics_dir(folder: str | None) -> None:
    """Remove the folder :func:`metrics_dir` made (after the workers have stopped)."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def recover(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """Before listening: index spool files a crash left without rows, drop partial files."""
    from dicomnode.ingest.incoming import clear_incoming
    from dicomnode.ingest.recover import recover_spool

    partial = clear_incoming(settings.storage_path)
    with sessions() as session:
        found = recover_spool(
            session, settings.storage_path, settings.assembly.quiet_seconds, settings.worklist
        )
    if found.relocated or found.results_relocated:
        log.warning(
            "storage: %d instance file(s) and %d result file(s) found under %s at other paths "
            "than their rows named, whose files are gone (the storage folder moved or was "
            "restored elsewhere): the rows now name the files found",
            found.relocated,
            found.results_relocated,
            settings.storage_path,
        )
    if found.elsewhere:
        log.warning(
            "storage: %d instance or result row(s) name files outside %s (not found here: "
            "a copy of the storage left them out); keep the folder they name",
            found.elsewhere,
            settings.storage_path,
        )
    if found.indexed or found.temporary_removed or found.unreadable or partial:
        log.warning(
            "spool recovery: %d orphan instance(s) indexed, %d temporary file(s) removed, "
            "%d unreadable, %d partial receive(s) removed",
            found.indexed,
            found.temporary_removed + partial,
            found.unreadable,
            partial,
        )


def assembly_loop(
    sessions: sessionmaker[Session], stop: threading.Event, ready: ReadyTimes, period: float
) -> None:
    """Queue an analysis for every study whose quiet period is over: when the earliest
    waiting study's quiet period ends, or one that this process's index writer reports
    (``ready``) ends sooner, and at least every ``period`` s (rows written elsewhere)."""
    from dicomnode.db.session import utcnow
    from dicomnode.ingest.assembly import next_ready_at, queue_ready_studies
    from dicomnode.outage import OutageLog, database_reason, database_unavailable, disk_full

    unavailable = OutageLog(log, remind_seconds=ASSEMBLY_REMINDER_SECONDS)
    failing = OutageLog(log, logging.ERROR, remind_seconds=ASSEMBLY_REMINDER_SECONDS)
    retry = 0.0
    while not stop.is_set():
        # What the writer reports from now on may not be in the check's reads below.
        ready.clear()
        until = utcnow() + timedelta(seconds=period)
        try:
            with sessions() as session:
                for study_id in queue_ready_studies(session, utcnow()):
                    log.info("study_id=%d assembled; analysis queued", study_id)
                due = next_ready_at(session)
                session.commit()
        except Exception as exc:
            retry = min(ASSEMBLY_RETRY_LAST_SECONDS, retry * 2 or period)
            if database_unavailable(exc) or disk_full(exc):
                unavailable.failed(
                    "assembly check: database unavailable: %s; studies are queued for analysis "
                    "once it is back",
                    database_reason(exc),
                )
            else:
                failing.failed("assembly check failed; retrying", exc_info=exc)
            ready.wait(utcnow() + timedelta(seconds=retry), retry)
            continue
        retry = 0.0
        unavailable.ended("assembly check: database available again after %(seconds).0f s")
        failing.ended("assembly check works again after %(seconds).0f s")
        if due is not None:
            until = min(until, max(due, utcnow() + timedelta(seconds=0.005)))
        ready.wait(until, period)


class WorkerPool:
    """Worker processes started by ``serve``; one that dies is restarted with backoff."""

    def __init__(self, config: Path, count: int):
        self.command = [
            sys.executable,
            "-m",
            "dicomnode",
            "worker",
            "--config",
            str(config),
            "--parent-pid",
            str(os.getpid()),
        ]
        # Each worker sizes its CPU runs by its share of the host's cores.
        self.environment = {**os.environ, WORKERS_ON_HOST: str(max(1, count))}
        self.restarts = [0] * count
        # An exception meanwhile (a SIGTERM or Ctrl-C included: sigint) stops those started
        # so far: the caller never gets the pool to stop them with.
        self.processes: list[subprocess.Popen] = []
        try:
            for _ in range(count):
                with sigint.held():
                    self.processes.append(self._start())
        except BaseException:
            self.stop()
            raise

    def _start(self) -> subprocess.Popen:
        return sigint.start_child(self.command, env=self.environment)

    def supervise(self, stop: threading.Event) -> None:
        """Restart workers that exit until ``stop`` (a
        :class:`~dicomnode.supervision.StopEvent`: woken by it, not looking every second)."""
        while not wait_for_exit(self.processes, stop):
            for index, process in enumerate(self.processes):
                code = process.poll()
                if code is None or stop.is_set():
                    continue
                self.restarts[index] += 1
                delay = min(60.0, 2.0 ** min(self.restarts[index], 6))
                if wait_to_restart(log, f"worker {index}", code, delay, stop):
                    return
                self.processes[index] = self._start()

    def terminate(self) -> None:
        """SIGTERM every worker (they finish their jobs' current step and exit)."""
        for process in self.processes:
            with contextlib.suppress(OSError):
                process.terminate()

    def stop(self) -> None:
        """SIGTERM every worker and wait for it, SIGKILL to those left after 10 s (all
        together: systemd's TimeoutStopSec counts on it)."""
        self.terminate()
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def run_serve(config: Path, workers: int | None = None) -> int:
    """Run the node until SIGTERM/SIGINT: listeners, assembly, workers, web; 0 when stopped."""
    # Children inherit "ignore SIGHUP" until they install their own reload handling.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Before anything makes a Prometheus metric: listeners and workers inherit the folder.
    # Removed on every way out (a refused configuration or database included): under
    # systemd's Restart=on-failure a failing start would leave one each time.
    metrics_folder = metrics_dir()
    try:
        return _serve(config, workers)
    finally:
        remove_metrics_dir(metrics_folder)


def _refuse(problems: list[ConfigError]) -> int:
    """Each problem of the configuration, as check-config prints it; serve's exit status."""
    for problem in problems:
        print(f"configuration error: {problem}", file=sys.stderr)
    return 2


def _serve(config: Path, workers: int | None) -> int:
    from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
    from dicomnode.ingest.assembly import ReadyTimes
    from dicomnode.ingest.indexer import IndexService, ingest_sessions
    from dicomnode.ingest.listeners import ListenerPool
    from dicomnode.logs import setup_logging
    from dicomnode.nodestate import publish_serve_facts

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        return _refuse(exc.problems)
    # What check-config refuses in the settings stops the node here with the same message,
    # not with a listener's traceback later (model cards: the worker logs what it cannot use).
    problems = check_settings(settings)
    if problems:
        return _refuse(problems)
    setup_logging(settings.log_level, settings.logging.json_lines)
    # What has started, stopped in this order on every way out from here: a SIGTERM or
    # Ctrl-C at any point of the start-up (sigint) included, and to its end (a further one
    # meanwhile is only recorded); "stopped" unless the start failed: the failure reports
    # itself (a database refused, a DICOM port taken: one line).
    stop = StopEvent()
    failed = False
    run_dir: Path | None = None
    index: IndexService | None = None
    listeners: ListenerPool | None = None
    pool: WorkerPool | None = None
    node: Node | None = None
    web: list[socket.socket] = []
    try:
        for warning in config_warnings(settings):
            log.warning("%s", warning)
        cards = discover_cards(settings.model_folders)
        upgrade(settings.database_url)
        sessions = make_sessionmaker(make_engine(settings.database_url))
        # Only the cards are read here: the workers load each model file and name any that
        # cannot be loaded in an ERROR, so this line must not read as if every model loaded.
        log.info(
            "%d model card(s), each model loaded by the workers: %s (%s)",
            len(cards),
            ", ".join(f"{c.model.name} {c.model.version}" for c in cards),
            RESEARCH_DEMO_NOTICE,
        )
        # Before any worker starts: each checks its storage folder and cards against these.
        with sessions() as session:
            publish_serve_facts(session, settings.storage_path, cards)
        recover(settings, sessions)
        stale = remove_stale_folders()
        if stale:
            log.info(
                "removed %d temporary folder(s) of serve processes that are gone: %s",
                len(stale),
                ", ".join(map(str, stale)),
            )
        run_dir = make_run_folder(RUN_PREFIX)
        # The listeners' index rows; it reads the settings of ``node`` once that exists.
        running: dict[str, Node] = {}
        index_sessions = ingest_sessions(settings.database_url)
        # When a study's quiet period ends, from the rows as the index writer writes them.
        ready = ReadyTimes()
        index = IndexService(
            lambda: index_sessions,
            lambda: running["node"].settings if "node" in running else settings,
            on_ready=ready.written,
        )
        # Before any process starts: a taken port stops nothing (web_sockets).
        try:
            web = web_sockets(settings.web.host, settings.web.port)
        except OSError as exc:
            log.error(
                "cannot serve the web page on %s:%d: %s",
                settings.web.host,
                settings.web.port,
                _bind_reason(exc),
            )
            failed = True
            return 1
        try:
            listeners = ListenerPool(config, settings.node.listeners, run_dir, settings.node, index)
        except OSError as exc:
            log.error(
                "cannot listen for DICOM on %s:%d: %s",
                settings.node.host,
                settings.node.port,
                _bind_reason(exc),
            )
            failed = True
            return 1

        def start_listening() -> None:
            # The listener processes import and start while the workers and the web server
            # do (on two cores that was 1-2 s of a start-up spent waiting for them first).
            listeners.wait_ready()
            threading.Thread(
                target=listeners.supervise, args=(stop,), name="listeners", daemon=True
            ).start()
            threading.Thread(
                target=assembly_loop,
                args=(sessions, stop, ready, ASSEMBLY_PERIOD_SECONDS),
                name="assembly",
                daemon=True,
            ).start()

        pool = WorkerPool(config, settings.worker.count if workers is None else workers)
        threading.Thread(target=pool.supervise, args=(stop,), name="workers", daemon=True).start()
        log.info("worklist page on http://%s:%d/worklist", settings.web.host, settings.web.port)
        node = Node(config, settings, cards, None, pool.processes, listeners, sessions)
        running["node"] = node
        run_web(node, sessions, stop, start_listening, web)
    except Exception:
        failed = True
        raise
    finally:
        sigint.stopping()
        stop.set()
        if pool is not None:
            pool.terminate()  # the workers stop while the listeners do
        if listeners is not None:
            listeners.stop()
        if index is not None:
            index.close()
        if pool is not None:
            pool.stop()
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        for listening in web:
            listening.close()  # uvicorn closes them when it ran; not when the start stopped first
        if not failed:
            log.info("stopped")
    return 1 if node is not None and node.failed else 0
