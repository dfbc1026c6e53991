"""The command line as an operator runs it: ``python -m dicomnode`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

DICOMNODE = [sys.executable, "-m", "dicomnode"]


def run_cli(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``dicomnode ARGUMENTS`` without a controlling terminal; ``stdin`` piped, else empty."""
    return subprocess.run(
        [*DICOMNODE, *arguments],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no /dev/tty, as under cron, systemd or ssh without -t
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A node configuration on a fresh SQLite database."""
    path, _, _ = write_config(tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}")
    return path


def test_users_add_without_a_terminal_says_how_to_give_the_password(config: Path) -> None:
    added = run_cli("users", "add", "carol", "--role", "radiologist", "--config", str(config))
    assert added.returncode != 0
    assert "Traceback" not in added.stderr
    assert added.stderr.strip().splitlines() == [
        "error: no terminal to ask for the password on; "
        "give it on standard input with --password-stdin"
    ]
    assert "carol" not in run_cli("users", "list", "--config", str(config)).stdout


def test_help_lists_only_the_commands_for_people() -> None:
    """The listener processes' own subcommand runs but is not offered in the help."""
    shown = run_cli("--help")
    assert shown.returncode == 0
    assert "==SUPPRESS==" not in shown.stdout
    assert "listener " not in shown.stdout and ",listener," not in shown.stdout
    for command in ("serve", "worker", "users", "simulate"):
        assert f"\n    {command} " in shown.stdout, command
    assert "{serve,worker," in shown.stdout
    hidden = run_cli("listener", "--help")
    assert hidden.returncode == 0
    assert "--socket-fd" in hidden.stdout
    wrong = run_cli("lisener")
    assert wrong.returncode == 2
    assert "invalid choice: 'lisener'" in wrong.stderr
    assert "listener" not in wrong.stderr


def test_db_upgrade_names_the_revision_it_left_the_database_at(config: Path) -> None:
    from dicomnode.db.session import schema_revision

    first = run_cli("db", "upgrade", "--config", str(config))
    assert first.returncode == 0, first.stderr
    head = schema_revision(f"sqlite:///{config.parent / 'dicomnode.db'}")
    assert head
    assert first.stdout.strip() == f"database schema upgraded from empty to revision {head}"
    again = run_cli("db", "upgrade", "--config", str(config))
    assert again.stdout.strip() == f"database schema is up to date (revision {head})"
    # Patient data: the database and its WAL files are the node account's alone.
    for path in config.parent.glob("dicomnode.db*"):
        assert path.stat().st_mode & 0o077 == 0, (path.name, oct(path.stat().st_mode))
