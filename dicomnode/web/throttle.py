"""Log-in throttling: failed attempts per client address and per user name, and a cap on
how many Argon2 password checks run at once.

After ``USER_LIMIT`` failures for one user name (or ``ADDRESS_LIMIT`` from one client
address; IPv6 clients are grouped by their /64) within ``WINDOW`` seconds, log-in for that
name (or from that address) is refused with 429 and ``Retry-After`` for ``BASE_LOCKOUT``
seconds; each further failure once that ends doubles the wait, up to ``MAX_LOCKOUT``. A
successful log-in clears the user name's count (not the address's, so that one's own
account cannot be used to reset it). A refused attempt costs no password hash. Names that
do not exist are counted as well, so that a 429 does not tell which accounts exist.

The counts live in this web process's memory (one ``LoginThrottle`` per app), at most
``MAX_ENTRIES`` of each kind: entries whose window and lockout have passed are dropped
first, then the least recently failed ones.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.session import utcnow
from dicomnode.users import Principal, authenticate
from dicomnode.worklist import audit

WINDOW = 15 * 60.0
USER_LIMIT = 5
ADDRESS_LIMIT = 20
BASE_LOCKOUT = 60.0
MAX_LOCKOUT = 60 * 60.0
MAX_ENTRIES = 10_000

# At most this many password hashes (about 64 MiB and 130 ms of one core each) at once;
# more log-ins wait for a turn, up to HASH_WAIT seconds, and are then told to retry.
HASH_SLOTS = 2
HASH_WAIT = 15.0
_hash_slots = threading.BoundedSemaphore(HASH_SLOTS)


class HashingBusy(Exception):
    """No password-hash slot came free in time."""


@contextmanager
def hashing_slot() -> Iterator[None]:
    """Hold one of the process's password-hash slots; HashingBusy if none frees in time."""
    if not _hash_slots.acquire(timeout=HASH_WAIT):
        raise HashingBusy()
    try:
        yield
    finally:
        _hash_slots.release()


@dataclass
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    strikes: int = 0
    locked_until: float = 0.0
    last: float = 0.0


class _Counter:
    """Failure counts for one kind of key (user name or client address)."""

    def __init__(self, limit: int, max_entries: int) -> None:
        self.limit = limit
        self.max_entries = max_entries
        self.entries: OrderedDict[str, _Entry] = OrderedDict()

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.last > WINDOW and entry.locked_until <= now

    def retry_after(self, key: str, now: float) -> float:
        entry = self.entries.get(key)
        if entry is None:
            return 0.0
        if self._expired(entry, now):
            del self.entries[key]
            return 0.0
        return max(0.0, entry.locked_until - now)

    def fail(self, key: str, now: float) -> None:
        entry = self.entries.get(key)
        if entry is not None and self._expired(entry, now):
            del self.entries[key]
            entry = None
        if entry is None:
            entry = self.entries[key] = _Entry(last=now)
            self._evict(now)
        self.entries.move_to_end(key)
        entry.last = now
        while entry.failures and now - entry.failures[0] > WINDOW:
            entry.failures.popleft()
        entry.failures.append(now)
        # Only the last `limit` failures matter; the deque stays small.
        while len(entry.failures) > self.limit:
            entry.failures.popleft()
        if len(entry.failures) >= self.limit:
            entry.strikes += 1
            lockout = min(BASE_LOCKOUT * 2 ** (entry.strikes - 1), MAX_LOCKOUT)
            entry.locked_until = max(entry.locked_until, now + lockout)

    def clear(self, key: str) -> None:
        self.entries.pop(key, None)

    def _evict(self, now: float) -> None:
        if len(self.entries) <= self.max_entries:
            return
        for key in [k for k, e in self.entries.items() if self._expired(e, now)]:
            del self.entries[key]
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


def address_key(host: str | None) -> str:
    """The client address a count is kept for: IPv4 as is, IPv6 by its /64."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LoginThrottle:
    """Failed log-ins per user name and per client address, and who must wait how long."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._users = _Counter(USER_LIMIT, max_entries)
        self._addresses = _Counter(ADDRESS_LIMIT, max_entries)

    def retry_after(self, host: str | None, username: str) -> int:
        """Whole seconds this log-in must wait (0: it may try now)."""
        now = self.clock()
        with self._lock:
            wait = max(
                self._users.retry_after(username, now),
                self._addresses.retry_after(address_key(host), now),
            )
        return math.ceil(wait)

    def failed(self, host: str | None, username: str) -> None:
        """Count a wrong user name or password."""
        now = self.clock()
        with self._lock:
            self._users.fail(username, now)
            self._addresses.fail(address_key(host), now)

    def succeeded(self, username: str) -> None:
        """A right password: the user name's failures are forgotten."""
        with self._lock:
            self._users.clear(username)

    def __len__(self) -> int:
        with self._lock:
            return len(self._users.entries) + len(self._addresses.entries)


_created = threading.Lock()


def login_throttle(app: FastAPI) -> LoginThrottle:
    """The app's throttle (made on first use), shared by the API's and the page's log-in."""
    with _created:
        throttle = getattr(app.state, "login_throttle", None)
        if throttle is None:
            throttle = app.state.login_throttle = LoginThrottle()
        return throttle


def wait_text(seconds: int) -> str:
    """'30 seconds', '2 minutes' for a message."""
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    return f"{math.ceil(seconds / 60)} minutes"


@dataclass(frozen=True)
class LoginAttempt:
    """What a log-in came to: the user, or how long to wait (throttled or busy), or neither
    (wrong user name or password)."""

    principal: Principal | None = None
    retry_after: int = 0
    busy: bool = False


def attempt_login(
    sessions: sessionmaker[Session],
    throttle: LoginThrottle,
    host: str | None,
    username: str,
    password: str,
    where: str,
) -> LoginAttempt:
    """Check a user name and password unless the name or the address must wait; a failed or
    refused attempt is audited as ``login_failed`` (the name, never the password), a right
    one is left for the caller to record with its session or token."""
    name = username[:64]
    wait = throttle.retry_after(host, name)
    if not wait:
        try:
            with hashing_slot():
                # Others may have failed for this name while this one waited for its turn.
                wait = throttle.retry_after(host, name)
                if not wait:
                    with sessions() as session:
                        principal = authenticate(session, username, password)
        except HashingBusy:
            return LoginAttempt(retry_after=5, busy=True)
    if wait:
        with sessions() as session:
            audit.record(session, name, "login_failed", utcnow(), detail=f"{where}, throttled")
            session.commit()
        return LoginAttempt(retry_after=wait)
    if principal is None:
        throttle.failed(host, name)
        with sessions() as session:
            audit.record(session, name, "login_failed", utcnow(), detail=where)
            session.commit()
        return LoginAttempt()
    throttle.succeeded(name)
    return LoginAttempt(principal)
