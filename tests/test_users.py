"""Managing web users with the CLI (``dicomnode users ...`` in a subprocess) and what the
running web app then lets them do, on SQLite and PostgreSQL.

Each CLI process costs ~1.4 s (imports, the database's migration check), so a test runs only
the commands it is about: users it merely needs are added in this process, and each test checks
the audit entries of the commands it ran (test_web_api and test_cli run ``users add``, ``token``
and ``list`` too).
"""

from __future__ import annotations

import getpass
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import TEST_PASSWORD, add_user_directly, write_config
from conftest import add_user as add_cli_user
from web_server import serve

from dicomnode.web.app import create_app

NEW_PASSWORD = "another long passphrase"
ACTOR = f"cli:{getpass.getuser()}"


@dataclass
class Node:
    """The web app on the database that ``config`` names, and the CLI run against it."""

    config: Path
    url: str

    def users(self, *arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """``dicomnode users ARGUMENTS --config CONFIG`` (stdin piped, else empty)."""
        command = [sys.executable, "-m", "dicomnode", "users", *arguments]
        return subprocess.run(
            [*command, "--config", str(self.config)],
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            text=True,
            timeout=60,
            start_new_session=True,
        )

    def me(self, token: str = "", cookies: dict[str, str] | None = None) -> int:
        """The status of GET /api/me with a bearer token or a session cookie."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=self.url, cookies=cookies, timeout=10) as client:
            return client.get("/api/me", headers=headers).status_code

    def api_login(self, username: str, password: str) -> int:
        body = {"username": username, "password": password}
        return httpx.post(f"{self.url}/api/login", json=body, timeout=10).status_code

    def page_session(self, username: str, password: str = TEST_PASSWORD) -> dict[str, str]:
        """Log in through the form as a browser does; the session cookie."""
        with httpx.Client(base_url=self.url, timeout=10) as browser:
            form = browser.get("/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
            browser.post(
                "/login", data={"username": username, "password": password, "csrf_token": csrf}
            )
            return {"dicomnode_session": browser.cookies["dicomnode_session"]}


@pytest.fixture
def node(db_url: str, sessions, tmp_path: Path) -> Iterator[Node]:
    config, _, _ = write_config(tmp_path, db_url)
    with serve(create_app(sessions)) as url:
        yield Node(config, url)


def audit_trail(sessions, *secrets: str) -> list[tuple[str, str, str]]:
    """(actor, action, detail) of the audit log's changes to users (action ``user_...``; the
    web app's log-ins are audited too), oldest first; no entry holds a secret."""
    from sqlalchemy import select

    from dicomnode.db.models import AuditEntry

    with sessions() as session:
        entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    everything = [(e.actor, e.action, e.detail) for e in entries]
    assert not any(secret in repr(everything) for secret in secrets)
    return [entry for entry in everything if entry[1].startswith("user_")]


def test_a_disabled_user_is_refused_until_enabled(node: Node, sessions) -> None:
    """Also: the CLI's add (password on stdin) and token work, and every change is audited
    (who, what, never a secret); list and a refused command are not."""
    token = add_cli_user(node.config, "alice", "radiologist")
    cookies = node.page_session("alice")
    assert node.me(token) == 200 and node.me(cookies=cookies) == 200

    disabled = node.users("disable", "alice")
    assert disabled.returncode == 0, disabled.stderr
    assert node.me(token) == 401
    assert node.me(cookies=cookies) == 401
    assert node.api_login("alice", TEST_PASSWORD) == 401
    assert "alice                    radiologist (disabled)" in node.users("list").stdout

    assert node.users("enable", "alice").returncode == 0
    assert node.me(token) == 200 and node.me(cookies=cookies) == 200
    assert node.api_login("alice", TEST_PASSWORD) == 200
    missing = node.users("disable", "ghost")
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "error: no user 'ghost'; add one with `dicomnode users add`",
    )
    assert audit_trail(sessions, token, TEST_PASSWORD) == [
        (ACTOR, "user_add", "user alice, role radiologist"),
        (ACTOR, "user_token", "user alice, 30 days"),
        (ACTOR, "user_disable", "user alice"),
        (ACTOR, "user_enable", "user alice"),
    ]


def test_an_admin_sets_a_new_password(node: Node, sessions) -> None:
    token = add_user_directly(node.config, "alice", "radiologist")
    cookies = node.page_session("alice")
    other = add_user_directly(node.config, "bob", "radiologist")
    assert node.me(token) == 200 and node.me(cookies=cookies) == 200
    changed = node.users("password", "alice", "--password-stdin", stdin=NEW_PASSWORD + "\n")
    assert changed.returncode == 0, changed.stderr
    # Whoever knew the old password may hold a session or token: they end with it.
    assert node.me(token) == 401 and node.me(cookies=cookies) == 401
    assert node.me(other) == 200
    assert node.api_login("alice", TEST_PASSWORD) == 401
    assert node.api_login("alice", NEW_PASSWORD) == 200
    weak = node.users("password", "alice", "--password-stdin", stdin="short\n")
    assert weak.returncode == 1 and "at least 8 characters" in weak.stderr
    assert node.api_login("alice", NEW_PASSWORD) == 200
    # (Without --password-stdin and a terminal: test_cli.)
    assert audit_trail(sessions, NEW_PASSWORD, TEST_PASSWORD) == [
        (ACTOR, "user_password", "user alice")
    ]


def test_a_password_change_may_keep_the_api_tokens(node: Node) -> None:
    """``users password --keep-tokens`` ends the log-in sessions only; the user's API tokens,
    e.g. a script's, keep working."""
    token = add_user_directly(node.config, "alice", "radiologist")
    cookies = node.page_session("alice")
    kept = node.users(
        "password", "alice", "--password-stdin", "--keep-tokens", stdin=f"{NEW_PASSWORD}\n"
    )
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.strip() == (
        "changed the password of alice; 1 log-in session(s) and API tokens kept"
    )
    assert node.me(token) == 200 and node.me(cookies=cookies) == 401
    ended = node.users("password", "alice", "--password-stdin", stdin=f"{TEST_PASSWORD}\n")
    assert ended.stdout.strip() == (
        "changed the password of alice; 0 log-in session(s) and 1 API token(s) ended"
    )
    assert node.me(token) == 401


def test_revoke_ends_every_token_and_session_of_the_user(node: Node, sessions) -> None:
    first = add_user_directly(node.config, "alice", "radiologist")
    # --days=0: a token that does not expire.
    made = node.users("token", "alice", "--days=0")
    assert made.returncode == 0, made.stderr
    second = made.stdout.strip()
    assert second.startswith("dn_") and node.me(second) == 200
    cookies = node.page_session("alice")
    other = add_user_directly(node.config, "bob", "admin")
    revoked = node.users("revoke", "alice")
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == "revoked 3 token(s) and session(s) of alice"
    assert [node.me(first), node.me(second), node.me(cookies=cookies)] == [401, 401, 401]
    assert node.me(other) == 200
    assert node.api_login("alice", TEST_PASSWORD) == 200
    assert audit_trail(sessions, first, second) == [
        (ACTOR, "user_token", "user alice, no expiry"),
        (ACTOR, "user_revoke", "user alice"),
    ]


BAD_DAYS = ("-5", "-0.5", "nan", "inf", "1e9", "soon")


def test_a_token_that_would_be_born_expired_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--days is refused as the command line is parsed, before any database is opened: one
    real process for how it ends, each bad value through the same parser in this process."""
    from dicomnode.cli.main import main

    config = tmp_path / "dicomnode.toml"  # not there: never read
    for days in BAD_DAYS:
        with pytest.raises(SystemExit) as refused:
            main(["users", "token", "alice", f"--days={days}", "--config", str(config)])
        assert refused.value.code == 2, days
        out, err = capsys.readouterr()
        assert out == "" and "--days" in err, days
    made = Node(config, "").users("token", "alice", "--days=-5")
    assert made.returncode == 2
    assert made.stdout == ""
    assert "--days" in made.stderr and "Traceback" not in made.stderr, made.stderr
