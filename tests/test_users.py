"""Managing web users with the CLI (``dicomnode users ...`` in a subprocess) and what the
running web app then lets them do, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import TEST_PASSWORD, write_config
from conftest import add_user as add_cli_user
from web_server import serve

from dicomnode.web.app import create_app

NEW_PASSWORD = "another long passphrase"


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


def test_a_disabled_user_is_refused_until_enabled(node: Node) -> None:
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


def test_an_admin_sets_a_new_password(node: Node) -> None:
    token = add_cli_user(node.config, "alice", "radiologist")
    cookies = node.page_session("alice")
    other = add_cli_user(node.config, "bob", "radiologist")
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
    no_terminal = node.users("password", "alice")
    assert no_terminal.returncode != 0 and "--password-stdin" in no_terminal.stderr
    assert "Traceback" not in no_terminal.stderr


def test_a_password_change_may_keep_the_api_tokens(node: Node) -> None:
    """``users password --keep-tokens`` ends the log-in sessions only; the user's API tokens,
    e.g. a script's, keep working."""
    token = add_cli_user(node.config, "alice", "radiologist")
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


def test_revoke_ends_every_token_and_session_of_the_user(node: Node) -> None:
    first = add_cli_user(node.config, "alice", "radiologist")
    second = node.users("token", "alice").stdout.strip()
    cookies = node.page_session("alice")
    other = add_cli_user(node.config, "bob", "admin")
    revoked = node.users("revoke", "alice")
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == "revoked 3 token(s) and session(s) of alice"
    assert [node.me(first), node.me(second), node.me(cookies=cookies)] == [401, 401, 401]
    assert node.me(other) == 200
    assert node.api_login("alice", TEST_PASSWORD) == 200


def test_a_token_that_would_be_born_expired_is_refused(node: Node) -> None:
    add_cli_user(node.config, "alice", "radiologist")
    for days in ("-5", "-0.5", "nan", "inf", "1e9", "soon"):
        made = node.users("token", "alice", f"--days={days}")
        assert made.returncode == 2, days
        assert made.stdout == "", days
        assert "--days" in made.stderr and "Traceback" not in made.stderr, made.stderr
    assert node.users("token", "alice", "--days=0").stdout.startswith("dn_")


def test_every_change_to_the_users_is_in_the_audit_log(node: Node, sessions) -> None:
    """Who changed which web user, and how, from the CLI (no password or token in it)."""
    import getpass

    from sqlalchemy import select

    from dicomnode.db.models import AuditEntry

    token = add_cli_user(node.config, "carol", "radiologist")
    assert node.users("disable", "carol").returncode == 0
    assert node.users("enable", "carol").returncode == 0
    assert node.users("password", "carol", "--password-stdin", stdin=NEW_PASSWORD).returncode == 0
    assert node.users("revoke", "carol").returncode == 0
    assert node.users("list").returncode == 0  # reads only: not audited
    with sessions() as session:
        entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    actor = f"cli:{getpass.getuser()}"
    assert [(e.actor, e.action, e.detail) for e in entries] == [
        (actor, "user_add", "user carol, role radiologist"),
        (actor, "user_token", "user carol, 30 days"),
        (actor, "user_disable", "user carol"),
        (actor, "user_enable", "user carol"),
        (actor, "user_password", "user carol"),
        (actor, "user_revoke", "user carol"),
    ]
    assert not any(secret in repr(entries) for secret in (token, NEW_PASSWORD, TEST_PASSWORD))
