"""A database the node cannot use at start stops each command that opens it with one line
that names the problem (no traceback, no password) and a non-zero status: a server that is
down, a login it refuses, an SQLite file it cannot create, and a schema newer than this code
(after a software rollback). Run as an operator or systemd runs them: ``python -m dicomnode``
in a subprocess, on real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_postgres, write_config

from dicomnode.ports import free_port

DICOMNODE = [sys.executable, "-m", "dicomnode"]
PASSWORD = "s3cret-Pw"
UNKNOWN = "0099"
COMMANDS = (
    ("db", "upgrade"),
    ("serve",),
    ("worker",),
    ("users", "list"),
    ("worklist",),
)


def run_command(arguments: tuple[str, ...], config: Path) -> subprocess.CompletedProcess[str]:
    metrics = config.parent / "metrics"
    metrics.mkdir(exist_ok=True)
    return subprocess.run(
        [*DICOMNODE, *arguments, "--config", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=config.parent,
        # serve's metrics folder: ours, not a new one in /tmp for each failed start.
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
    )


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr's lines, checked to be few, without a traceback or the password."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert PASSWORD not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    # serve warns first that [[peers]] lists no one; nothing else comes before the error.
    assert 1 <= len(lines) <= 2, lines
    return lines


@pytest.mark.parametrize("arguments", COMMANDS, ids=" ".join)
def test_a_postgresql_server_that_is_down_is_one_line(tmp_path: Path, arguments) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://nobody:{PASSWORD}@127.0.0.1:{port}/x"
    config, _, _ = write_config(tmp_path, url)
    lines = problem_lines(run_command(arguments, config))
    assert lines[-1].endswith(
        f"database unreachable: 127.0.0.1:{port}: connection refused (check [database] url "
        f"= postgresql+psycopg://nobody:***@127.0.0.1:{port}/x)"
    ), lines


def test_a_password_in_the_query_is_hidden_too(tmp_path: Path) -> None:
    port = free_port()
    url = f"postgresql+psycopg://nobody@127.0.0.1:{port}/x?password={PASSWORD}"
    config, _, _ = write_config(tmp_path, url)
    lines = problem_lines(run_command(("db", "upgrade"), config))
    assert lines == [
        f"error: database unreachable: 127.0.0.1:{port}: connection refused (check [database] "
        f"url = postgresql+psycopg://nobody@127.0.0.1:{port}/x?password=***)"
    ]


def test_a_login_the_server_refuses_names_the_reason(tmp_path: Path) -> None:
    require_postgres()
    url = f"postgresql+psycopg://no_such_role:{PASSWORD}@127.0.0.1:5432/test"
    config, _, _ = write_config(tmp_path, url)
    lines = problem_lines(run_command(("db", "upgrade"), config))
    assert lines == [
        'error: database unreachable: 127.0.0.1:5432: role "no_such_role" does not exist '
        "(check [database] url = postgresql+psycopg://no_such_role:***@127.0.0.1:5432/test)"
    ]


def test_an_sqlite_file_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    database = tmp_path / "a-file" / "dicomnode.db"
    config, _, _ = write_config(tmp_path, f"sqlite:///{database}")
    # (serve and worker refuse the folder earlier, as check-config does.) db upgrade fails to
    # make the folder; users list, which only reads, to look for the file.
    for arguments, reason in (
        (("db", "upgrade"), "file exists"),
        (("users", "list"), "not a directory"),
    ):
        lines = problem_lines(run_command(arguments, config))
        assert lines[-1].endswith(
            f"cannot open the SQLite database {database}: {reason} (check [database] url "
            "and the owner and mode of the file and its folder)"
        ), lines


def _stamp_unknown_revision(url: str) -> None:
    from sqlalchemy import create_engine, text

    from dicomnode.db.session import upgrade

    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": UNKNOWN})
    engine.dispose()


def test_a_schema_newer_than_the_code_says_how_to_roll_back(tmp_path: Path, db_url: str) -> None:
    from dicomnode.db.session import alembic_config

    _stamp_unknown_revision(db_url)
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
    config, _, _ = write_config(tmp_path, db_url)
    # (worklist and db current only read: they refuse it as the commands that migrate do.)
    for arguments in (("db", "upgrade"), ("serve",), ("worklist",), ("db", "current")):
        lines = problem_lines(run_command(arguments, config))
        assert lines[-1].endswith(
            f"database is at revision {UNKNOWN}, which this dicomnode (revisions up to {head}) "
            "does not know: install the newer dicomnode again or restore the backup taken "
            "before the upgrade"
        ), lines
    # Refused before any migration ran: the database is as the newer code left it.
    if db_url.startswith("sqlite:///"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
            assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
                (UNKNOWN,)
            ]


@pytest.mark.parametrize("arguments", (*COMMANDS, ("check-config",)), ids=" ".join)
def test_a_configuration_file_not_found_says_how_to_name_one(tmp_path: Path, arguments) -> None:
    """Run from a folder without conf/ (and without DICOMNODE_CONFIG), each command says
    where it looked and how to point it at the file. When DICOMNODE_CONFIG names the missing
    file, it says the path came from there (not "set DICOMNODE_CONFIG", which is set); a
    --config given instead wins, and its missing file gets the plain hint."""
    environment = {key: value for key, value in os.environ.items() if key != "DICOMNODE_CONFIG"}
    gone = str(tmp_path / "gone.toml")
    plain = "(check the path, or give --config PATH or set DICOMNODE_CONFIG)"
    from_environment = (
        "(the environment variable DICOMNODE_CONFIG names this path: correct or unset it, "
        "or give --config PATH)"
    )
    for extra, options, looked_at, hint in (
        ({}, (), "conf/dicomnode.toml", plain),
        ({"DICOMNODE_CONFIG": gone}, (), gone, from_environment),
        ({"DICOMNODE_CONFIG": gone}, ("--config", "other.toml"), "other.toml", plain),
    ):
        result = subprocess.run(
            [*DICOMNODE, *arguments, *options],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**environment, **extra},
        )
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr == (
            f"configuration error: {looked_at}: cannot read file: No such file or directory "
            f"{hint}\n"
        )
