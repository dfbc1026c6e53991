"""Export jobs: each sends one result object to a configured destination (``[[destinations]]``).

The worker claims an export job and, in the same transaction (:data:`TOGETHER`), the study's
other queued exports to the same destination (also those still waiting out a backoff after it
was unreachable, so that a study's exports stay together through an outage), and hands them
here: they go over one association (up to :data:`EXPORTS_PER_ASSOCIATION`), each job
completed or failed on its own, and a failed attempt is logged in one line for all of them.
Another worker or thread claiming at the same time never takes some of them for an
association of its own. A destination that is down or out of
resources is waited for (its exports back off and stay queued) and warned of at most once a
minute, however many studies wait for it (:mod:`dicomnode.export.outages`); one no longer
configured has its exports dead-lettered at once, as the worker starts, after each reload
and when one is tried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.config import Destination, Settings
from dicomnode.db.models import Job, ResultObject
from dicomnode.db.session import READ_ONLY, as_utc, utcnow
from dicomnode.export.outages import Outages
from dicomnode.export.scu import (
    DestinationOutOfResources,
    DestinationUnavailable,
    ExportError,
    describe,
    send_files,
)
from dicomnode.jobs.dead_letters import covering_jobs
from dicomnode.jobs.queue import (
    BACKOFF_MAX_SECONDS,
    Together,
    backoff_seconds,
    dead_letter,
    dead_letter_queued,
    hasten,
    postpone,
    queued_seconds,
)
from dicomnode.logs import without_patient_data
from dicomnode.outage import database_reason, database_unavailable
from dicomnode.results.rejection import AFTER, hasten_notes

# The worker's lines: operators and their log filters know them by this name.
log = logging.getLogger("dicomnode.worker")

# Result objects of one study sent to a destination over one association, at most.
EXPORTS_PER_ASSOCIATION = 32

# What a failed export's reason ends with where a 0xA7xx (out of resources) answer was taken
# for a refusal of its object (:meth:`ExportJobs._refusals_of_one_object`).
REFUSED_WHILE_STORING = "a refusal of this object while the destination stores others"


class JobRecorder(Protocol):
    """What export jobs need of the worker that runs them: its settings as of now (a reload
    replaces them), its name as the jobs' owner, its database sessions, and how it records a
    job done or a failed attempt."""

    settings: Settings
    owner: str
    sessions: sessionmaker[Session]

    def record_done(
        self, session: Session, job: Job, seconds: dict[str, float], detail: str, started: float
    ) -> None: ...

    def record_failed_attempt(
        self, session: Session, job: Job, reason: str, unreachable: bool
    ) -> bool: ...

    def study_patient_values(self, session: Session, study_id: int | None) -> set[str]: ...


class ExportJobs:
    """Runs the export jobs a worker claims, and dead-letters those no destination takes."""

    def __init__(self, worker: JobRecorder) -> None:
        self.worker = worker
        # Destinations this worker found unreachable, for how often it warns of them.
        self.outages = Outages()

    def run(self, session: Session, job: Job, companions: Sequence[Job], started: float) -> None:
        """Send the job's result object to its destination, together with its ``companions``,
        the study's other queued exports to that destination (due or still backing off) claimed
        with it (:data:`TOGETHER`), over one association (up to
        :data:`EXPORTS_PER_ASSOCIATION`); each of those jobs is completed or failed on its own,
        and a failed attempt is logged in one line for all of them. Jobs whose destination is
        no longer configured are dead-lettered (:meth:`dead_letter_unrouted_exports`).

        An attempt that fails counts once in ``dicomnode_export_attempts_failed_total``, also
        when it raises (a database error, a bug: the worker then records the job's failure),
        and each job it leaves unsent once in ``dicomnode_export_failures_total``: the claimed
        one too when the attempt raised, unless it was counted before."""
        failed = True  # until the attempt ends with nothing left unsent
        counted: set[int] = set()  # the jobs counted in dicomnode_export_failures_total
        # Read now: after a rollback, reading them again may fail as the attempt did.
        companion_ids = [other.id for other in companions]
        try:
            failed = self._attempt(session, job, companions, started, counted)
        except Exception as exc:
            # The worker records the claimed job's failure, and it counts here: once, also
            # when the attempt raised after its failures were counted.
            if job.id not in counted:
                metrics.EXPORT_FAILURES.labels(job.payload.get("destination", "")).inc()
            self._companions_failed(session, job, companion_ids, exc, counted)
            raise
        finally:
            if failed:
                metrics.EXPORT_ATTEMPTS_FAILED.labels(job.payload.get("destination", "")).inc()

    def _companions_failed(
        self,
        session: Session,
        job: Job,
        companion_ids: list[int],
        exc: Exception,
        counted: set[int],
    ) -> None:
        """After an attempt that raised, record the failed attempt of the companions (by id)
        still leased to this worker (the worker records the claimed job's), each not sent
        counted once, so that they are retried with it rather than when their leases end.
        Best effort: what raised may be the database, and then their leases end."""
        left = [job_id for job_id in companion_ids if job_id not in counted]
        if not left:
            return
        try:
            session.rollback()
            known = self.worker.study_patient_values(session, job.study_id)
            reason = without_patient_data(_reason(exc), known)
            for job_id in left:
                other = session.get(Job, job_id)
                if other is not None and self.worker.record_failed_attempt(
                    session, other, reason, unreachable=False
                ):
                    metrics.EXPORT_FAILURES.labels(other.payload.get("destination", "")).inc()
                    counted.add(job_id)
        except Exception as failure:
            session.rollback()
            log.warning(
                "export jobs %s, claimed with another that failed, are tried again when their "
                "leases end: %s",
                _id_list(left),
                database_reason(failure),
                exc_info=not database_unavailable(failure),
            )

    def _attempt(
        self,
        session: Session,
        job: Job,
        companions: Sequence[Job],
        started: float,
        counted: set[int],
    ) -> bool:
        """:meth:`run`'s attempt; whether it left objects unsent. ``counted`` gets the ids of
        the jobs counted as not sent."""
        worker = self.worker
        name = job.payload["destination"]
        destination = next((d for d in worker.settings.destinations if d.name == name), None)
        if destination is None:
            for other in companions:
                other.attempts -= 1  # taken along, never tried: as a queued one is buried
            self.dead_letter_unrouted_exports(session, claimed=[job, *companions])
            return False
        batch = [job, *companions]
        queued = {other.id: queued_seconds(other) for other in batch}
        base = worker.settings.worker.backoff_base_seconds
        previous = {other.id: (_last_failed_at(other, base), other.last_error) for other in batch}
        rows = {other.id: session.get(ResultObject, other.payload["result_id"]) for other in batch}
        # Rejection notes whose superseding objects have not all reached the destination yet:
        # not sent now, put back without using an attempt (not a failure of the destination).
        held = _notes_waiting(session, batch, base)
        for job_id in held:
            rows[job_id] = None
        # The jobs whose result objects still exist (by id), and their files in that order.
        kinds = {job_id: row.kind for job_id, row in rows.items() if row is not None}
        paths = [Path(row.path) for row in rows.values() if row is not None]
        # End the read transaction: on SQLite it holds the write lock, which ingest needs
        # while the transfer runs.
        session.commit()
        try:
            sent = send_files(
                paths,
                destination,
                worker.settings.node.ae_title,
                destination.timeout_seconds,
                worker.settings.base_dir,
            )
        except Exception as exc:  # no association: every job of it fails alike
            outcomes: dict[int, Exception | None] = dict.fromkeys(kinds, exc)
        else:
            outcomes = dict(zip(kinds, sent, strict=True))
            # Before any other statement of this session: it may begin a read transaction.
            self._refusals_of_one_object(session, name, outcomes, previous)
            # Not when it answers but stores nothing (out of resources: its disk is full).
            if any(outcome is None for outcome in sent):
                self._answered(session, job, name)
        failed = {job_id: exc for job_id, exc in outcomes.items() if exc is not None}
        more = f", {len(companions)} more in the same association" if companions else ""
        sent_ok = []
        for other in batch:
            if other.id in held:
                self._put_back_note(session, other, name, *held[other.id])
                continue
            if other.id in failed:
                continue
            if other.id not in kinds:
                detail = "result no longer exists"
            elif other is job:
                detail = f"{kinds[job.id]} -> {name}{more}"
            else:
                detail = f"{kinds[other.id]} -> {name} (with job {job.id})"
            worker.record_done(session, other, {"queued": queued[other.id]}, detail, started)
            sent_ok.append(other)
        if failed:
            self._record_failures(session, destination, batch, failed, started, counted)
        if sent_ok:
            _hasten_notes_after(session, sent_ok)
        return bool(failed)

    def _put_back_note(
        self, session: Session, job: Job, name: str, seconds: float, dead: str | None
    ) -> None:
        """Queue the rejection note ``job`` again ``seconds`` from now, no attempt used: an
        export it waits for is not done (``dead``: why, where one is dead-lettered). Not a
        failure of the destination (no failure counted, nothing at WARNING); the export it
        waits for makes it due again once sent or retried (:func:`hasten_notes`). A note held
        by a dead export is logged at INFO once (its ``last_error`` says why meanwhile)."""
        first = dead is not None and job.last_error != dead
        if dead is not None:
            job.last_error = dead
        if not postpone(session, job, seconds, owner=self.worker.owner):
            return
        log.log(
            logging.INFO if first else logging.DEBUG,
            "job %d export study_id=%d: rejection note to %s postponed %.0f s: %s",
            job.id,
            job.study_id,
            name,
            seconds,
            dead
            or "the objects that supersede what it rejects are not at the destination yet; it "
            "goes once they are",
        )

    def _refusals_of_one_object(
        self,
        session: Session,
        name: str,
        outcomes: dict[int, Exception | None],
        previous: dict[int, tuple[datetime | None, str]],
    ) -> None:
        """Take the 0xA7xx (out of resources) answers of this association (``outcomes`` in
        the order sent) for refusals of their objects where the destination stores other
        objects meanwhile: one sent after it in this association, another export to it done
        since the object's last failed attempt, or its last attempt was such a refusal
        already (``previous``: per job, when its last attempt failed and why). A PACS filter
        that refuses one SOP class answers so; taken for a full disk, the object was retried
        for ever, never dead-lettered, and held back the objects after it. Such an answer then
        uses one of the object's attempts (an ExportError replaces it in ``outcomes``); one
        the destination answers while it stores nothing (its disk full, also where it filled
        in the middle of this association) still waits as for a destination that is down."""
        order = list(outcomes)
        full = [i for i in order if isinstance(outcomes[i], DestinationOutOfResources)]
        if not full:
            return
        refused = {
            job_id
            for job_id in full
            if REFUSED_WHILE_STORING in previous[job_id][1]
            or any(outcomes[later] is None for later in order[order.index(job_id) + 1 :])
        }
        failed_at = {
            job_id: when
            for job_id in full
            if job_id not in refused and (when := previous[job_id][0]) is not None
        }
        if failed_at:
            latest = _latest_stored(session, name, min(failed_at.values()))
            if latest is not None:
                refused |= {job_id for job_id, when in failed_at.items() if when < latest}
        for job_id in refused:
            outcomes[job_id] = ExportError(f"{outcomes[job_id]}, {REFUSED_WHILE_STORING}")

    def _answered(self, session: Session, job: Job, name: str) -> None:
        """The destination took an object: its outage ends, and what waits out its backoff
        for it goes now (looked for when this job or this worker saw it fail)."""
        outage = self.outages.answered(name)
        if job.attempts <= 1 and outage is None:
            return
        hastened = hasten(session, "export", lambda other: other.payload.get("destination") == name)
        if not hastened and outage is None:
            return
        log.info(
            "destination %s answers again%s%s",
            name,
            f": {hastened} waiting export(s) due now" if hastened else "",
            f"; failing since {outage.since.isoformat(timespec='seconds')}, "
            f"{outage.attempts} failed attempt(s)"
            if outage is not None
            else "",
        )

    def _record_failures(
        self,
        session: Session,
        destination: Destination,
        batch: list[Job],
        failed: dict[int, Exception],
        started: float,
        counted: set[int],
    ) -> None:
        """Record the failed jobs of one association's batch (each retried later with backoff,
        or dead-lettered) and log the attempt in one line: the destination, why, how many
        exports wait for it and when it is tried next. A destination that is down logged a
        WARNING per object and attempt (~15 a study); each job's reason is at DEBUG."""
        where = describe(destination)
        study_id = batch[0].study_id
        known = self.worker.study_patient_values(session, study_id)
        reasons: dict[int, str] = {}
        recorded = []
        for job in batch:
            if job.id not in failed:
                continue
            exc = failed[job.id]
            metrics.EXPORT_FAILURES.labels(destination.name).inc()
            counted.add(job.id)
            reason = without_patient_data(_reason(exc), known)
            log.debug(
                "job %d export study_id=%d attempt %d failed: %s",
                job.id,
                study_id,
                job.attempts,
                reason,
            )
            unreachable = isinstance(exc, DestinationUnavailable)
            if self.worker.record_failed_attempt(session, job, reason, unreachable):
                recorded.append(job)
                reasons[job.id] = reason.replace(f"{where}: ", "")
        if not recorded:
            return  # taken over by another worker, which logs its own attempt
        # A destination down (or out of resources) for every object is warned of once a
        # minute at most, however many studies wait for it (the attempts between at INFO).
        down = all(isinstance(exc, DestinationUnavailable) for exc in failed.values())
        outage = self.outages.failed(destination.name) if down else None
        # One read transaction, without SQLite's write lock, for the jobs as recorded and the
        # exports waiting for the destination.
        session.connection(execution_options=READ_ONLY)
        retried = [job for job in recorded if job.state == "queued"]
        attempt = max(job.attempts for job in recorded)
        waiting = sum(
            1
            for payload in session.scalars(
                select(Job.payload).where(Job.kind == "export", Job.state.in_(("queued", "leased")))
            )
            if (payload or {}).get("destination") == destination.name
        )
        next_try = min((as_utc(job.run_after) for job in retried), default=None)
        # A destination down for max_attempts tries: an ERROR says the exports are kept.
        given_up = [
            job
            for job in retried
            if isinstance(failed[job.id], DestinationUnavailable)
            and job.attempts == self.worker.settings.worker.max_attempts
        ]
        session.rollback()
        said = list(dict.fromkeys(reasons.values()))
        if len(said) > 1:
            said = [said[0], f"and {len(said) - 1} other reason(s) (each job's at DEBUG)"]
        when = (
            f"; next try at {next_try.isoformat(timespec='seconds')} "
            f"(in {max(0.0, (next_try - utcnow()).total_seconds()):.0f} s)"
            if next_try is not None
            else ""
        )
        full = all(isinstance(failed[job.id], DestinationOutOfResources) for job in given_up)
        kept = (
            f"; {'out of resources' if full else 'unreachable'} in {attempt} attempts: the "
            f"exports stay queued and are tried again at least every "
            f"{BACKOFF_MAX_SECONDS:.0f} s until it {'takes them' if full else 'answers'}"
            if given_up
            else ""
        )
        quiet = down and outage is None  # a destination down warned of less than a minute ago
        log.log(
            logging.ERROR if given_up else logging.INFO if quiet else logging.WARNING,
            "export to %s failed (attempt %d, %.0f ms): %d of %d object(s) of study_id=%d "
            "not sent: %s; %d export job(s) wait for %s%s%s%s",
            where,
            attempt,
            (time.perf_counter() - started) * 1000,
            len(failed),
            len(batch),
            study_id,
            "; ".join(said),
            waiting,
            destination.name,
            when,
            kept,
            outage.summary() if outage is not None else "",
        )

    def dead_letter_unrouted_exports(self, session: Session, claimed: Sequence[Job] = ()) -> int:
        """Dead-letter now the queued export jobs whose destination is no longer configured
        (removed or renamed before a reload or a restart), and ``claimed``, such jobs this
        worker holds; returns how many. No retry can send them, and marking them done (as
        before) lost the results silently: retention then deleted their study. As dead letters
        they show in ``/api/jobs?state=dead`` and on the worklist, keep their study, and an
        admin retries them once the destination is configured again. One ERROR per
        destination."""
        configured = {d.name for d in self.worker.settings.destinations}
        self.outages.keep_only(configured)

        def reason_of(job: Job) -> str:
            return unconfigured_reason(str(job.payload.get("destination", "")))

        buried = [
            job
            for job in claimed
            if dead_letter(session, job, reason_of(job), owner=self.worker.owner)
        ]
        buried += dead_letter_queued(
            session,
            "export",
            lambda job: job.payload.get("destination") not in configured,
            reason_of,
        )
        if not buried:
            return 0
        session.connection(execution_options=READ_ONLY)
        by_destination: dict[str, list[Job]] = {}
        for job in buried:
            by_destination.setdefault(str(job.payload.get("destination", "")), []).append(job)
        for name, jobs in by_destination.items():
            log.error(
                "%s: %d export job(s) of %d study(ies) dead-lettered, their result objects "
                "not sent (jobs %s; configured destinations: %s); once it is configured again, "
                "retry each with POST /api/jobs/<id>/retry",
                unconfigured_reason(name),
                len(jobs),
                len({job.study_id for job in jobs}),
                _id_list([job.id for job in jobs]),
                ", ".join(sorted(configured)) or "none",
            )
        session.rollback()
        return len(buried)

    def bury_unrouted_exports(self) -> None:
        """:meth:`dead_letter_unrouted_exports` in a session of its own, as the worker starts
        and after each reload; a failure leaves the jobs to be dead-lettered when tried."""
        try:
            with self.worker.sessions() as session:
                self.dead_letter_unrouted_exports(session)
        except Exception as exc:
            log.warning(
                "exports to destinations no longer configured not dead-lettered now (%s); "
                "each will be when it is next tried",
                database_reason(exc),
                exc_info=not database_unavailable(exc),
            )


def _notes_waiting(
    session: Session, batch: Sequence[Job], base: float
) -> dict[int, tuple[float, str | None]]:
    """The rejection notes of ``batch`` (export jobs whose payload names the export jobs they
    come ``after``: those of the objects that supersede what they reject) that must not be
    sent in this association, by job id: for how many seconds to put each back, and why where
    one it waits for is dead-lettered (else None).

    An export it waits for that is queued, running (here, in this very batch, where its
    outcome is not known before the note would go, or by another worker) holds it until that
    one is due again or its lease ends, at least ``base`` (``[worker] backoff_base_seconds``);
    one dead-lettered holds it :data:`BACKOFF_MAX_SECONDS`. Either way the held-for export
    makes the note due again once it is sent or an admin retries it (:func:`hasten_notes`),
    so the note follows it, not polls for it. A dead one that another export of its object
    to the destination covers (:func:`covering_jobs`) counts as that one; one whose object
    was superseded since is no longer waited for. A PACS that hid the old objects before it
    had the new ones would show no AI result at all meanwhile."""
    held: dict[int, tuple[float, str | None]] = {}
    now = utcnow()
    for job in batch:
        after = [int(job_id) for job_id in job.payload.get(AFTER) or ()]
        if not after:
            continue
        pending = list(session.scalars(select(Job).where(Job.id.in_(after), Job.state != "done")))
        dead = [other for other in pending if other.state == "dead"]
        covering = covering_jobs(session, dead)
        waiting = [other for other in pending if other.state != "dead"]
        waiting += [
            cover
            for other in dead
            if isinstance(cover := covering.get(other.id), Job) and cover.state != "done"
        ]
        uncovered = [other.id for other in dead if other.id not in covering]
        if uncovered:
            held[job.id] = (
                BACKOFF_MAX_SECONDS,
                f"waits for the export job(s) {_id_list(uncovered)} of the objects that "
                "supersede what this rejection note rejects, dead-lettered: it goes once "
                "they are retried and sent",
            )
        elif waiting:
            # Until the last of them is due again (a destination that is down: its backoff)
            # or its lease ends (sent meanwhile, it makes the note due at once).
            seconds = [base]
            for other in waiting:
                until = other.run_after if other.state == "queued" else other.lease_expires_at
                if until is not None:
                    seconds.append((as_utc(until) - now).total_seconds())
            held[job.id] = (max(seconds), None)
    return held


def _hasten_notes_after(session: Session, sent: Sequence[Job]) -> None:
    """Make due now the rejection notes that wait for the ``sent`` exports
    (:func:`hasten_notes`), so that a note put back while they ran follows them. Best
    effort: one that stays put back goes at the end of its postponement."""
    try:
        if hasten_notes(session, sent):
            session.commit()
        else:
            session.rollback()
    except Exception as exc:
        session.rollback()
        log.debug("rejection notes not hastened: %s", database_reason(exc))


def _reason(exc: Exception) -> str:
    """A failed export's reason as its job keeps it: the exception's class, then what it
    says (what :func:`_unreachable_last_time` looks for)."""
    return f"{type(exc).__name__}: {exc}"


def _unreachable_last_time() -> ColumnElement[bool]:
    """Export jobs whose last attempt failed because the destination was down or out of
    resources (their ``last_error``, as :func:`_reason` wrote it)."""
    return or_(
        *(
            Job.last_error.startswith(f"{unreachable.__name__}: ")
            for unreachable in (DestinationUnavailable, DestinationOutOfResources)
        )
    )


def _last_failed_at(job: Job, backoff_base: float) -> datetime | None:
    """When a claimed export's last attempt failed, None when it has none (its first, or the
    first since an admin's retry): its ``run_after`` less the backoff that failure set (an
    earlier time where the job was hastened, which a destination that stored an object
    does)."""
    if job.attempts < 2 or not job.last_error:
        return None
    backoff = backoff_seconds(job.attempts - 1, backoff_base)
    return as_utc(job.run_after) - timedelta(seconds=backoff)


def _latest_stored(session: Session, destination: str, since: datetime) -> datetime | None:
    """When the destination last took an export (done) after ``since``; None when it took
    none. Ends its read transaction."""
    session.connection(execution_options=READ_ONLY)
    latest = session.scalar(
        select(func.max(Job.finished_at)).where(
            Job.kind == "export",
            Job.state == "done",
            Job.finished_at > since,
            _destination(Job) == destination,
        )
    )
    session.rollback()
    return as_utc(latest) if latest is not None else None


def _destination(jobs: Any) -> ColumnElement[str]:
    """An export job's destination, of the jobs table or an alias of it (in SQL: SQLite's
    json_extract, PostgreSQL's ``->>``)."""
    return jobs.payload["destination"].as_string()


# How export jobs are claimed: a study's exports to one destination together.
TOGETHER = Together(
    key=_destination,
    limit=EXPORTS_PER_ASSOCIATION - 1,
    # Those still waiting out their backoff after the destination was unreachable too: each
    # failed job's backoff is reckoned from its own failure, a few milliseconds apart, and
    # taking only those due split a study's association further at each retry of an outage.
    # Not one that failed on its own (an object the destination refused): it waits out its
    # own backoff, not retried with each of the study's later exports, which spent its
    # attempts long before it ended.
    waiting=_unreachable_last_time(),
)


def unconfigured_reason(destination: str) -> str:
    """Why an export job was dead-lettered without being tried: its destination's name is in
    no ``[[destinations]]`` table (removed, or renamed: the job names the old name)."""
    return f"destination {destination!r} is no longer configured"


def _id_list(ids: list[int], shown: int = 10) -> str:
    """Job ids for a log line: the first ``shown`` and how many more."""
    listed = ", ".join(map(str, ids[:shown]))
    return listed if len(ids) <= shown else f"{listed} and {len(ids) - shown} more"
