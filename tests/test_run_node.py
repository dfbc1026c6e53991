"""README's command 1, ``scripts/run-node.sh``, run as it is in a copy of the clone: a
configuration of one's own (other ports) by ``--config`` or ``DICOMNODE_CONFIG``, used by
every step of it, and the configuration's warnings said once at each start.

The copy's ``.venv`` is a real virtual environment that sees the test environment's
packages (a ``.pth`` file), so that the script's two ``pip install`` steps run, without an
index (``PIP_NO_INDEX``): what they need is there already."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import wait_for

from dicomnode.ports import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
OPEN_PEERS = "[[peers]] lists no one"


def _clone(folder: Path) -> Path:
    """What run-node.sh uses of the clone, in ``folder``, with a ``.venv`` of its own."""
    clone = folder / "clone"
    (clone / "scripts").mkdir(parents=True)
    (clone / "conf").mkdir()
    shutil.copy2(REPO / "scripts" / "run-node.sh", clone / "scripts")
    shutil.copy2(REPO / "conf" / "dicomnode.toml", clone / "conf")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, clone)
    for name in ("dicomnode", "models"):
        (clone / name).symlink_to(REPO / name)
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True
    )
    packages = sysconfig.get_paths()["purelib"]
    site = next((clone / ".venv" / "lib").glob("python3*")) / "site-packages"
    (site / "test-environment.pth").write_text(f"import site; site.addsitedir({packages!r})\n")
    return clone


def _own_config(clone: Path, port: int, web_port: int) -> Path:
    """conf/dicomnode.toml copied to conf/mine.toml with other ports and database, as the
    README says."""
    text = (clone / "conf" / "dicomnode.toml").read_text()
    text = re.sub(r"(?m)^port = 11112$", f"port = {port}", text)
    text = re.sub(r"(?m)^port = 8080$", f"port = {web_port}", text)
    text = text.replace("sqlite:///var/dicomnode.db", "sqlite:///var/mine.db")
    assert f"port = {port}" in text and f"port = {web_port}" in text
    config = clone / "conf" / "mine.toml"
    config.write_text(text)
    return config


def _environment(folder: Path) -> dict[str, str]:
    environment = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # The test environment's setuptools builds the editable install (no index to fetch one);
    # the [dev] extra brings one that reads pyproject's license string (77 or later).
    environment["PIP_NO_BUILD_ISOLATION"] = "0"
    environment["TMPDIR"] = str(folder)
    for name in ("DICOMNODE_CONFIG", "PROMETHEUS_MULTIPROC_DIR", "VIRTUAL_ENV"):
        environment.pop(name, None)
    return environment


@pytest.mark.parametrize("given", ["--config", "DICOMNODE_CONFIG"])
def test_run_node_on_a_configuration_of_ones_own(tmp_path: Path, given: str) -> None:
    """Before, run-node.sh had no way to other ports: its check-config and its users used
    conf/dicomnode.toml whatever was given, and check-config and serve each printed the
    open-peers warning."""
    clone = _clone(tmp_path)
    port, web_port = free_port(), free_port()
    config = _own_config(clone, port, web_port)
    environment = _environment(tmp_path)
    command = [str(clone / "scripts" / "run-node.sh")]
    # A relative file is relative to the folder the script is run in (it then moves to the
    # clone): run from the clone's parent for --config, so that only that reading finds it.
    if given == "--config":
        command += ["--config", "clone/conf/mine.toml"]
        folder = tmp_path
    else:
        environment["DICOMNODE_CONFIG"] = "conf/mine.toml"
        folder = clone
    log = tmp_path / "run-node.log"
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=folder,
        env=environment,
        start_new_session=True,  # its own process group, as a terminal starts it
    )
    try:
        wait_for(
            lambda: "node ready" in log.read_text() or process.poll() is not None,
            180,
            what="node ready",
        )
        assert process.poll() is None, log.read_text()
        wait_for_port(port, process)
        wait_for_port(web_port, process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text()
    assert f"worklist page on http://127.0.0.1:{web_port}/worklist" in output, output
    assert output.count(OPEN_PEERS) == 1, output
    assert f"0.0.0.0:{port} may store" in output, output
    # The admin account is in the database of the file given, and nothing used the other.
    assert "worklist log-in: user 'admin'" in output, output
    # Made by db upgrade before users list, which only reads: no error on a first start.
    assert "database schema upgraded from empty to revision " in output, output
    assert "error:" not in output, output
    assert f"--config '{config}'" in output, output
    assert (clone / "var" / "mine.db").exists()
    assert not (clone / "var" / "dicomnode.db").exists()
    assert "INFO dicomnode: stopped" in output, output


def test_check_config_by_itself_still_warns(tmp_path: Path) -> None:
    """run-node.sh leaves check-config's copy of the warnings out; the command does not."""
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode", "check-config", str(REPO / "conf" / "dicomnode.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: {OPEN_PEERS}" in result.stderr


def test_run_node_stops_on_a_refused_configuration(tmp_path: Path) -> None:
    """check-config's errors are shown (only its warnings are left out) and end the script
    with its status, before any user is added or serve starts. The file is given relative
    to the folder the script is run in, not the clone: the error names it there."""
    clone = _clone(tmp_path)
    shipped = (clone / "conf" / "dicomnode.toml").read_text()
    assert shipped.splitlines()[16] == 'ae_title = "DICOMNODE"'
    config = clone / "conf" / "refused.toml"
    config.write_text(shipped.replace('ae_title = "DICOMNODE"', 'ae_title = "DICOMNODE-TOO-LONG"'))
    result = subprocess.run(
        [str(clone / "scripts" / "run-node.sh"), "--config", "clone/conf/refused.toml"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=_environment(tmp_path),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"configuration error: {config}:17: [node.ae_title] an AE title is 1-16" in (
        result.stderr
    ), result.stderr
    assert "worklist log-in" not in result.stdout
    assert not (clone / "var").exists()


@pytest.mark.parametrize("given", ["--config", "DICOMNODE_CONFIG"])
def test_run_node_names_a_configuration_file_it_cannot_find(tmp_path: Path, given: str) -> None:
    """A file given that is not there is named, with where it was given, before anything is
    installed or started (check-config's hint would send the admin to DICOMNODE_CONFIG)."""
    clone = _clone(tmp_path)
    environment = _environment(tmp_path)
    arguments = [str(clone / "scripts" / "run-node.sh")]
    if given == "--config":
        arguments += ["--config", "conf/mistyped.toml"]
    else:
        environment["DICOMNODE_CONFIG"] = "conf/mistyped.toml"
    result = subprocess.run(
        arguments,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=environment,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        f"run-node.sh: configuration file {tmp_path / 'conf' / 'mistyped.toml'} (from {given})"
        " not found\n"
    ), result.stderr
    assert not list((clone / ".venv" / "bin").glob("dicomnode"))
