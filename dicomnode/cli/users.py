"""``dicomnode users``: local web users and API tokens, each change audited."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from dicomnode.cli.resources import database_sessions, reading_sessions, settings_of

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def _has_terminal() -> bool:
    """Whether getpass can ask without echo: a controlling terminal, or stdin is one."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return sys.stdin.isatty()
    return True


def _read_password(args: argparse.Namespace) -> str:
    """The password from standard input (--password-stdin), else asked twice on the terminal."""
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not _has_terminal():
        raise SystemExit(
            "error: no terminal to ask for the password on; "
            "give it on standard input with --password-stdin"
        )
    try:
        password = getpass.getpass(f"password for {args.name}: ")
        again = getpass.getpass("again: ")
    except EOFError:
        raise SystemExit("error: no password given; nothing changed") from None
    if again != password:
        raise SystemExit("passwords differ; nothing changed")
    return password


def _users_add(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.db.session import utcnow
    from dicomnode.users import add_user

    add_user(session, args.name, args.role, _read_password(args), utcnow())
    return f"added {args.role} {args.name}"


def _users_token(session: Session, args: argparse.Namespace) -> str:
    from datetime import timedelta

    from dicomnode.db.session import utcnow
    from dicomnode.users import issue_token

    lifetime = timedelta(days=args.days) if args.days else None
    # The token goes to stdout only, never to the log; it is not stored in clear.
    return issue_token(session, args.name, utcnow(), lifetime=lifetime)


def _users_disable(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import set_disabled

    set_disabled(session, args.name, True)
    return f"disabled {args.name}: log-in, sessions and tokens refused until 'users enable'"


def _users_enable(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import set_disabled

    set_disabled(session, args.name, False)
    return f"enabled {args.name}"


def _users_password(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import set_password

    change = set_password(session, args.name, _read_password(args), keep_tokens=args.keep_tokens)
    tokens = (
        "API tokens kept" if args.keep_tokens else f"{change.tokens_revoked} API token(s) ended"
    )
    return (
        f"changed the password of {args.name}; "
        f"{change.sessions_revoked} log-in session(s) and {tokens}"
    )


def _users_revoke(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import revoke_tokens

    count = revoke_tokens(session, args.name)
    return f"revoked {count} token(s) and session(s) of {args.name}"


def _users_list(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import list_users

    lines = []
    for user in list_users(session):
        state = " (disabled)" if user.disabled else ""
        lines.append(f"{user.username:<24} {user.role}{state}")
    return "\n".join(lines)


USERS_COMMANDS = {
    "add": _users_add,
    "token": _users_token,
    "disable": _users_disable,
    "enable": _users_enable,
    "password": _users_password,
    "revoke": _users_revoke,
    "list": _users_list,
}


def cmd_users(args: argparse.Namespace) -> int:
    from dicomnode.users import UserError

    settings = settings_of(args)
    # Listing only reads: it never migrates a database an older node may still run on.
    opened = reading_sessions if args.users_command == "list" else database_sessions
    with opened(settings)() as session:
        try:
            output = USERS_COMMANDS[args.users_command](session, args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.users_command != "list":
            _audit_users_command(session, args)
        session.commit()
    if output:
        print(output)
    return 0


def _audit_users_command(session: Session, args: argparse.Namespace) -> None:
    """Record a change to the web users in the audit log, in its transaction: action
    ``user_<command>``, actor the operating-system account that ran it (no secret)."""
    import getpass

    from dicomnode.db.session import utcnow
    from dicomnode.worklist import audit

    detail = f"user {args.name}"
    if args.users_command == "add":
        detail += f", role {args.role}"
    elif args.users_command == "token":
        detail += f", {args.days:g} days" if args.days else ", no expiry"
    audit.record(
        session, f"cli:{getpass.getuser()}", f"user_{args.users_command}", utcnow(), detail=detail
    )
