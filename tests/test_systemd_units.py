"""The shipped systemd units as an admin installs them: the same hardening in each, the GPU
drop-in, the schema migration outside the node's start timeout, ``systemd-analyze verify``
and ``security``, and the node at work under the units' system-call filter."""

from __future__ import annotations

import ctypes.util
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import REPO, StoreSCP, dcmtk, wait_for, write_config
from systemd_sandbox import sandboxed, unit_settings

from dicomnode.ports import wait_for_port
from dicomnode.synth.cxr import make_cxr

SYSTEMD = REPO / "systemd"
NODE = "dicomnode.service"
WORKER = "dicomnode-worker@.service"
DB_UPGRADE = "dicomnode-db-upgrade.service"
UNITS = [NODE, WORKER, DB_UPGRADE]
GPU_DROP_IN = "gpu.conf"
BINARY = "/opt/dicomnode/.venv/bin/dicomnode"
CONFIG = "/etc/dicomnode/dicomnode.toml"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"

# Every unit runs the node's code as the same user: the same sandbox for each ("" means
# set to empty, as CapabilityBoundingSet= is). MemoryDenyWriteExecute= is left out on
# purpose: GPU libraries may compile code at run time.
HARDENING = {
    "User": "dicomnode",
    "Group": "dicomnode",
    "UMask": "0027",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateMounts": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "LockPersonality": "yes",
    "RemoveIPC": "yes",
    "SystemCallFilter": "@system-service",
    "SystemCallErrorNumber": "EPERM",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    # Made at start when missing, with README's mode: a worker host of its own has no
    # /var/lib/dicomnode, and ReadWritePaths= on a missing folder fails (226/NAMESPACE).
    "StateDirectory": "dicomnode",
    "StateDirectoryMode": "0750",
}


def _settings(name: str) -> dict[str, list[str]]:
    return unit_settings((SYSTEMD / name).read_text(encoding="utf-8"))


def _words(settings: dict[str, list[str]], key: str) -> list[str]:
    return [word for value in settings.get(key, []) for word in value.split()]


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    return analyze


# The unit files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_every_unit_has_the_same_sandbox(name: str) -> None:
    settings = _settings(name)
    wrong = {
        key: settings.get(key)
        for key, value in HARDENING.items()
        if settings.get(key) != ([value] if value else [])
    }
    assert not wrong, f"{name}: {wrong}"
    # Writable: the state folder only (storage elsewhere is the admin's drop-in).
    assert _words(settings, "ReadWritePaths") == ["/var/lib/dicomnode"], name


@pytest.mark.parametrize("name", [NODE, WORKER])
def test_node_and_worker_check_the_configuration_before_they_start(name: str) -> None:
    settings = _settings(name)
    assert settings["ExecStartPre"] == [f"{BINARY} check-config {CONFIG}"], name
    assert settings["ExecStart"][0].endswith(f"--config {CONFIG}"), name
    assert settings["Restart"] == ["on-failure"], name


def test_the_schema_migration_runs_before_and_without_a_start_timeout() -> None:
    """After an upgrade, migration 0003 rewrites an SQLite database at seconds per 100 MB:
    in the node's own start (120 s to READY) a large one would be killed and rolled back on
    every restart. A oneshot runs it first, with no timeout."""
    upgrade = _settings(DB_UPGRADE)
    assert upgrade["Type"] == ["oneshot"]
    assert upgrade.get("TimeoutStartSec", ["infinity"]) == ["infinity"]
    assert upgrade["ExecStart"] == [f"{BINARY} db upgrade --config {CONFIG}"]
    for name in (NODE, WORKER):
        settings = _settings(name)
        # Wants=, not Requires=: if the migration fails the node still starts, reports the
        # error itself and is restarted, as before.
        assert DB_UPGRADE in _words(settings, "Wants"), name
        assert DB_UPGRADE in _words(settings, "After"), name
        assert DB_UPGRADE not in _words(settings, "Requires"), name
    node = _settings(NODE)
    assert node["Type"] == ["notify"] and node["TimeoutStartSec"] == ["120"]
    assert re.fullmatch(r"\d+", node["WatchdogSec"][0])


def test_a_stop_signals_serve_which_stops_its_own_processes() -> None:
    """KillMode=mixed: SIGTERM to serve only (control-group, the default, signalled its
    listeners and workers at once, each ending before serve knew it was stopping), and a
    TimeoutStopSec longer than serve's own stop: its listeners' and workers' 10 s each."""
    from dicomnode.ingest.listeners import STOP_TIMEOUT
    from dicomnode.serve import WORKER_STOP_SECONDS

    node = _settings(NODE)
    assert node["KillMode"] == ["mixed"]
    assert int(node["TimeoutStopSec"][0]) > STOP_TIMEOUT + WORKER_STOP_SECONDS


def test_gpu_drop_in_allows_the_nvidia_devices_and_nothing_else() -> None:
    drop_in = unit_settings((SYSTEMD / GPU_DROP_IN).read_text(encoding="utf-8"))
    service_keys = ["PrivateDevices", "DevicePolicy", "DeviceAllow"]
    assert set(drop_in) - {"Wants", "After"} == set(service_keys)
    assert drop_in["PrivateDevices"] == ["no"]
    assert drop_in["DevicePolicy"] == ["closed"]
    # Read and write, never "m" (mknod): every NVIDIA device group, whatever the driver
    # calls its main one (nvidia-frontend, nvidia), and nvidia-uvm, which CUDA needs.
    assert drop_in["DeviceAllow"] == ["char-nvidia* rw"]
    # Device groups are resolved at start: the driver's modules are loaded first.
    for module in ("modprobe@nvidia.service", "modprobe@nvidia_uvm.service"):
        assert module in _words(drop_in, "Wants") and module in _words(drop_in, "After")
    # The unit's comment shows the same lines, so that an admin reading the unit finds them.
    node = (SYSTEMD / NODE).read_text(encoding="utf-8")
    shown = re.findall(r"^#\s+((?:PrivateDevices|DevicePolicy|DeviceAllow)=.*)$", node, re.M)
    assert shown == [f"{key}={drop_in[key][0]}" for key in service_keys]


def test_what_the_units_refer_to_in_the_readme_is_there() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ (.+)$", readme, re.M))
    for name in [*UNITS, GPU_DROP_IN]:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        named = re.findall(r'README\.md "([^"]+)"', text)
        assert named, f"{name} does not point to the README"
        assert set(named) <= headings, f"{name}: {set(named) - headings}"
    gpu = readme.split("## Inference on a GPU", 1)[1].split("\n## ", 1)[0]
    for unit in (NODE, WORKER):
        assert f"/etc/systemd/system/{unit}.d/gpu.conf" in gpu, unit


# systemd-analyze -------------------------------------------------------------------------


def _installed(folder: Path, gpu: bool) -> list[Path]:
    """The units as installed in ``folder`` (ExecStart= pointing at this checkout's console
    script, which verify checks exists), with the GPU drop-in if asked; the unit paths to
    check, the worker as instance 1."""
    binary = str(Path(sys.executable).with_name("dicomnode"))
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        (folder / name).write_text(text.replace(BINARY, binary), encoding="utf-8")
        if gpu and name != DB_UPGRADE:
            (folder / f"{name}.d").mkdir()
            shutil.copy(SYSTEMD / GPU_DROP_IN, folder / f"{name}.d" / GPU_DROP_IN)
    return [folder / NODE, folder / "dicomnode-worker@1.service", folder / DB_UPGRADE]


@pytest.mark.parametrize("gpu", [False, True], ids=["plain", "gpu-drop-in"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, gpu: bool) -> None:
    analyze = _analyze()
    units = _installed(tmp_path, gpu)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    problems = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert result.returncode == 0 and not problems, result.stderr


def _exposure(analyze: str, unit: Path) -> float:
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
    )
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze cannot rate unit files: {result.stderr.strip()}")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_security_rates_each_unit_well_exposed_below_2(
    tmp_path: Path, name: str
) -> None:
    """0 is fully sandboxed, 10 not at all; the units were at 4.5 before their system-call
    filter, namespace, clock, kernel-log, hostname and realtime restrictions."""
    analyze = _analyze()
    _installed(tmp_path, gpu=False)
    assert _exposure(analyze, tmp_path / name) < 2.0


# The node under the units' system-call filter --------------------------------------------


@functools.cache
def _seccomp_refused(analyze: str) -> str:
    """Why this machine cannot load a seccomp filter ('' when it can)."""
    if ctypes.util.find_library("seccomp") is None:
        return "libseccomp not installed (Debian package libseccomp2)"
    probe = subprocess.run(
        sandboxed(SYSTEMD / NODE, ["true"]),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_ANALYZE": analyze},
    )
    if probe.returncode != 0 and "seccomp_" in probe.stderr:
        return f"no seccomp filter can be loaded here: {probe.stderr.strip()[-300:]}"
    return ""


def _sandbox_ready() -> str:
    analyze = _analyze()
    refused = _seccomp_refused(analyze)
    if refused:
        pytest.skip(refused)
    return analyze


def _under(unit: str, *command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        sandboxed(SYSTEMD / unit, list(command)),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_ANALYZE": _sandbox_ready()},
        **kwargs,
    )


def test_the_sandbox_stops_what_the_filter_leaves_out() -> None:
    """The emulation bites: chroot() is a privileged call outside @system-service (the
    process is killed), a netlink socket is outside RestrictAddressFamilies= (refused)."""
    allowed = _under(NODE, sys.executable, "-c", "import os; print(os.getpid() > 0)")
    assert allowed.returncode == 0 and allowed.stdout.strip() == "True", allowed.stderr
    netlink = "import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)"
    refused = _under(NODE, sys.executable, "-c", netlink)
    assert "Address family not supported" in refused.stderr
    killed = _under(NODE, sys.executable, "-c", "import os; os.chroot('/')")
    assert killed.returncode == -signal.SIGSYS, (killed.returncode, killed.stderr)


def _stop(process: subprocess.Popen) -> int:
    process.terminate()
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def test_node_and_worker_do_their_work_under_the_units_system_call_filter(
    tmp_path: Path, db_url: str, pacs: StoreSCP
) -> None:
    """Each command a unit runs, under that unit's filter: the migration, check-config,
    ``serve`` (listener processes sharing the port, web server, reload) with its workers off,
    and a stand-alone ``dicomnode worker`` (onnxruntime threads, result objects, export to a
    real storescp) doing the study's jobs. A call outside the filter kills the process."""
    analyze = _sandbox_ready()
    config, port, web_port = write_config(tmp_path, db_url, destinations=[pacs])
    config.write_text(config.read_text().replace("count = 1", "count = 0", 1))
    binary = str(Path(sys.executable).with_name("dicomnode"))
    upgraded = _under(DB_UPGRADE, binary, "db", "upgrade", "--config", str(config))
    assert upgraded.returncode == 0, upgraded.stderr
    for unit in (NODE, WORKER):
        checked = _under(unit, binary, "check-config", str(config))
        assert checked.returncode == 0, (unit, checked.returncode, checked.stderr)

    env = {**os.environ, "SYSTEMD_ANALYZE": analyze}
    node_log, worker_log = tmp_path / "node.log", tmp_path / "worker.log"
    node = subprocess.Popen(
        sandboxed(SYSTEMD / NODE, [binary, "serve", "--config", str(config)]),
        stdout=node_log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )
    worker = None
    try:
        wait_for_port(port, node, log=node_log)
        wait_for_port(web_port, node, log=node_log)
        worker = subprocess.Popen(
            sandboxed(SYSTEMD / WORKER, [binary, "worker", "--config", str(config)]),
            stdout=worker_log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
        ds, _ = make_cxr(920_001, pneumothorax=True, accession_number="ACC-SECCOMP")
        study = tmp_path / "study.dcm"
        ds.save_as(study, enforce_file_format=True)
        storescu = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1"]
        sent = subprocess.run(
            [*storescu, str(port), str(study)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr

        def delivered() -> bool:
            try:
                classes = {str(pydicom.dcmread(f).SOPClassUID) for f in pacs.received()}
            except (pydicom.errors.InvalidDicomError, EOFError, OSError):
                return False  # storescp is still writing one
            return SR_STORAGE in classes

        def alive() -> None:
            for process, log in ((node, node_log), (worker, worker_log)):
                assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"

        wait_for(lambda: alive() or delivered(), timeout=180, what="the SR at the PACS")
        metrics = httpx.get(f"http://127.0.0.1:{web_port}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "dicomnode_instances_received_total" in metrics.text
        node.send_signal(signal.SIGHUP)
        worker.send_signal(signal.SIGHUP)
        wait_for(
            lambda: alive() or "configuration reloaded" in node_log.read_text(),
            timeout=60,
            what="reload",
        )
        alive()
    finally:
        codes = [_stop(process) for process in (worker, node) if process is not None]
    assert codes == [0, 0], (codes, worker_log.read_text(), node_log.read_text())
    for log in (node_log, worker_log):
        assert "Bad system call" not in log.read_text()
        assert "exited with status -31" not in log.read_text()
