"""Destinations that do not answer, as this process has seen them: how often a failed export
attempt to one is a WARNING.

Export jobs are batched per study, so while a destination is down each study waiting for it
fails an attempt per retry round: N studies made N WARNINGs a round. An outage is warned of
at its first failed attempt, then at most once per :data:`OUTAGE_WARNING_SECONDS` (that
WARNING says how many attempts failed since the last one); the attempts between are logged
at INFO, each study's as before. An attempt that sends an object ends the outage.

The limit is per worker process: with ``[worker] count = N`` (or N stand-alone workers) an
outage is warned of up to N times a minute, each line with its process's counts. Sharing it
would take a table or a file that every worker on every host writes for a log line; N is
small, and the counter ``dicomnode_export_attempts_failed_total`` counts every attempt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from dicomnode.db.session import utcnow

# At most one WARNING per destination in this many seconds while it stays unreachable.
OUTAGE_WARNING_SECONDS = 60.0


@dataclass
class Outage:
    """A destination unreachable since its first failed attempt (``since``, UTC)."""

    since: datetime
    attempts: int  # failed attempts since then
    warned_at: float  # clock time of the last WARNING
    unwarned: int = 0  # failed attempts since the last WARNING (logged at INFO)


@dataclass(frozen=True)
class OutageWarning:
    """A failed attempt to warn of: the outage's counts as of this attempt."""

    since: datetime
    attempts: int
    unwarned: int  # failed attempts logged at INFO since the last WARNING

    def summary(self) -> str:
        """What a WARNING adds about the outage, empty at its first failed attempt."""
        if self.attempts == 1:
            return ""
        return (
            f"; failing since {self.since.isoformat(timespec='seconds')}: {self.attempts} "
            f"failed attempt(s), {self.unwarned} of them since the last warning (at INFO)"
        )


class Outages:
    """Per destination (by name), the outage going on; shared by a worker's job threads."""

    def __init__(
        self,
        interval: float = OUTAGE_WARNING_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._outages: dict[str, Outage] = {}

    def failed(self, destination: str) -> OutageWarning | None:
        """Count a failed attempt to reach ``destination``: an OutageWarning when it is to be logged
        as one (the outage's first attempt, or the first after ``interval`` seconds without
        a warning), None when at INFO."""
        now = self.clock()
        with self._lock:
            outage = self._outages.get(destination)
            if outage is None:
                outage = self._outages[destination] = Outage(utcnow(), attempts=1, warned_at=now)
                return OutageWarning(outage.since, attempts=1, unwarned=0)
            outage.attempts += 1
            if now - outage.warned_at < self.interval:
                outage.unwarned += 1
                return None
            warning = OutageWarning(outage.since, outage.attempts, outage.unwarned)
            outage.warned_at, outage.unwarned = now, 0
            return warning

    def answered(self, destination: str) -> Outage | None:
        """End ``destination``'s outage, as an attempt sent an object; returns it, None when
        none was going on."""
        with self._lock:
            return self._outages.pop(destination, None)

    def keep_only(self, destinations: set[str]) -> None:
        """Forget the outages of destinations no longer configured: one configured again
        under that name starts afresh."""
        with self._lock:
            for name in set(self._outages) - destinations:
                del self._outages[name]
