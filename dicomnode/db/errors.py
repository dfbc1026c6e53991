"""Why the node cannot use its database at start, in one line an admin can act on.

A start that fails on the database (server down, a wrong URL, a schema newer than this
code after a rollback) is retried by systemd every few seconds; a traceback each time
buries the reason in the journal. Stdlib only at import: the CLI imports this module in
every process, listeners included, which never open the database."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

HIDDEN = "***"
POSTGRESQL_PORT = 5432
# Text after the last "failed: " of a driver's connect error: psycopg says where it tried,
# then why ('connection to server at "h", port 5999 failed: Connection refused').
_LAST_FAILURE = re.compile(r".*\bfailed: (.+)$")
_SEVERITY = re.compile(r"^(FATAL|ERROR):\s+")


class DatabaseUnusable(Exception):
    """The database cannot be opened or has a schema this code cannot run on; the message
    is one line, says what to do and holds no password."""


def unreachable(url: str, error: BaseException) -> DatabaseUnusable:
    """The error for a database that refused or failed the connection (``error``: the
    SQLAlchemy or operating-system error raised while opening it)."""
    parsed = _parse(url)
    reason = _reason(error, _passwords(parsed))
    shown = _shown(parsed)
    if parsed is not None and parsed.get_backend_name() == "sqlite":
        return DatabaseUnusable(
            f"cannot open the SQLite database {parsed.database}: {reason} "
            f"(check [database] url and the owner and mode of the file and its folder)"
        )
    where = _where(parsed)
    return DatabaseUnusable(
        f"database unreachable: {where}{reason} (check [database] url = {shown})"
    )


def unknown_revision(revision: str, head: str | None) -> DatabaseUnusable:
    """The error for a database whose schema revision this code does not have: it was
    upgraded by a newer dicomnode, which has since been replaced by this older one."""
    return DatabaseUnusable(
        f"database is at revision {revision}, which this dicomnode (revisions up to {head}) "
        "does not know: install the newer dicomnode again or restore the backup taken "
        "before the upgrade"
    )


def behind(revision: str, head: str) -> DatabaseUnusable:
    """The error for a command that only reads, on a database an upgrade has not reached:
    it never migrates, as an older node may still run on the database."""
    return DatabaseUnusable(
        f"database is at revision {revision}, this dicomnode needs {head}: "
        "run `dicomnode db upgrade` (stop older nodes first)"
    )


def no_database(url: str) -> DatabaseUnusable:
    """The error for a command that only reads, on a database without the node's schema (an
    SQLite file not made yet, an empty PostgreSQL database): it creates none."""
    parsed = _parse(url)
    if parsed is not None and parsed.get_backend_name() == "sqlite":
        where = str(parsed.database)
    else:
        where = _shown(parsed)
    return DatabaseUnusable(
        f"there is no dicomnode database at {where} yet: `dicomnode db upgrade` or the "
        "node's start (`dicomnode serve`) creates it"
    )


def _parse(url: str) -> URL | None:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except Exception:  # any URL SQLAlchemy cannot read: show no part of it
        return None


def _passwords(parsed: URL | None) -> list[str]:
    if parsed is None:
        return []
    query = parsed.query.get("password", ())
    return [str(parsed.password or ""), *([query] if isinstance(query, str) else query)]


def _shown(parsed: URL | None) -> str:
    """``url`` with its password (user info or ``password=`` query value) hidden."""
    if parsed is None:
        return "<not a valid URL>"
    if "password" not in parsed.query:
        return parsed.render_as_string(hide_password=True)
    # A query value is rendered percent-encoded: mark it with letters, then hide it.
    marker = "dicomnode-hidden-password"
    shown = parsed.update_query_dict({"password": marker}).render_as_string(hide_password=True)
    return shown.replace(marker, HIDDEN)


def _where(parsed: URL | None) -> str:
    if parsed is None:
        return ""
    host = parsed.host or parsed.query.get("host") or "localhost"
    if isinstance(host, tuple):
        host = ",".join(host)
    return f"{host}:{parsed.port or POSTGRESQL_PORT}: "


def _reason(error: BaseException, passwords: list[str]) -> str:
    """The driver's first line of why, without where it tried (said apart) or severity."""
    text = str(getattr(error, "orig", None) or error)
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    match = _LAST_FAILURE.match(line)
    if match:
        line = match.group(1)
    line = " ".join(_SEVERITY.sub("", line).split())
    if len(line) > 1 and line[0].isupper() and line[1].islower():
        line = line[0].lower() + line[1:]
    for password in passwords:
        if password:
            line = line.replace(password, HIDDEN)
    return line
