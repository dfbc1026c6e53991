"""The node's long-running processes: ``dicomnode serve``, ``worker`` and the listener
processes serve starts, each ended by ``_leave``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.cli.resources import database_sessions, model_cards, settings_of

log = logging.getLogger("dicomnode")


def _leave(code: int) -> NoReturn:
    """End a long-running command's process once its work is stopped and flushed, without
    the interpreter's teardown of its modules: 0.3-0.5 s of CPU for each of a node's
    processes (serve, listeners, workers) at every stop and restart, which on two cores
    made a stop take 1.3-1.9 s. Log handlers and the standard streams are flushed first;
    the commands register no exit handlers of their own that this skips (a listener's
    spare files are removed by its stop)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.sigint import Terminated, interrupt_start_up

    interrupt_start_up()
    try:
        from dicomnode.serve import run_serve

        code = run_serve(Path(args.config), args.workers)
    except Terminated:
        # A SIGTERM while serve started, before its web server took it as a stop: what had
        # started is stopped by now (run_serve's clean-up); 0, as after a stop.
        code = 0
    except KeyboardInterrupt:
        # A Ctrl-C while serve started, before its web server took SIGINT as a stop: what
        # had started is stopped by now (run_serve's clean-up); no traceback.
        code = 130
    _leave(code)


def cmd_listener(args: argparse.Namespace) -> int:
    from dicomnode.ingest.listeners import run_listener

    _leave(
        run_listener(
            Path(args.config),
            args.index,
            args.slots,
            args.connections,
            args.socket_fd,
            args.index_fd,
        )
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from dicomnode.logs import setup_logging
    from dicomnode.nodestate import StorageMismatch, check_storage
    from dicomnode.worker import Worker

    # A SIGHUP before the handler below is installed must not kill the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Run by itself, a Ctrl-C does what SIGTERM does: it ends the worker at once while it
    # starts (no KeyboardInterrupt traceback), then stops it; unless SIGINT came ignored
    # (a shell script's background job), as it stays.
    stop_on_sigint = (
        args.parent_pid is None and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    )
    if stop_on_sigint:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    elif args.parent_pid is not None:
        from dicomnode.sigint import leave_sigint_to_supervisor

        leave_sigint_to_supervisor()
    settings = settings_of(args)
    setup_logging(settings.log_level, settings.logging.json_lines)
    sessions = database_sessions(settings)
    # Before a job is claimed: a folder that is not the node's storage failed every job.
    # Serve's own workers run serve's configuration: its folder, by construction.
    stand_alone = args.parent_pid is None
    if stand_alone:
        try:
            with sessions() as session:
                check_storage(session, settings.storage_path)
        except StorageMismatch as exc:
            log.error("worker does not start: %s", exc)
            _leave(2)
    worker = Worker(settings, sessions, model_cards(settings), stand_alone=stand_alone)
    # Serve's workers report through the node's /metrics; one run by itself serves its own.
    if args.parent_pid is None:
        metrics_port = settings.worker.metrics_port
        if args.metrics_port is not None:
            metrics_port = args.metrics_port
            worker.restart_only = tuple(
                name for name in worker.restart_only if name != "worker.metrics_port"
            )
        if metrics_port:
            worker.serve_metrics(metrics_port)
    worker.warm_up()
    stop = threading.Event()
    terminated = threading.Event()  # stopped by a SIGTERM

    def on_sigterm(*_: object) -> None:
        terminated.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    if stop_on_sigint:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: worker.reload_requested.set())
    worker.run_forever(
        stop,
        parent_pid=args.parent_pid,
        ready=lambda: log.info("worker %s ready (%s)", worker.owner, RESEARCH_DEMO_NOTICE),
    )
    # Under serve, a SIGTERM is said in the exit status: serve's supervision tells one it
    # did not send (systemd's KillMode=control-group, a kill) from a crash. Run by itself
    # (its own unit), 0: systemd counts only 0 and a death by SIGTERM as a clean stop.
    if args.parent_pid is not None and terminated.is_set():
        from dicomnode.supervision import TERMINATED

        _leave(TERMINATED)
    _leave(0)
