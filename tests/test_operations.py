"""A running node as admins see it: systemd notify, SIGHUP reload, /readyz, /metrics, logs."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import dcmtk, launch_node, start_serve, wait_for, worker_config, write_config
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode import sigint
from dicomnode.synth.cxr import make_cxr

PATIENT_NAME = "Zyxwvuts^Quirinella"
PATIENT_ID = "PID-73914452"
BIRTH_DATE = "19470312"


def _stop(process: subprocess.Popen) -> int:
    process.terminate()
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _echo(port: int, calling_ae: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling_ae, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _sqlite(folder: Path) -> str:
    return f"sqlite:///{folder / 'dicomnode.db'}"


# systemd (the unit files themselves: tests/test_systemd_units.py) ----------------------


def test_ready_watchdog_reload_and_stopping_reach_notify_socket(tmp_path: Path) -> None:
    config, port, web_port = write_config(tmp_path, _sqlite(tmp_path))
    address = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(60)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
    process, log = launch_node(tmp_path, config, port, web_port, env)
    messages: list[str] = []

    def until(state: str) -> None:
        while not any(state in m.split("\n") for m in messages):
            messages.append(receiver.recv(4096).decode())

    try:
        until("READY=1")
        until("WATCHDOG=1")
        # Ready means the listener answers.
        assert _echo(port, "MODALITY").returncode == 0
        process.send_signal(signal.SIGHUP)
        until("RELOADING=1")
        messages.clear()
        until("READY=1")
    finally:
        code = _stop(process)
    until("STOPPING=1")
    receiver.close()
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text()


# Stop (Ctrl-C in a terminal) -----------------------------------------------------------


def _ctrl_c(process: subprocess.Popen) -> tuple[int, bool]:
    """What a terminal's Ctrl-C does: SIGINT to every process of ``process``'s group. Its
    exit status, and whether any process of the group outlived it."""
    group = os.getpgid(process.pid)
    return _signalled(process, lambda: os.killpg(group, signal.SIGINT))


def _signalled(process: subprocess.Popen, send: Callable[[], None]) -> tuple[int, bool]:
    """``send`` a signal; ``process``'s exit status, and whether any process of its group
    (it leads one) outlived it. Kills what is left."""
    group = os.getpgid(process.pid)
    send()
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    try:
        os.killpg(group, 0)
        left = True
    except ProcessLookupError:
        left = False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait()
    return code, left


def test_ctrl_c_stops_serve_its_listeners_and_worker_once_without_a_traceback(
    tmp_path: Path,
) -> None:
    # Two listener processes and a worker: each used to get the terminal's SIGINT too, the
    # worker printed a KeyboardInterrupt traceback, and a listener that stopped on it before
    # serve knew it was stopping was reported as a crash (and restarted).
    config, port, web_port = write_config(tmp_path, _sqlite(tmp_path), listeners=2)
    process, log = launch_node(tmp_path, config, port, web_port, new_session=True)
    try:
        wait_for(lambda: re.search(r"worker \S+ ready", log.read_text()), 60, what="worker")
    finally:
        code, left = _ctrl_c(process)
    output = log.read_text()
    assert code == 0, output
    _serve_stopped_cleanly(output, left)


def test_sigterm_to_serves_process_group_stops_it_without_an_error(tmp_path: Path) -> None:
    # What systemd's default KillMode=control-group does at a stop or restart: SIGTERM to
    # every process of the unit at once. A listener or worker stopped on its own SIGTERM
    # before serve's stop began, and serve logged it as a crash ("ERROR dicomnode.ingest:
    # DICOM listener 0 exited with status 0; restarting in 2 s"), an alert on every restart.
    config, port, web_port = write_config(tmp_path, _sqlite(tmp_path), listeners=2)
    process, log = launch_node(tmp_path, config, port, web_port, new_session=True)
    try:
        wait_for(lambda: re.search(r"worker \S+ ready", log.read_text()), 60, what="worker")
    finally:
        group = os.getpgid(process.pid)
        code, left = _signalled(process, lambda: os.killpg(group, signal.SIGTERM))
    output = log.read_text()
    assert code == 0, output
    _serve_stopped_cleanly(output, left)
    assert "exited with status" not in output, output


def test_ctrl_c_while_serve_starts_stops_it_and_what_it_started(tmp_path: Path) -> None:
    # Once serve has started its listener and worker processes, while they and its web
    # server start: serve raised KeyboardInterrupt with a traceback (or, in uvicorn's start,
    # lost the Ctrl-C and ran on), and its children each printed theirs.
    config, _, _ = write_config(tmp_path, _sqlite(tmp_path), listeners=2)
    process, log = start_serve(tmp_path, config, new_session=True)
    try:
        wait_for(
            lambda: "worklist page on" in log.read_text() or process.poll() is not None,
            60,
            interval=0.02,
            what="serve starting its processes",
        )
    finally:
        code, left = _ctrl_c(process)
    output = log.read_text()
    assert code in (0, 130), output  # 130: stopped before its web server ran
    _serve_stopped_cleanly(output, left)


def _takes_sigterm(process: subprocess.Popen) -> bool:
    """Whether ``process`` has a handler for SIGTERM (Linux: /proc's SigCgt), or has ended."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return True
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return (
        bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1) or process.poll() is not None
    )


@pytest.mark.parametrize(
    "moment",
    [
        # As soon as serve can take SIGTERM at all (before, the interpreter's default ends it
        # and nothing of it has started): while it imports and reads its configuration.
        pytest.param(_takes_sigterm, id="first-handler"),
        pytest.param(lambda log: log.read_text().strip(), id="first-log-line"),
        pytest.param(lambda log: "worklist page on" in log.read_text(), id="processes-started"),
        pytest.param(lambda log: "listening for DICOM" in log.read_text(), id="listener-up"),
    ],
)
def test_sigterm_while_serve_starts_stops_it_and_what_it_started(
    tmp_path: Path, moment: Callable
) -> None:
    # Before its web server took SIGTERM (~1-2 s into a start), a SIGTERM (systemctl
    # restart right after a start) ended serve with the default action: status -15, nothing
    # logged, and its listeners and worker left to the parent-death signal or their own
    # check of their parent.
    config, _, _ = write_config(tmp_path, _sqlite(tmp_path), listeners=2)
    process, log = start_serve(tmp_path, config, new_session=True)
    argument = process if moment is _takes_sigterm else log
    try:
        wait_for(
            lambda: moment(argument) or process.poll() is not None,
            60,
            interval=0.02,
            what="the moment to send SIGTERM",
        )
    finally:
        code, left = _signalled(process, process.terminate)
    output = log.read_text()
    assert code == 0, output
    _stopped_without_traceback(output, left)
    assert " ERROR " not in output, output
    if moment is not _takes_sigterm:  # logging is set up
        assert output.count("INFO dicomnode: stopped") == 1, output


def _stat(pid: int) -> list[str]:
    """/proc's stat of ``pid`` after its name: state, ppid, pgrp, ... (empty when gone)."""
    try:
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def _group_members(group: int) -> set[int]:
    """The live processes of process group ``group``, but its leader."""
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != group:
            fields = _stat(int(entry.name))
            if fields and int(fields[2]) == group and fields[0] != "Z":
                members.add(int(entry.name))
    return members


def _ctrl_c_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)


def _interrupted_start(
    folder: Path, interrupt: Callable[[subprocess.Popen, set[int]], None]
) -> tuple[int | None, set[int], str, list[Path]]:
    """Serve started in ``folder`` (in a process group of its own, as from a terminal),
    ``interrupt``-ed once it has started its two listeners and its worker (given their pids)
    and before its web server runs. Its exit status (None: still running after 30 s), the
    processes of its group it left, its log, and what it left in its temporary folder."""
    config, _, _ = write_config(folder, _sqlite(folder), listeners=2)
    temporary = folder / "tmp"
    temporary.mkdir()
    env = {"TMPDIR": str(temporary), "PROMETHEUS_MULTIPROC_DIR": ""}  # serve makes its own
    process, log = start_serve(folder, config, env, new_session=True)
    group = process.pid
    try:
        wait_for(
            lambda: "worklist page on" in log.read_text() or process.poll() is not None,
            60,
            interval=0.005,
            what="serve starting its processes",
        )
        assert process.poll() is None, log.read_text()
        started = _group_members(group)
        assert len(started) == 3, started  # two listeners, a worker
        interrupt(process, started)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        code = process.poll()
        left = _group_members(group)  # serve waits for each process it stops
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait()
    return code, left, log.read_text(), list(temporary.glob("dicomnode-*"))


@pytest.mark.parametrize(
    ("first", "again", "status"),
    [
        pytest.param(subprocess.Popen.terminate, subprocess.Popen.terminate, 0, id="term-term"),
        pytest.param(subprocess.Popen.terminate, _ctrl_c_group, 0, id="term-ctrl-c"),
        pytest.param(_ctrl_c_group, _ctrl_c_group, 130, id="ctrl-c-ctrl-c"),
        pytest.param(_ctrl_c_group, subprocess.Popen.terminate, 130, id="ctrl-c-term"),
    ],
)
def test_signals_while_serve_stops_an_interrupted_start_let_the_stop_end(
    tmp_path: Path, first: Callable, again: Callable, status: int
) -> None:
    # Ctrl-C pressed again, or `systemctl stop` after a Ctrl-C, while serve stopped what an
    # interrupted start-up had started: the start-up's handler raised again inside that
    # stop, which ended there (no "stopped", its run folder left in the temporary folder, a
    # traceback, or the listeners and worker left to their own checks of their parent).
    def interrupt(process: subprocess.Popen, started: set[int]) -> None:
        first(process)
        # Serve's stop has begun once one of its processes has ended: from then on the
        # second signal, again and again until serve has exited.
        wait_for(
            lambda: (
                any(_stat(pid)[:1] in ([], ["Z"]) for pid in started) or process.poll() is not None
            ),
            30,
            interval=0.0005,
            what="serve stopping its processes",
        )
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            again(process)
            time.sleep(0.0005)

    code, left, output, leftovers = _interrupted_start(tmp_path, interrupt)
    assert code == status, output  # the first signal's
    assert not left, (left, output)
    _serve_stopped_cleanly(output, False)
    assert leftovers == [], output


def test_sigterm_and_ctrl_c_together_while_serve_starts_stop_it_once(tmp_path: Path) -> None:
    # Both before serve's handler ran: it ran for the one (SIGINT, the lower number, first),
    # and for the other right after, as the first one's exception left the start-up or at
    # the top of the stop; that raised again and cut the stop short (in about one run of
    # four). Four runs.
    def interrupt(process: subprocess.Popen, started: set[int]) -> None:
        process.terminate()
        _ctrl_c_group(process)

    for run in range(4):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        code, left, output, leftovers = _interrupted_start(folder, interrupt)
        assert code in (0, 130), output  # which came first, serve cannot tell
        assert not left, (left, output)
        _serve_stopped_cleanly(output, False)
        assert leftovers == [], output


@contextlib.contextmanager
def _start_up_handlers() -> Iterator[None]:
    """Serve's start-up handling of SIGTERM and Ctrl-C in this (the main) thread; this
    process's own put back after."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    sigint.interrupt_start_up()
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
        sys.unraisablehook = hook
        sigint.requested.clear()


def _sigterm_after_second(start_child: Callable, started: list) -> Callable:
    """``start_child`` that SIGTERMs this process once its second child has started, before
    handing it back: as a SIGTERM that comes inside ``subprocess.Popen`` after the fork."""

    def start(command: list[str], **options) -> subprocess.Popen:
        process = start_child(command, **options)
        started.append(process)
        if len(started) == 2:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        return process

    return start


def _worker_pool(folder: Path, monkeypatch: pytest.MonkeyPatch, started: list) -> None:
    from dicomnode.serve import WorkerPool

    config = worker_config(folder, _sqlite(folder), "threads = 1\n")
    monkeypatch.setattr(sigint, "start_child", _sigterm_after_second(sigint.start_child, started))
    WorkerPool(config, 3)


def _listener_pool(folder: Path, monkeypatch: pytest.MonkeyPatch, started: list) -> None:
    from dicomnode.config import load_settings
    from dicomnode.db.session import upgrade
    from dicomnode.ingest import listeners
    from dicomnode.ingest.indexer import IndexService, ingest_sessions

    config, _, _ = write_config(folder, _sqlite(folder), listeners=3)
    settings = load_settings(config)
    upgrade(settings.database_url)
    sessions = ingest_sessions(settings.database_url)
    index = IndexService(lambda: sessions, lambda: settings)
    monkeypatch.setattr(
        listeners, "start_child", _sigterm_after_second(listeners.start_child, started)
    )
    try:
        listeners.ListenerPool(config, 3, folder, settings.node, index)
    finally:
        index.close()


@pytest.mark.parametrize("pool", [_worker_pool, _listener_pool], ids=["workers", "listeners"])
def test_sigterm_while_a_pool_starts_its_processes_stops_those_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: Callable
) -> None:
    # A SIGTERM while serve's worker or listener pool started its processes left the pool
    # unassigned, so serve's stop did not know those started so far: they were left to
    # their own checks of their parent (here, this process: alive, so they ran on). One
    # that came inside subprocess.Popen, after the fork, lost that child even to the pool.
    started: list[subprocess.Popen] = []
    try:
        with _start_up_handlers(), pytest.raises(sigint.Terminated):
            pool(tmp_path, monkeypatch, started)
        assert len(started) == 2  # the third was not started
        assert None not in [process.returncode for process in started], "not stopped"
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_sigterm_held_in_a_block_that_then_fails_is_what_is_raised() -> None:
    # A SIGTERM held while a pool started a child, whose start then failed (an OSError), was
    # lost to the error: serve reported a failed start and exit 1 for an admin's stop.
    with _start_up_handlers(), pytest.raises(sigint.Terminated) as raised, sigint.held():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        raise OSError("the child could not be started")
    assert isinstance(raised.value.__cause__, OSError)


@pytest.mark.parametrize("ignored", [True, False], ids=["sigint-ignored", "sigint-default"])
def test_a_stand_alone_listener_keeps_sigint_ignored_when_it_came_ignored(
    tmp_path: Path, ignored: bool
) -> None:
    # A shell script's background job (``dicomnode listener ... &``) starts with SIGINT
    # ignored, which the listener replaced with a stop, as the stand-alone worker does not.
    config, port, _ = write_config(tmp_path, _sqlite(tmp_path), listeners=1)
    command = f"exec {sys.executable} -m dicomnode listener --config {config}"
    process = subprocess.Popen(
        ["sh", "-c", ("trap '' INT; " if ignored else "") + command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "listener.log").open("w"),
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", (tmp_path / "listener.log").read_text()
        stop = process.terminate
        if ignored:
            process.send_signal(signal.SIGINT)
            with pytest.raises(subprocess.TimeoutExpired):
                process.wait(timeout=1)
            assert _echo(port, "MODALITY").returncode == 0
        else:
            stop = functools.partial(process.send_signal, signal.SIGINT)
        code, left = _signalled(process, stop)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    output = (tmp_path / "listener.log").read_text()
    assert code == 0, output
    _stopped_without_traceback(output, left)


def test_ctrl_c_stops_a_stand_alone_worker_without_a_traceback(tmp_path: Path) -> None:
    config = worker_config(tmp_path, _sqlite(tmp_path), "threads = 1\npoll_seconds = 0.1\n")
    log = tmp_path / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "worker", "--config", str(config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: " ready" in log.read_text() or process.poll() is not None, 60, what="ready"
        )
        assert process.poll() is None, log.read_text()
    finally:
        code, left = _ctrl_c(process)
    output = log.read_text()
    assert code == 0, output
    _stopped_without_traceback(output, left)


def _stopped_without_traceback(output: str, left: bool) -> None:
    """Nothing of the process group is left, and its output has no traceback."""
    assert not left, output
    assert "Traceback" not in output, output
    assert "KeyboardInterrupt" not in output, output


def _serve_stopped_cleanly(output: str, left: bool) -> None:
    """And serve logged no error, and that it stopped once."""
    _stopped_without_traceback(output, left)
    assert " ERROR " not in output, output
    assert output.count("INFO dicomnode: stopped") == 1, output


# Reload ---------------------------------------------------------------------------


def test_sighup_reloads_peers_and_refuses_a_broken_file(tmp_path: Path) -> None:
    peers = '\n[[peers]]\nae_title = "MODALITY"\n\n[[peers]]\nae_title = "OTHER"\n'
    config, port, web_port = write_config(tmp_path, _sqlite(tmp_path), extra=peers)
    process, log = launch_node(tmp_path, config, port, web_port)
    try:
        assert _echo(port, "MODALITY").returncode == 0
        assert _echo(port, "STRANGER").returncode != 0
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        open_association = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert open_association.is_established

        good = config.read_text().replace('ae_title = "MODALITY"', 'ae_title = "NEWCOMER"')
        config.write_text(good)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log.read_text(), 30, what="reload")
        assert _echo(port, "MODALITY").returncode != 0
        assert _echo(port, "NEWCOMER").returncode == 0
        # The association MODALITY opened before the reload carries on.
        assert open_association.send_c_echo().Status == 0x0000
        open_association.release()

        config.write_text(good.replace("port = ", "port = not-a-number ", 1))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in log.read_text(), 30, what="refused reload")
        assert process.poll() is None
        # The old (second) configuration still holds.
        assert _echo(port, "NEWCOMER").returncode == 0
        assert _echo(port, "MODALITY").returncode != 0
        assert re.search(r"reload refused.*dicomnode\.toml:\d+", log.read_text())
    finally:
        assert _stop(process) == 0


# Health, metrics, logs ------------------------------------------------------------------


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_readyz_metrics_and_json_logs_without_patient_data(tmp_path: Path) -> None:
    extra = '\n[logging]\njson = true\n\n[[peers]]\nae_title = "MODALITY"\n'
    config, port, web_port = write_config(tmp_path, _sqlite(tmp_path), extra=extra)
    process, log = launch_node(tmp_path, config, port, web_port)
    web = f"http://127.0.0.1:{web_port}"
    try:
        ready = httpx.get(f"{web}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"dicom", "database", "storage", "models"}
        assert httpx.get(f"{web}/healthz", timeout=10).status_code == 200

        ds, _ = make_cxr(424_242, pneumothorax=True, patient_id=PATIENT_ID)
        ds.PatientName = PATIENT_NAME
        ds.PatientBirthDate = BIRTH_DATE
        path = tmp_path / "phantom.dcm"
        ds.save_as(path, enforce_file_format=True)
        sent = subprocess.run(
            [
                dcmtk("storescu"),
                "-aet",
                "MODALITY",
                "-aec",
                "DICOMNODE",
                "127.0.0.1",
                str(port),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        assert _echo(port, "STRANGER").returncode != 0

        def analysed() -> str | None:
            text = httpx.get(f"{web}/metrics", timeout=10).text
            # The job's total is observed after its stages: with it, every stage is in.
            done = _metric(
                text, "dicomnode_job_duration_seconds_count", kind="analyse", stage="total"
            )
            return text if done and "dicomnode_inference_seconds_count" in text else None

        text = wait_for(analysed, 120, what="analysis in /metrics")
        assert _metric(text, "dicomnode_instances_received_total") == 1
        assert _metric(text, "dicomnode_received_bytes_total") >= path.stat().st_size * 0.9
        assert _metric(text, "dicomnode_associations_total", outcome="released") >= 1
        assert _metric(text, "dicomnode_refusals_total", reason="unknown_peer") == 1
        assert _metric(text, "dicomnode_inference_seconds_count", model="cxr-pneumothorax-demo")
        assert _metric(text, "dicomnode_job_duration_seconds_count", stage="inference") >= 1
        assert "dicomnode_worklist_size" in text and "dicomnode_queue_depth" in text
        assert _metric(text, "dicomnode_worklist_size") == 1
    finally:
        assert _stop(process) == 0

    lines = log.read_text().splitlines()
    for line in lines:
        json.loads(line)  # every line is a JSON object
    messages = [json.loads(line)["message"] for line in lines]
    assert any(m.startswith("association released") and "stored=1" in m for m in messages)
    assert any(re.match(r"job \d+ analyse .* done in \d+ ms", m) for m in messages)
    whole = log.read_text()
    for secret in (PATIENT_NAME, "Zyxwvuts", "Quirinella", PATIENT_ID, BIRTH_DATE):
        assert secret not in whole
