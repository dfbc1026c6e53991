"""The leases of the jobs a worker process runs, renewed while they run.

A claim leases a job for ``[worker] lease_seconds``; a job whose lease runs out is claimed
again by any worker (its worker died, on this host or another). Without renewal a job that
ran longer than its lease was run twice at once (two workers, duplicate result objects), and
a lease long enough for the longest job kept a dead worker's jobs for as long. One thread
per worker process renews the leases of all the jobs it runs every ``lease_seconds / 3``
(one UPDATE, :func:`dicomnode.jobs.queue.renew`), so a job is taken over only when its
worker stopped renewing it: a worker that died, or one so stalled that it missed two
renewals in a row. The thread sleeps without a timeout while the process runs no job (an
idle worker is not woken by it).

A job that has run longer than ``[worker] max_job_seconds`` is no longer renewed (one
ERROR): another worker takes it over when its lease runs out, as any job of a hung worker
was before leases were renewed (a wedged device call, a deadlock); renewals would else keep
it from every other worker for as long as its process lives.

A job another worker took over all the same is no longer renewed (the UPDATE renews only
the leases its owner still holds), and its worker learns it when it records the job's
outcome, as before (``lease expired while running; another worker owns it``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.jobs.queue import renew
from dicomnode.outage import OutageLog, database_reason, database_unavailable

log = logging.getLogger("dicomnode.worker")

# Renewals per lease: a job's lease survives one renewal that fails or comes late.
RENEWALS_PER_LEASE = 3
# A renewal that failed (the database busy or down) is tried again this soon, not a third of
# a lease later: on SQLite one that waited out the busy timeout (30 s) would else let the
# lease end before the next.
RETRY_SECONDS = 1.0
# While renewals fail, the failure again at most this often (as the job threads' outage).
REMINDER_SECONDS = 60.0


class LeaseRenewer:
    """Renews, every ``lease_seconds() / 3``, the leases ``owner()`` holds of the jobs that
    :meth:`running` registers, from a thread of its own (:meth:`start`, :meth:`stop`). Both
    are read at each renewal (a reload may change the lease; the worker's owner is its
    attribute)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        owner: Callable[[], str],
        lease_seconds: Callable[[], float],
        max_job_seconds: Callable[[], float] = lambda: float("inf"),
    ) -> None:
        self.sessions = sessions
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.max_job_seconds = max_job_seconds
        # Job ids running now (a count: a job id registered twice, e.g. a test's second run),
        # when each was registered (monotonic), and those no longer renewed (run too long).
        self._running: Counter[int] = Counter()
        self._since: dict[int, float] = {}
        self._given_up: set[int] = set()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._trouble = OutageLog(log, remind_seconds=REMINDER_SECONDS)

    def start(self) -> LeaseRenewer:
        self._stopping = False
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (the thread ends; the leases of jobs still running run out)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @contextmanager
    def running(self, job_ids: Iterable[int]) -> Iterator[None]:
        """Renew the leases of ``job_ids`` (claimed just now) until the block ends."""
        ids = list(job_ids)
        with self._changed:
            self._running.update(ids)
            now = time.monotonic()
            for job_id in ids:
                self._since.setdefault(job_id, now)
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._running.subtract(ids)
                self._running = +self._running  # drops the ids whose count is 0
                for job_id in ids:
                    if job_id not in self._running:
                        self._since.pop(job_id, None)
                        self._given_up.discard(job_id)

    def running_ids(self) -> list[int]:
        with self._changed:
            return sorted(self._running)

    def _renew_loop(self) -> None:
        retry = False
        while True:
            with self._changed:
                # No job: sleep until one is claimed (or the stop), without a timeout.
                while not self._running and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                # A job just claimed has a fresh lease: its first renewal is due a third of a
                # lease later (the others' at the latest then too); a failed renewal is tried
                # again within RETRY_SECONDS.
                period = self.lease_seconds() / RENEWALS_PER_LEASE
                deadline = time.monotonic() + (min(period, RETRY_SECONDS) if retry else period)
                while not self._stopping and (left := deadline - time.monotonic()) > 0:
                    self._changed.wait(left)
                    # A job claimed meanwhile under a shorter lease (a reload shortened it)
                    # is renewed within a third of that.
                    period = self.lease_seconds() / RENEWALS_PER_LEASE
                    deadline = min(deadline, time.monotonic() + period)
                if self._stopping:
                    return
                ids = self._still_renewed()
            retry = not self.renew_now(ids)

    def _still_renewed(self) -> list[int]:
        """The running jobs whose leases are renewed: not those that have run longer than
        ``max_job_seconds`` (one ERROR each), which another worker then takes over when
        their leases run out, as it did a hung job's before leases were renewed."""
        limit = self.max_job_seconds()
        now = time.monotonic()
        ids = []
        for job_id in sorted(self._running):
            ran = now - self._since.get(job_id, now)
            if ran <= limit:
                ids.append(job_id)
            elif job_id not in self._given_up:
                self._given_up.add(job_id)
                log.error(
                    "job %d has run for %.0f s, longer than [worker] max_job_seconds (%g): its "
                    "lease is no longer renewed, so another worker takes it over when the lease "
                    "runs out (this one may hang; restart the worker if it does)",
                    job_id,
                    ran,
                    limit,
                )
        return ids

    def renew_now(self, ids: list[int]) -> bool:
        """Renew the leases of ``ids`` now; False if that failed: the failure is logged
        (WARNING when renewals start to fail, a reminder while they go on) and the renewal
        is tried again within RETRY_SECONDS."""
        if not ids:
            return True
        try:
            with self.sessions() as session:
                renewed = renew(session, self.owner(), ids, self.lease_seconds())
        except Exception as exc:
            reason = database_reason(exc) if database_unavailable(exc) else repr(exc)
            self._trouble.failed(
                "leases of running jobs %s not renewed: %s; another worker takes a job over "
                "once its lease runs out; trying again in %.0f s",
                ", ".join(map(str, ids)),
                reason,
                RETRY_SECONDS,
            )
            log.debug("lease renewal failed", exc_info=exc)
            return False
        self._trouble.ended("leases of running jobs renewed again after %(seconds).0f s")
        log.debug("renewed %d of %d lease(s) of running jobs", renewed, len(ids))
        return True
