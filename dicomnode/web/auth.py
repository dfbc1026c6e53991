"""Who is asking: bearer tokens for the API, session cookies for the page, CSRF for both.

A request is authenticated by ``Authorization: Bearer <token>`` (from ``dicomnode users
token`` or ``POST /api/login``) or by the session cookie the log-in form sets. A browser
sends cookies on its own, so a state-changing request that relies on the cookie must also
carry the CSRF token the page was given (header ``X-CSRF-Token``, or form field
``csrf_token``); it is derived from the session token with HMAC, so only a page that was
served to this session knows it. Bearer requests need no CSRF token: browsers never add
that header on their own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.session import utcnow
from dicomnode.users import Principal, principal_for_token

SESSION_COOKIE = "dicomnode_session"
LOGIN_CSRF_COOKIE = "dicomnode_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_LIFETIME = timedelta(hours=12)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(auto_error=False, description="token from `dicomnode users token`")
cookie_scheme = APIKeyCookie(
    name=SESSION_COOKIE, auto_error=False, description="session cookie from the log-in page"
)


@dataclass(frozen=True)
class Caller:
    """An authenticated request: the user and the token it came with (bearer or cookie)."""

    principal: Principal
    token: str
    by_cookie: bool = False

    @property
    def csrf_token(self) -> str:
        return session_csrf(self.token) if self.by_cookie else ""


class NotLoggedIn(HTTPException):
    """No valid token or session; pages answer with a redirect to the log-in page."""

    def __init__(self) -> None:
        super().__init__(
            status.HTTP_401_UNAUTHORIZED,
            "log in first: send Authorization: Bearer <token> or use the log-in page",
            headers={"WWW-Authenticate": "Bearer"},
        )


def session_csrf(session_token: str) -> str:
    """The CSRF token that belongs to a session token."""
    return hmac.new(session_token.encode(), b"dicomnode-csrf", hashlib.sha256).hexdigest()


def new_login_csrf() -> str:
    """A random double-submit token for the log-in form (there is no session yet)."""
    return secrets.token_urlsafe(24)


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison that treats a missing value as wrong."""
    return bool(given) and bool(expected) and hmac.compare_digest(given, expected)


def authenticator(sessions: sessionmaker[Session]) -> Callable[..., Caller]:
    """A FastAPI dependency that resolves the caller, or answers 401 / 403."""

    def caller(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
        cookie: Annotated[str | None, Depends(cookie_scheme)],
    ) -> Caller:
        now = utcnow()
        with sessions() as session:
            if bearer is not None:
                principal = principal_for_token(session, bearer.credentials, now, kind="api")
                if principal is None:
                    raise NotLoggedIn()
                return Caller(principal, bearer.credentials)
            if cookie:
                principal = principal_for_token(session, cookie, now, kind="session")
                if principal is not None:
                    found = Caller(principal, cookie, by_cookie=True)
                    if request.method not in SAFE_METHODS and not same_secret(
                        request.headers.get(CSRF_HEADER), found.csrf_token
                    ):
                        raise HTTPException(
                            status.HTTP_403_FORBIDDEN,
                            f"CSRF check failed: send the page's token in {CSRF_HEADER}",
                        )
                    return found
        raise NotLoggedIn()

    return caller


def admin_only(caller: Caller) -> Caller:
    """The caller if an admin, else 403."""
    if not caller.principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin may do this")
    return caller
