"""The commands that only read (worklist, users list, jobs list) never change the database
schema: on a database an upgrade has not reached (an older node may still run on it) or not
made yet they say what to run and exit 1, the database left as it was. ``db current`` says
where the database and this code stand, in its exit status too, and ``--version`` names the
newest schema revision. Run as an operator runs them: ``python -m dicomnode`` in a subprocess,
on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic import command
from conftest import write_config

from dicomnode.db.session import alembic_config, newest_revision, schema_revision

DICOMNODE = [sys.executable, "-m", "dicomnode"]
OLD = "0002"
READING = (("worklist",), ("users", "list"), ("jobs", "list"))


def run_cli(config: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DICOMNODE, *arguments, "--config", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def test_reading_commands_refuse_a_database_behind_and_leave_it(
    tmp_path: Path, db_url: str
) -> None:
    head = newest_revision()
    assert head != OLD
    command.upgrade(alembic_config(db_url), OLD)
    config, _, _ = write_config(tmp_path, db_url)
    for arguments in READING:
        refused = run_cli(config, *arguments)
        assert refused.returncode == 1, (arguments, refused.stderr[-3000:])
        assert refused.stderr == (
            f"error: database is at revision {OLD}, this dicomnode needs {head}: "
            "run `dicomnode db upgrade` (stop older nodes first)\n"
        ), arguments
        assert refused.stdout == "", arguments
        assert schema_revision(db_url) == OLD, arguments
    behind = run_cli(config, "db", "current")
    assert behind.returncode == 3, behind.stderr
    assert behind.stdout.splitlines() == [
        f"database schema revision: {OLD}",
        f"this dicomnode's newest revision: {head}",
        "upgrade needed: run `dicomnode db upgrade` (stop older nodes first)",
    ]
    assert schema_revision(db_url) == OLD
    # The commands that write still migrate, as db upgrade does; then the reads run.
    upgraded = run_cli(config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert schema_revision(db_url) == head
    listed = run_cli(config, "worklist")
    assert listed.returncode == 0, listed.stderr
    assert "PRIORITY" in listed.stdout
    current = run_cli(config, "db", "current")
    assert current.returncode == 0, current.stderr
    assert current.stdout.splitlines() == [
        f"database schema revision: {head}",
        f"this dicomnode's newest revision: {head}",
        "up to date",
    ]


def test_reading_commands_create_no_database(tmp_path: Path, db_url: str) -> None:
    """A database not made yet (no SQLite file, an empty PostgreSQL schema): the reads say
    so and make none; db current says an upgrade is needed."""
    config, _, _ = write_config(tmp_path, db_url)
    path = _sqlite_path(db_url)
    where = str(path) if path else db_url
    refused = run_cli(config, "users", "list")
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert refused.stderr == (
        f"error: there is no dicomnode database at {where} yet: `dicomnode db upgrade` or the "
        "node's start (`dicomnode serve`) creates it\n"
    )
    missing = run_cli(config, "db", "current")
    assert missing.returncode == 3, missing.stderr
    assert missing.stdout.splitlines()[0] == (
        "database schema revision: none (no dicomnode database yet)"
    )
    if path is not None:
        assert not path.exists()
        assert not path.parent.joinpath(f"{path.name}-wal").exists()
    else:
        assert schema_revision(db_url) is None
