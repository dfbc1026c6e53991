"""The worker: claims jobs from the database and runs them (analysis, results, export,
notification).

Runs as its own process (``dicomnode worker``), so inference never stalls ingest; any
number of workers on any hosts may share one PostgreSQL database. Each process runs
``[worker] threads`` jobs at once; they share the warm model sessions, whose runtime batches
their concurrent inferences. Each thread has its own database session. Jobs are claimed by
kind priority (:data:`dicomnode.jobs.queue.KIND_PRIORITY`), and at most ``[worker]
background_threads`` threads run results and export jobs at once, so that a thread is free
for the next study's triage. An analysis hands its models' outputs to its results job in
memory (:class:`dicomnode.pipeline.handover.Handover`) when this process claims it.

This module is the job loop: claiming, running and recording each job's outcome. Export
jobs are run by :mod:`dicomnode.export.jobs`, the models left out of studies are kept by
:class:`dicomnode.models.availability.ModelAvailability`, and what tells a database or disk
outage from a job's failure is :mod:`dicomnode.outage`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.config import Settings, restart_changes
from dicomnode.db.models import Job, Study
from dicomnode.db.session import utcnow
from dicomnode.export.jobs import TOGETHER as EXPORTS_TOGETHER
from dicomnode.export.jobs import ExportJobs
from dicomnode.ingest.spool import free_bytes
from dicomnode.jobs.leases import LeaseRenewer
from dicomnode.jobs.queue import (
    Postponed,
    claim_together,
    complete,
    fail,
    next_due,
    postpone,
    queued_seconds,
    release_orphaned,
)
from dicomnode.jobs.waiting import JobSignal
from dicomnode.logs import patient_values, without_patient_data
from dicomnode.models.availability import ModelAvailability
from dicomnode.models.registry import ModelCard
from dicomnode.nodestate import NodeCheck
from dicomnode.notify import send_notification
from dicomnode.outage import OutageLog, database_reason, database_unavailable, disk_full
from dicomnode.pipeline.analyse import analyse_study, mark_failed
from dicomnode.pipeline.handover import Handover
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.sessions import ModelLoadError
from dicomnode.results.job import write_results

log = logging.getLogger("dicomnode.worker")

# Jobs that decide or announce a study's priority, and the work that may wait for them.
TRIAGE_KINDS = ["notify", "analyse"]
BACKGROUND_KINDS = ["results", "export"]

# Jobs claimed together (one transaction): a study's exports to one destination.
TOGETHER = {"export": EXPORTS_TOGETHER}

# What a worker sets up once, at start: its database engine, its job threads, its logging and
# (run by itself) its metrics server.
RESTART_ONLY = (
    "database",
    "worker.threads",
    "log_level",
    "logging",
    "worker.metrics_port",
    "worker.metrics_host",
)


# A job thread's retries while the database is unavailable (or its loop fails): the first
# after this many seconds, doubling up to the last.
LOOP_RETRY_FIRST_SECONDS = 0.5
LOOP_RETRY_LAST_SECONDS = 30.0
# While the database stays unavailable, its line again at most this often (with how long it has
# been), so that an admin who looks at the log later still sees it; as serve's assembly check.
DATABASE_REMINDER_SECONDS = 60.0

# How often a worker started by serve looks whether serve is still there.
PARENT_CHECK_SECONDS = 1.0

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
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        cards: list[ModelCard],
        stand_alone: bool = True,
    ):
        """``stand_alone``: run by itself (``dicomnode worker``), not one of the workers
        serve starts, which run serve's configuration (its storage folder, its cards)."""
        self.settings = settings
        # What the database engine, the job threads and the logging were set up with: a
        # reload does not change the restart-only keys (RESTART_ONLY) of it, so reloads
        # compare against these, not against the file's previous contents.
        self.running = settings
        # The restart-only keys this worker names on a reload (a key set on the command line
        # instead is left out: the file's value is not what it runs).
        self.restart_only = RESTART_ONLY
        self.sessions = sessions
        # The model cards, less those whose ONNX file cannot be loaded: left out of every
        # study until a reload or a restart finds them loadable (a node's configuration
        # fault must not fail studies).
        self.models = ModelAvailability(cards)
        self.runtime = Runtime(settings.worker.providers, settings.inference)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # Set by SIGHUP: re-read the configuration between jobs.
        self.reload_requested = threading.Event()
        # Analyses waiting for their results job in this process.
        self.handover = Handover(settings.worker.handover_mb * 1024 * 1024)
        # Threads running results or export jobs now (at most background_limit()).
        self._background = 0
        self._background_lock = threading.Lock()
        # Whether the job threads find the database unavailable (one log line per change, and
        # a reminder while it lasts).
        self.outage = OutageLog(log, remind_seconds=DATABASE_REMINDER_SECONDS)
        # Runs the export jobs this worker claims.
        self.exports = ExportJobs(self)
        # Whether results jobs wait for room in storage now (one log line per change).
        self._storage_full = OutageLog(log)
        # A stand-alone worker's: whether its cards and storage folder are the node's
        # (serve's): else it takes no analyses (other cards) or only notifications (another
        # storage folder). Serve's own workers are not compared: during serve's reload, and
        # when serve restarts one, their cards differ for a while from those serve published.
        self.node_check = (
            NodeCheck(self.owner, settings.storage_path, cards) if stand_alone else None
        )
        # Renews the leases of the jobs this process runs (a thread, run_forever starts it).
        self.leases = LeaseRenewer(
            sessions,
            lambda: self.owner,
            lambda: self.settings.worker.lease_seconds,
            lambda: self.settings.worker.max_job_seconds,
        )

    @property
    def cards(self) -> list[ModelCard]:
        """Every model card of the configuration, those left out included."""
        return self.models.cards

    def background_limit(self) -> int:
        """Threads that may run results and export jobs at once: ``[worker]
        background_threads``, by default all but one (all with one thread)."""
        worker = self.settings.worker
        if worker.background_threads:
            return min(worker.background_threads, worker.threads)
        return max(1, worker.threads - 1)

    def _claim_together(self, session: Session) -> list[Job] | float:
        """Claim the most urgent due job, with the jobs that go with it (:data:`TOGETHER`);
        results and exports only while a background slot is free (the slot is kept while such
        a job runs, released by :meth:`_run_next`). When none is due: the seconds until one of
        those kinds is (``inf``: none queued or leased)."""
        with self._background_lock:
            background = self._background < self.background_limit()
            if background:
                self._background += 1
        kinds = TRIAGE_KINDS + BACKGROUND_KINDS if background else TRIAGE_KINDS
        claimed: list[Job] = []
        wait = math.inf
        try:
            if self.node_check is not None:
                kinds = self.node_check.claimable(session, kinds)
                if not kinds:
                    return wait
            soonest = next_due(session, kinds)
            if soonest is not None:
                wait = max(0.0, (soonest - utcnow()).total_seconds())
            if wait == 0.0:
                # The claim is a write transaction: taken only when a job is due. None: another
                # worker took it, and the next one may be due already (0 s to wait).
                claimed = claim_together(
                    session, self.owner, kinds, self.settings.worker.lease_seconds, TOGETHER
                )
        finally:
            if background and (not claimed or claimed[0].kind not in BACKGROUND_KINDS):
                self._release_background()
        return claimed or wait

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
            pending, undone = restart_changes(
                self.running, self.settings, settings, self.restart_only
            )
            for name in pending:
                log.warning(
                    "worker %s reload: [%s] changed; it takes effect at the next restart",
                    self.owner,
                    name,
                )
            for name in undone:
                log.info(
                    "worker %s reload: [%s] is back to the running value; no restart pending",
                    self.owner,
                    name,
                )
        # Keep the warm sessions only of models whose card and ONNX file are unchanged.
        unchanged = {(c.model.name, c.model.version) for c in cards if c in self.cards}
        if (settings.worker.providers, settings.inference) != (
            self.settings.worker.providers,
            self.settings.inference,
        ):
            self.runtime = Runtime(settings.worker.providers, settings.inference)
        else:
            self.runtime.keep_only(unchanged)
        self.settings = settings
        # Every card of a reload was loaded by load_checked (a reload with an unloadable one
        # is refused): those left out before are fixed.
        self.models.replace(cards)
        if self.node_check is not None:
            self.node_check.reloaded(settings.storage_path, cards)
        self.handover.max_bytes = settings.worker.handover_mb * 1024 * 1024
        log.info("worker %s reloaded: %d model card(s)", self.owner, len(cards))
        return True

    def serve_metrics(self, port: int) -> bool:
        """Serve this process's metrics over HTTP on ``[worker] metrics_host`` and ``port``
        (a worker run by itself; serve's workers report through the node's ``/metrics``).
        An address that cannot be bound is logged and the worker runs on without metrics:
        its jobs matter more than their metrics."""
        host = self.running.worker.metrics_host
        try:
            metrics.serve_process_metrics(host, port)
        except OSError as exc:
            log.error(
                "worker %s serves no metrics: cannot listen on %s port %d (%s); set [worker] "
                "metrics_port or --metrics-port to a free port and restart the worker",
                self.owner,
                host,
                port,
                exc.strerror or exc,
            )
            return False
        log.info("worker %s serves its metrics at %s port %d (/metrics)", self.owner, host, port)
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
                self.models.leave_out(card, str(exc))
                continue
            try:
                self.runtime.warm_up(card)
            except Exception as exc:  # a model may reject a blank image; studies will tell
                log.warning("model %s: warm-up run failed: %s", card.model.name, exc)

    def run_once(self) -> bool:
        """Claim and run one due job; False when none was due."""
        return self._run_next() is None

    def _run_next(self) -> float | None:
        """Claim and run one due job (None); when none is due, the seconds until one is
        (``inf`` when none is queued or leased)."""
        with self.sessions() as session:
            claimed = self._claim_together(session)
            if isinstance(claimed, float):
                return claimed
            job, *companions = claimed
            kind = job.kind
            try:
                with self.leases.running(j.id for j in claimed):
                    self._run_claimed(session, job, companions)
                return None
            finally:
                if kind in BACKGROUND_KINDS:
                    self._release_background()

    def _run_claimed(self, session: Session, job: Job, companions: list[Job]) -> bool:
        """Run a claimed job (with its ``companions``, claimed with it) and record its outcome
        (done, retry later or dead)."""
        started = time.perf_counter()
        seconds = {"queued": queued_seconds(job)}
        try:
            if job.kind == "export":
                # Records each job of its association itself, to log a failure once for all.
                self.exports.run(session, job, companions, started)
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
            self.models.leave_out(card, str(exc))  # or another thread has just done so
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
        self.record_done(session, job, seconds, detail, started)
        return True

    def _record_failure(self, session: Session, job: Job, exc: Exception, started: float) -> None:
        """Record why a job failed: it is retried later with backoff, or dead-lettered. (An
        export job's object is counted as not sent by ``ExportJobs.run``, once.)"""
        reason = without_patient_data(
            f"{type(exc).__name__}: {exc}", self.study_patient_values(session, job.study_id)
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
        self.record_failed_attempt(session, job, reason, unreachable=False)

    def study_patient_values(self, session: Session, study_id: int | None) -> set[str]:
        """What identifies the study's patient, to keep out of a failure's logged and recorded
        reason: an error may quote a patient's name or ID it refused."""
        study = session.get(Study, study_id) if study_id is not None else None
        if study is None:
            return set()
        return patient_values(study.patient_name, (study.patient_id, study.accession_number))

    def record_failed_attempt(
        self, session: Session, job: Job, reason: str, unreachable: bool
    ) -> bool:
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

    def record_done(
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
                    self.models.usable(),
                    runtime,
                    job.study_id,
                    self.handover,
                    self.models.left_out(),
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
                    self.models.usable(),
                    self.runtime,
                    job.study_id,
                    job.id,
                    triaged,
                    None if up_to is None else int(up_to),
                    self.models.left_out(),
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
            self._storage_full.ended("storage has room again: results jobs run")
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
        self._storage_full.failed(
            "results job %d study_id=%d waits: %s; results jobs are tried again every %.0f s "
            "without using their attempts until there is room",
            job.id,
            job.study_id,
            reason,
            STORAGE_WAIT_SECONDS,
        )
        raise Postponed(reason, STORAGE_WAIT_SECONDS)

    def free_orphaned_jobs(self) -> None:
        """Free the jobs that worker processes of this host held when they died, for a
        prompt takeover after a crash or a kill (their leases would run to their end, up to
        [worker] lease_seconds)."""
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

    def run_forever(
        self,
        stop: threading.Event,
        parent_pid: int | None = None,
        ready: Callable[[], None] | None = None,
    ) -> None:
        """Run jobs in ``[worker] threads`` threads until ``stop`` is set (or the parent
        process is gone); this thread handles reloads. Running jobs are finished first.
        ``ready`` is called once the jobs of dead workers are freed, the job signal listens
        (a job queued after it wakes this worker at once) and the job threads run (what a
        "ready" line may claim: a worker started later frees no lease of one killed before
        it was ready)."""
        self.free_orphaned_jobs()
        self.exports.bury_unrouted_exports()
        signal = JobSignal(self.sessions.kw["bind"]).start()
        self.leases.start()
        threads = [
            threading.Thread(target=self._job_loop, args=(stop, signal), name=f"job-{n}")
            for n in range(self.settings.worker.threads)
        ]
        reloads = threading.Thread(
            target=self._reload_on_request, args=(stop, parent_pid is None), name="reload"
        )
        for thread in [*threads, reloads]:
            thread.start()
        if ready is not None:
            ready()
        try:
            # Blocks until stopped (a signal handler sets ``stop`` in this thread at once),
            # looking now and then whether serve, which started it, is gone.
            while not stop.wait(None if parent_pid is None else PARENT_CHECK_SECONDS):
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.warning("parent process gone; worker exits")
                    break
        finally:
            stop.set()
            signal.stop()
            self.reload_requested.set()  # wakes the reload thread, which sees the stop
            for thread in [*threads, reloads]:
                thread.join()
            self.leases.stop()  # after the job threads: their jobs' leases are kept to the end
            self.reload_requested.clear()

    def _reload_on_request(self, stop: threading.Event, name_restart_only: bool) -> None:
        """Reload when :attr:`reload_requested` is set (SIGHUP), until ``stop``. A reload
        that fails unexpectedly is logged and the thread kept: it died, and every later
        SIGHUP was ignored."""
        while self.reload_requested.wait() and not stop.is_set():
            self.reload_requested.clear()
            try:
                reloaded = self.reload(name_restart_only=name_restart_only)
            except Exception:
                log.exception("reload failed; the running settings are kept")
                continue
            if reloaded:
                self.exports.bury_unrouted_exports()

    def _job_loop(self, stop: threading.Event, signal: JobSignal) -> None:
        """One job thread: claim and run jobs; when none is due, wait for a new one, for the
        next one to become due (backoff, expired leases) or at most ``[worker]
        poll_seconds``."""
        retry = 0.0
        while not stop.is_set():
            seen = signal.generation
            try:
                idle = self._run_next()
            except Exception as exc:
                # Backed off, doubling: a database refusing connections made every thread
                # log a traceback each poll (~10 a second).
                retry = min(LOOP_RETRY_LAST_SECONDS, retry * 2 or LOOP_RETRY_FIRST_SECONDS)
                if database_unavailable(exc):
                    # WARNING when it starts and as a reminder, else DEBUG.
                    self.outage.failed(
                        "database unavailable: %s; retrying in %.1f s, then at least every %.0f s",
                        database_reason(exc),
                        retry,
                        LOOP_RETRY_LAST_SECONDS,
                    )
                    log.debug("job thread: database unavailable", exc_info=exc)
                else:
                    log.exception("worker loop error; retrying in %.1f s", retry)
                # Woken early when job notifications resume (the database is back).
                signal.wait(seen, retry)
                continue
            retry = 0.0
            self.outage.ended("database available again after %(seconds).0f s")
            if idle is not None and not stop.is_set():
                signal.wait(seen, min(idle, self.settings.worker.poll_seconds))
