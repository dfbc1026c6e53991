"""Local users (radiologist, admin) with Argon2id password hashes, and their opaque tokens.

Tokens are 256-bit random strings shown once; the database keeps only their SHA-256, which
is enough for a secret of that entropy (a slow hash is for guessable passwords).
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from dicomnode.db.models import ApiToken, User
from dicomnode.db.session import as_utc

ROLES = ("radiologist", "admin")
MIN_PASSWORD_LENGTH = 8
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TOKEN_PREFIX = "dn_"

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so that a wrong name costs as long as
    a wrong password and response times do not reveal which accounts exist. Made on first
    use, not at import: each ``dicomnode`` command that imports this module paid ~0.2 s."""
    return _hasher.hash(secrets.token_urlsafe(16))


class UserError(ValueError):
    """A user or token request that cannot be done; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is making a request: the user's name and role."""

    username: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _principal(user: User) -> Principal:
    return Principal(user.username, user.role)


def add_user(session: Session, username: str, role: str, password: str, now: datetime) -> User:
    """Create a local user with a salted Argon2id password hash (the caller commits)."""
    if not USERNAME.match(username):
        raise UserError(
            f"user name {username!r} is not allowed: use 1-64 lower-case letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    if role not in ROLES:
        raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
    _check_password(password)
    if session.scalars(select(User.id).where(User.username == username)).first() is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, role=role, password_hash=_hasher.hash(password), created_at=now)
    session.add(user)
    session.flush()
    return user


def _user(session: Session, username: str) -> User:
    """The user by name; raises UserError if there is none."""
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise UserError(f"no user {username!r}; add one with `dicomnode users add`")
    return user


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")


def set_disabled(session: Session, username: str, disabled: bool) -> User:
    """Disable a user (log-in, sessions and tokens refused) or enable them again (the caller
    commits); their tokens are kept, so that enabling restores them."""
    user = _user(session, username)
    user.disabled = disabled
    session.flush()
    return user


@dataclass(frozen=True)
class PasswordChange:
    """What a new password ended: the user's log-in sessions, and API tokens unless kept."""

    user: User
    sessions_revoked: int
    tokens_revoked: int


def set_password(
    session: Session, username: str, password: str, *, keep_tokens: bool = False
) -> PasswordChange:
    """Give a user a new password (the caller commits). Their log-in sessions end, and so do
    their API tokens unless ``keep_tokens``: whoever knew the old password may have one."""
    user = _user(session, username)
    _check_password(password)
    user.password_hash = _hasher.hash(password)
    revoked = {"session": 0, "api": 0}
    for kind in ("session",) if keep_tokens else ("session", "api"):
        query = delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == kind)
        revoked[kind] = session.execute(query).rowcount
    session.flush()
    return PasswordChange(user, revoked["session"], revoked["api"])


def revoke_tokens(session: Session, username: str) -> int:
    """Forget every API token and log-in session of a user; how many (the caller commits)."""
    user = _user(session, username)
    revoked = session.execute(delete(ApiToken).where(ApiToken.user_id == user.id))
    return revoked.rowcount


def list_users(session: Session) -> list[User]:
    """All local users by name."""
    return list(session.scalars(select(User).order_by(User.username)))


def authenticate(session: Session, username: str, password: str) -> Principal | None:
    """The user if the password is right and the account enabled, else None (may commit)."""
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    try:
        _hasher.verify(user.password_hash if user else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
        session.commit()
    return _principal(user)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(
    session: Session,
    username: str,
    now: datetime,
    *,
    kind: str = "api",
    lifetime: timedelta | None = None,
) -> str:
    """A new token for the user (shown once; only its hash is stored; the caller commits)."""
    user = _user(session, username)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiToken(
            user_id=user.id,
            token_hash=_digest(token),
            kind=kind,
            created_at=now,
            expires_at=now + lifetime if lifetime else None,
        )
    )
    session.flush()
    return token


def principal_for_token(
    session: Session, token: str, now: datetime, kind: str | None = None
) -> Principal | None:
    """The enabled user a live token belongs to, or None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    query = select(ApiToken.expires_at, User.username, User.role, User.disabled).join(
        User, User.id == ApiToken.user_id
    )
    query = query.where(ApiToken.token_hash == _digest(token))
    if kind is not None:
        query = query.where(ApiToken.kind == kind)
    row = session.execute(query).first()
    if row is None or row.disabled:
        return None
    if row.expires_at is not None and as_utc(row.expires_at) <= now:
        return None
    return Principal(row.username, row.role)


def revoke_token(session: Session, token: str, kind: str | None = None) -> None:
    """Forget a token (log-out), if given only one of that kind; the caller commits."""
    query = delete(ApiToken).where(ApiToken.token_hash == _digest(token))
    if kind is not None:
        query = query.where(ApiToken.kind == kind)
    session.execute(query)
