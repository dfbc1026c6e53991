"""The worker: claims jobs from the database and runs them (analysis, results, export,
notification).

Runs as its own process (``dicomnode worker``), so inference never stalls ingest; any
number of workers on any hosts may share one PostgreSQL database. Each process runs
``[worker] threads`` jobs at once; they share the warm model sessions, whose runtime batches
their concurrent inferences. Each thread has its own database session. Jobs are claimed by
kind priority (:data:`dicomnode.jobs.KIND_PRIORITY`), and at most ``[worker]
background_threads`` threads run results and export jobs at once, so that a thread is free
for the next study's triage. An analysis hands its models' outputs to its results job in
memory (:class:`dicomnode.pipeline.handover.Handover`) when this process claims it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.config import Destination, Settings, changed_settings
from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.db.session import READ_ONLY, as_utc, utcnow
from dicomnode.export.scu import (
    DestinationOutOfResources,
    DestinationUnavailable,
    describe,
    send_files,
)
from dicomnode.ingest.spool import free_bytes
from dicomnode.jobs import (
    BACKOFF_MAX_SECONDS,
    JobSignal,
    Postponed,
    claim,
    claim_alike,
    complete,
    dead_letter,
    dead_letter_queued,
    due,
    fail,
    hasten,
    postpone,
    release_orphaned,
)
from dicomnode.logs import patient_values, without_patient_data
from dicomnode.models.registry import ModelCard
from dicomnode.notify import send_notification
from dicomnode.pipeline.analyse import analyse_study, mark_failed, write_results
from dicomnode.pipeline.handover import Handover
from dicomnode.pipeline.runtime import ModelLoadError, Runtime

log = logging.getLogger("dicomnode.worker")

# Jobs that decide or announce a study's priority, and the work that may wait for them.
TRIAGE_KINDS = ["notify", "analyse"]
BACKGROUND_KINDS = ["results", "export"]

# Result objects of one study sent to a destination over one association, at most.
EXPORTS_PER_ASSOCIATION = 32

# What a worker sets up once, at start: its database engine, its job threads and its logging.
RESTART_ONLY = ("database", "worker.threads", "log_level", "logging")


# A job thread's retries while the database is unavailable (or its loop fails): the first
# after this many seconds, doubling up to the last.
LOOP_RETRY_FIRST_SECONDS = 0.5
LOOP_RETRY_LAST_SECONDS = 30.0

# How long a results job waits while storage is below its free-space watermark (or full)
# before it is tried again; it uses none of its attempts meanwhile.
STORAGE_WAIT_SECONDS = 30.0

# What a dead job of a kind leaves the study with, for its ERROR line.
DEAD_LETTER_NOTES = {
    "analyse": "the study shows its analysis failed and keeps its place in the worklist; ",
    # The study stays analysed: its priority stands without the objects.
    "results": "the study keeps its priority; ",
}


class Worker:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], cards: list[ModelCard]):
        self.settings = settings
        self.sessions = sessions
        self.cards = cards
        self.runtime = Runtime(settings.worker.providers, settings.inference)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # Set by SIGHUP: re-read the configuration between jobs.
        self.reload_requested = threading.Event()
        # Analyses waiting for their results job in this process.
        self.handover = Handover(settings.worker.handover_mb * 1024 * 1024)
        # Threads running results or export jobs now (at most background_limit()).
        self._background = 0
        self._background_lock = threading.Lock()
        # Models whose ONNX file cannot be loaded (missing, truncated, corrupt, not matching
        # the card), by name, with the reason: left out of every study until a reload or a
        # restart finds them loadable. A node's configuration fault must not fail studies.
        self.unusable: dict[str, str] = {}
        self._unusable_lock = threading.Lock()
        # Whether the job threads find the database unavailable (one log line per change).
        self.outage = DatabaseOutage()
        # Whether results jobs wait for room in storage now (one log line per change).
        self._storage_full = False

    def background_limit(self) -> int:
        """Threads that may run results and export jobs at once: ``[worker]
        background_threads``, by default all but one (all with one thread)."""
        worker = self.settings.worker
        if worker.background_threads:
            return min(worker.background_threads, worker.threads)
        return max(1, worker.threads - 1)

    def _claim(self, session: Session) -> Job | None:
        """Claim the most urgent due job; results and exports only while a background slot is
        free (the slot is kept while such a job runs, released by :meth:`run_once`)."""
        with self._background_lock:
            background = self._background < self.background_limit()
            if background:
                self._background += 1
        kinds = TRIAGE_KINDS + BACKGROUND_KINDS if background else TRIAGE_KINDS
        job = None
        try:
            # The claim is a write transaction: taken only when a job is due.
            if due(session, kinds):
                job = claim(session, self.owner, kinds, self.settings.worker.lease_seconds)
        finally:
            if background and (job is None or job.kind not in BACKGROUND_KINDS):
                self._release_background()
        return job

    def _release_background(self) -> None:
        with self._background_lock:
            self._background -= 1

    def reload(self, name_restart_only: bool = True) -> bool:
        """Re-read settings and cards; keep the old ones if the new ones are invalid.
        ``name_restart_only``: log which changes wait for a restart (``dicomnode serve``
        names them itself for the workers it starts)."""
        from dicomnode.checkconfig import load_checked
        from dicomnode.tomlfile import ConfigError

        if self.settings.source is None:
            return False
        try:
            settings, cards = load_checked(self.settings.source)
        except ConfigError as exc:
            log.error("reload refused, the running configuration is kept: %s", exc)
            return False
        if name_restart_only:
            for name in changed_settings(self.settings, settings, RESTART_ONLY):
                log.warning(
                    "worker %s reload: [%s] changed; it takes effect at the next restart",
                    self.owner,
                    name,
                )
        # Keep the warm sessions only of models whose card is unchanged.
        unchanged = {(c.model.name, c.model.version) for c in cards if c in self.cards}
        if (settings.worker.providers, settings.inference) != (
            self.settings.worker.providers,
            self.settings.inference,
        ):
            self.runtime = Runtime(settings.worker.providers, settings.inference)
        else:
            self.runtime.keep_only(unchanged)
        self.settings, self.cards = settings, cards
        # Every card of a reload was loaded by load_checked (a reload with an unloadable one
        # is refused): those left out before are fixed.
        with self._unusable_lock:
            self.unusable.clear()
        self.handover.max_bytes = settings.worker.handover_mb * 1024 * 1024
        log.info("worker %s reloaded: %d model card(s)", self.owner, len(cards))
        return True

    def warm_up(self) -> None:
        """Open every model's session and run it once now, so the first study does not pay
        for loading or onnxruntime's first-run allocations."""
        for card in self.cards:
            if card.ensemble is not None:
                continue  # no ONNX file of its own: its members are warmed as cards of their own
            try:
                self.runtime.session(card)
            except ModelLoadError as exc:
                # Keep working: ingest and the other models go on without this one.
                self.leave_out(card, str(exc))
                continue
            try:
                self.runtime.warm_up(card)
            except Exception as exc:  # a model may reject a blank image; studies will tell
                log.warning("model %s: warm-up run failed: %s", card.model.name, exc)

    def leave_out(self, card: ModelCard, reason: str) -> bool:
        """Leave the model out of every study from now on, as a card whose ONNX file cannot
        be loaded (the check of ``check-config`` and ``/readyz``: ``load_session``), with the
        ensembles it is a member of; one ERROR names the card and why. False when it was left
        out already."""
        with self._unusable_lock:
            if card.model.name in self.unusable:
                return False
            self.unusable[card.model.name] = reason
        ensembles = [
            c.model.name
            for c in self.cards
            if c.ensemble is not None and card.model.name in c.ensemble.members
        ]
        log.error(
            "model card %s cannot be used: the model%s left out of every study until it is "
            "fixed and the node reloaded (SIGHUP) or restarted; the other models run: %s",
            card.card_path,
            f" and its ensemble(s) {', '.join(ensembles)} are" if ensembles else " is",
            reason,
        )
        return True

    def usable_cards(self) -> list[ModelCard]:
        """The cards that studies are analysed with: all but those left out
        (:meth:`leave_out`) and the ensembles with a member left out."""
        unusable = set(self.unusable)
        return [
            card
            for card in self.cards
            if card.model.name not in unusable
            and not (card.ensemble and unusable.intersection(card.ensemble.members))
        ]

    def left_out_cards(self) -> list[tuple[ModelCard, str]]:
        """The cards :meth:`usable_cards` leaves out, each with why (an ensemble: its
        member's reason)."""
        unusable = dict(self.unusable)
        left_out = []
        for card in self.cards:
            if card.model.name in unusable:
                left_out.append((card, unusable[card.model.name]))
            elif card.ensemble and (members := unusable.keys() & set(card.ensemble.members)):
                member = sorted(members)[0]
                left_out.append((card, f"member {member}: {unusable[member]}"))
        return left_out

    def run_once(self) -> bool:
        """Claim and run one due job; False when none was due."""
        with self.sessions() as session:
            job = self._claim(session)
            if job is None:
                return False
            kind = job.kind
            try:
                return self._run_claimed(session, job)
            finally:
                if kind in BACKGROUND_KINDS:
                    self._release_background()

    def _run_claimed(self, session: Session, job: Job) -> bool:
        """Run a claimed job and record its outcome (done, retry later or dead)."""
        started = time.perf_counter()
        seconds = {"queued": _queued_seconds(job)}
        try:
            if job.kind == "export":
                # Records each job of its association itself, to log a failure once for all.
                self._export(session, job, started)
                return True
            detail = self._run(session, job, seconds)
        except ModelLoadError as exc:
            # A model that did not load at its first use (its file replaced or removed since
            # the worker started): left out, the job runs again at once with the others,
            # without using an attempt.
            session.rollback()
            card = next((c for c in self.cards if c.model.name == exc.model), None)
            if card is None:
                self._record_failure(session, job, exc, started)
                return True
            self.leave_out(card, str(exc))  # or another thread has just done so
            if postpone(session, session.get(Job, job.id), 0.0, owner=self.owner):
                log.info(
                    "job %d %s study_id=%d runs again without model %s",
                    job.id,
                    job.kind,
                    job.study_id,
                    exc.model,
                )
            return True
        except Postponed as wait:
            session.rollback()
            if postpone(session, session.get(Job, job.id), wait.seconds, owner=self.owner):
                log.debug(
                    "job %d %s study_id=%d postponed %.1f s: %s",
                    job.id,
                    job.kind,
                    job.study_id,
                    wait.seconds,
                    wait,
                )
            return True
        except Exception as exc:
            session.rollback()
            self._record_failure(session, job, exc, started)
            return True
        self._record_done(session, job, seconds, detail, started)
        return True

    def _record_failure(self, session: Session, job: Job, exc: Exception, started: float) -> None:
        """Record why a job failed: it is retried later with backoff, or dead-lettered."""
        if job.kind == "export":
            metrics.EXPORT_FAILURES.labels(job.payload.get("destination", "")).inc()
        reason = without_patient_data(
            f"{type(exc).__name__}: {exc}", self._patient_values(session, job.study_id)
        )
        log.warning(
            "job %d %s study_id=%d attempt %d failed after %.0f ms: %s",
            job.id,
            job.kind,
            job.study_id,
            job.attempts,
            (time.perf_counter() - started) * 1000,
            reason,
        )
        self._fail(session, job, reason, unreachable=False)

    def _patient_values(self, session: Session, study_id: int | None) -> set[str]:
        """What identifies the study's patient, to keep out of a failure's logged and recorded
        reason: an error may quote a patient's name or ID it refused."""
        study = session.get(Study, study_id) if study_id is not None else None
        if study is None:
            return set()
        return patient_values(study.patient_name, (study.patient_id, study.accession_number))

    def _fail(self, session: Session, job: Job, reason: str, unreachable: bool) -> bool:
        """Record a failed attempt: retried later with backoff, or dead-lettered (logged, with
        how to retry it) when its attempts are spent. ``unreachable``: an export whose
        destination is down or vanished mid-association, kept until the destination answers
        (nothing was refused, nothing to give up on). False when another worker took the job
        over meanwhile."""
        job = session.get(Job, job.id)
        # Critical-result notifications keep trying longer than other jobs.
        attempts = (
            None
            if unreachable
            else self.settings.notify.max_attempts
            if job.kind == "notify"
            else self.settings.worker.max_attempts
        )
        recorded = fail(
            session,
            job,
            reason,
            attempts,
            owner=self.owner,
            backoff_base=self.settings.worker.backoff_base_seconds,
        )
        if not recorded or job.state != "dead":
            return recorded
        if job.kind == "analyse":
            mark_failed(session, job.study_id, reason, self.settings.worklist)
        log.error(
            "job %d %s study_id=%d dead after %d attempts (%sretry with POST "
            "/api/jobs/%d/retry): %s",
            job.id,
            job.kind,
            job.study_id,
            job.attempts,
            DEAD_LETTER_NOTES.get(job.kind, ""),
            job.id,
            reason,
        )
        return True

    def _record_done(
        self, session: Session, job: Job, seconds: dict[str, float], detail: str, started: float
    ) -> None:
        """Mark a job done, with its stage times, unless another worker took it over."""
        seconds["total"] = time.perf_counter() - started
        if not complete(session, session.get(Job, job.id), owner=self.owner, seconds=seconds):
            log.warning("job %d: lease expired while running; another worker owns it", job.id)
            return
        metrics.JOB_SECONDS.labels(job.kind, "total").observe(time.perf_counter() - started)
        log.info(
            "job %d %s study_id=%d done in %.0f ms %s",
            job.id,
            job.kind,
            job.study_id,
            (time.perf_counter() - started) * 1000,
            detail,
        )

    def _run(self, session: Session, job: Job, seconds: dict[str, float]) -> str:
        """Run the job; stage times go into ``seconds`` (kept in the job's payload)."""
        if job.kind == "analyse":
            # Registered, so that the runtime's batches wait only for analyses that may come.
            runtime = self.runtime
            with runtime.caller():
                times = analyse_study(
                    session,
                    self.settings,
                    self.usable_cards(),
                    runtime,
                    job.study_id,
                    self.handover,
                )
            for stage, spent in times.seconds.items():
                metrics.JOB_SECONDS.labels("analyse", stage).observe(spent)
            seconds.update(times.seconds)
            return str(times)
        if job.kind == "results":
            self._wait_for_room(job)
            # Taken before anything can fail: a retry recomputes from the stored images. A job
            # postponed (a newer analysis is pending) keeps it for its next run.
            triaged = self.handover.take(job.id)
            up_to = job.payload.get("instances_up_to")
            try:
                times = write_results(
                    session,
                    self.settings,
                    self.usable_cards(),
                    self.runtime,
                    job.study_id,
                    job.id,
                    triaged,
                    None if up_to is None else int(up_to),
                    self.left_out_cards(),
                )
            except Postponed:
                if triaged is not None:
                    self.handover.put(job.id, triaged, triaged.nbytes())
                raise
            except Exception as exc:
                if not disk_full(exc):
                    raise
                # Full before the watermark says so (objects bigger than what was left); the
                # files it wrote were removed.
                if triaged is not None:
                    self.handover.put(job.id, triaged, triaged.nbytes())
                self._storage_wait(job, f"storage full: {exc}")
            self._storage_room()
            for stage, spent in times.seconds.items():
                metrics.JOB_SECONDS.labels("results", stage).observe(spent)
            seconds.update(times.seconds)
            return str(times)
        if job.kind == "notify":
            return send_notification(session, self.settings.notify, job)
        raise ValueError(f"unknown job kind {job.kind!r}")

    def _wait_for_room(self, job: Job) -> None:
        """Postpone the results job while storage is below ``[storage] min_free_bytes`` (ingest
        refuses instances with 0xA700 then): its objects would fill the disk or fail to be
        written, and it died after its attempts in seconds with the study's objects lost."""
        watermark = self.settings.storage.min_free_bytes
        free = free_bytes(self.settings.storage_path)
        if free < watermark:
            self._storage_wait(
                job,
                f"storage below the free-space watermark: {free // 2**20} MiB free, "
                f"[storage] min_free_bytes {watermark // 2**20} MiB",
            )

    def _storage_wait(self, job: Job, reason: str) -> None:
        """Raise :class:`Postponed` for ``STORAGE_WAIT_SECONDS``; the first results job to
        wait logs a WARNING, the others at DEBUG."""
        with self._background_lock:
            first, self._storage_full = not self._storage_full, True
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "results job %d study_id=%d waits: %s; results jobs are tried again every %.0f s "
            "without using their attempts until there is room",
            job.id,
            job.study_id,
            reason,
            STORAGE_WAIT_SECONDS,
        )
        raise Postponed(reason, STORAGE_WAIT_SECONDS)

    def _storage_room(self) -> None:
        """A results job wrote its objects: say once that storage has room again."""
        if self._storage_full:
            with self._background_lock:
                was, self._storage_full = self._storage_full, False
            if was:
                log.info("storage has room again: results jobs run")

    def _export(self, session: Session, job: Job, started: float) -> None:
        """Send the job's result object to its destination, together with the study's other
        exports to that destination that are due, over one association (up to
        :data:`EXPORTS_PER_ASSOCIATION`); each of those jobs is completed or failed on its own,
        and a failed attempt is logged in one line for all of them. A job whose destination is
        no longer configured is dead-lettered (:meth:`dead_letter_unrouted_exports`)."""
        name = job.payload["destination"]
        destination = next((d for d in self.settings.destinations if d.name == name), None)
        if destination is None:
            self.dead_letter_unrouted_exports(session, claimed=job)
            return
        companions = claim_alike(
            session,
            job,
            self.owner,
            self.settings.worker.lease_seconds,
            lambda other: other.payload.get("destination") == name,
            EXPORTS_PER_ASSOCIATION - 1,
        )
        batch = [job, *companions]
        queued = {other.id: _queued_seconds(other) for other in batch}
        rows = {other.id: session.get(ResultObject, other.payload["result_id"]) for other in batch}
        # The jobs whose result objects still exist (by id), and their files in that order.
        kinds = {job_id: row.kind for job_id, row in rows.items() if row is not None}
        paths = [Path(row.path) for row in rows.values() if row is not None]
        # End the read transaction: on SQLite it holds the write lock, which ingest needs
        # while the transfer runs.
        session.commit()
        try:
            sent = send_files(
                paths, destination, self.settings.node.ae_title, destination.timeout_seconds
            )
        except Exception as exc:  # no association: every job of it fails alike
            outcomes: dict[int, Exception | None] = dict.fromkeys(kinds, exc)
        else:
            outcomes = dict(zip(kinds, sent, strict=True))
            # Not when it answers but stores nothing (out of resources: its disk is full).
            if job.attempts > 1 and any(outcome is None for outcome in sent):
                # The destination answers again: what waits out its backoff for it goes now.
                hastened = hasten(
                    session, "export", lambda other: other.payload.get("destination") == name
                )
                if hastened:
                    log.info(
                        "destination %s answers again: %d waiting export(s) due now",
                        name,
                        hastened,
                    )
        failed = {job_id: exc for job_id, exc in outcomes.items() if exc is not None}
        more = f", {len(companions)} more in the same association" if companions else ""
        for other in batch:
            if other.id in failed:
                continue
            if other.id not in kinds:
                detail = "result no longer exists"
            elif other is job:
                detail = f"{kinds[job.id]} -> {name}{more}"
            else:
                detail = f"{kinds[other.id]} -> {name} (with job {job.id})"
            self._record_done(session, other, {"queued": queued[other.id]}, detail, started)
        if failed:
            self._record_export_failures(session, destination, batch, failed, started)

    def _record_export_failures(
        self,
        session: Session,
        destination: Destination,
        batch: list[Job],
        failed: dict[int, Exception],
        started: float,
    ) -> None:
        """Record the failed jobs of one association's batch (each retried later with backoff,
        or dead-lettered) and log the attempt in one line: the destination, why, how many
        exports wait for it and when it is tried next. A destination that is down logged a
        WARNING per object and attempt (~15 a study); each job's reason is at DEBUG."""
        where = describe(destination)
        study_id = batch[0].study_id
        known = self._patient_values(session, study_id)
        reasons: dict[int, str] = {}
        recorded = []
        for job in batch:
            if job.id not in failed:
                continue
            exc = failed[job.id]
            metrics.EXPORT_FAILURES.labels(destination.name).inc()
            reason = without_patient_data(f"{type(exc).__name__}: {exc}", known)
            log.debug(
                "job %d export study_id=%d attempt %d failed: %s",
                job.id,
                study_id,
                job.attempts,
                reason,
            )
            if self._fail(session, job, reason, isinstance(exc, DestinationUnavailable)):
                recorded.append(job)
                reasons[job.id] = reason.replace(f"{where}: ", "")
        metrics.EXPORT_ATTEMPTS_FAILED.labels(destination.name).inc()
        if not recorded:
            return  # taken over by another worker, which logs its own attempt
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
            and job.attempts == self.settings.worker.max_attempts
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
        log.log(
            logging.ERROR if given_up else logging.WARNING,
            "export to %s failed (attempt %d, %.0f ms): %d of %d object(s) of study_id=%d "
            "not sent: %s; %d export job(s) wait for %s%s%s",
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
        )

    def dead_letter_unrouted_exports(self, session: Session, claimed: Job | None = None) -> int:
        """Dead-letter now the queued export jobs whose destination is no longer configured
        (removed or renamed before a reload or a restart), and ``claimed``, such a job this
        worker holds; returns how many. No retry can send them, and marking them done (as
        before) lost the results silently: retention then deleted their study. As dead letters
        they show in ``/api/jobs?state=dead`` and on the worklist, keep their study, and an
        admin retries them once the destination is configured again. One ERROR per
        destination."""
        configured = {d.name for d in self.settings.destinations}

        def reason_of(job: Job) -> str:
            return unconfigured_reason(str(job.payload.get("destination", "")))

        buried = []
        if claimed is not None and dead_letter(
            session, claimed, reason_of(claimed), owner=self.owner
        ):
            buried.append(claimed)
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
            with self.sessions() as session:
                self.dead_letter_unrouted_exports(session)
        except Exception as exc:
            log.warning(
                "exports to destinations no longer configured not dead-lettered now (%s); "
                "each will be when it is next tried",
                database_reason(exc),
                exc_info=not database_unavailable(exc),
            )

    def free_orphaned_jobs(self) -> None:
        """Free the jobs that worker processes of this host held when they died, for a
        prompt takeover after a crash or a kill (their leases would run for minutes)."""
        try:
            with self.sessions() as session:
                released = release_orphaned(session, socket.gethostname())
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            # The job threads wait for the database; those jobs' leases run out meanwhile.
            log.warning("jobs of dead workers not taken over now: %s", database_reason(exc))
            return
        if released:
            log.warning(
                "jobs %s were held by worker processes of this host that are gone; taken over now",
                ", ".join(map(str, released)),
            )

    def run_forever(self, stop: threading.Event, parent_pid: int | None = None) -> None:
        """Run jobs in ``[worker] threads`` threads until ``stop`` is set (or the parent
        process is gone); this thread handles reloads. Running jobs are finished first."""
        self.free_orphaned_jobs()
        self.bury_unrouted_exports()
        signal = JobSignal(self.sessions.kw["bind"]).start()
        threads = [
            threading.Thread(target=self._job_loop, args=(stop, signal), name=f"job-{n}")
            for n in range(self.settings.worker.threads)
        ]
        for thread in threads:
            thread.start()
        try:
            while not stop.wait(0.2):
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    if self.reload(name_restart_only=parent_pid is None):
                        self.bury_unrouted_exports()
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.warning("parent process gone; worker exits")
                    break
        finally:
            stop.set()
            signal.stop()
            for thread in threads:
                thread.join()

    def _job_loop(self, stop: threading.Event, signal: JobSignal) -> None:
        """One job thread: claim and run jobs; when none is due, wait for a new one or the
        poll interval (jobs that become due later: backoff, expired leases)."""
        retry = 0.0
        while not stop.is_set():
            seen = signal.generation
            try:
                busy = self.run_once()
            except Exception as exc:
                # Backed off, doubling: a database refusing connections made every thread
                # log a traceback each poll (~10 a second).
                retry = min(LOOP_RETRY_LAST_SECONDS, retry * 2 or LOOP_RETRY_FIRST_SECONDS)
                if database_unavailable(exc):
                    self.outage.failed(exc, retry)
                else:
                    log.exception("worker loop error; retrying in %.1f s", retry)
                # Woken early when job notifications resume (the database is back).
                signal.wait(seen, retry)
                continue
            retry = 0.0
            self.outage.recovered()
            if not busy and not stop.is_set():
                signal.wait(seen, self.settings.worker.poll_seconds)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it, e.g. a ``SpoolError``) is a file system out of
    space or quota."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__
    return False


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or used now (refused, restarting,
    connection lost), not that a statement is wrong."""
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def database_reason(exc: BaseException) -> str:
    """The driver's first line of why (SQLAlchemy's own text quotes the statement and its
    parameters, which may hold patient data)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class DatabaseOutage:
    """The database as the job threads see it, shared by them: one WARNING when it becomes
    unavailable and one when it is available again, instead of a traceback per thread and
    retry (1 MB of log in 12 s of outage); each retry's error is at DEBUG."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None

    def failed(self, exc: BaseException, retry: float) -> None:
        with self._lock:
            first = self.since is None
            if first:
                self.since = time.monotonic()
        if first:
            log.warning(
                "database unavailable: %s; retrying in %.1f s, then at least every %.0f s",
                database_reason(exc),
                retry,
                LOOP_RETRY_LAST_SECONDS,
            )
        log.debug("job thread: database unavailable; retrying in %.1f s", retry, exc_info=exc)

    def recovered(self) -> None:
        if self.since is None:
            return  # the common case, without the lock
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            log.info("database available again after %.0f s", time.monotonic() - since)


def unconfigured_reason(destination: str) -> str:
    """Why an export job was dead-lettered without being tried: its destination's name is in
    no ``[[destinations]]`` table (removed, or renamed: the job names the old name)."""
    return f"destination {destination!r} is no longer configured"


def _id_list(ids: list[int], shown: int = 10) -> str:
    """Job ids for a log line: the first ``shown`` and how many more."""
    listed = ", ".join(map(str, ids[:shown]))
    return listed if len(ids) <= shown else f"{listed} and {len(ids) - shown} more"


def _queued_seconds(job: Job) -> float:
    """Seconds the job has been due (to its claim, when called as it is claimed)."""
    return max(0.0, (utcnow() - as_utc(job.run_after)).total_seconds())
