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

import logging
import os
import socket
import threading
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.config import Settings, changed_settings
from dicomnode.db.models import Job, ResultObject, Study
from dicomnode.db.session import as_utc, utcnow
from dicomnode.export.scu import DestinationUnavailable, send_files
from dicomnode.jobs import (
    BACKOFF_MAX_SECONDS,
    JobSignal,
    Postponed,
    claim,
    claim_alike,
    complete,
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
                # Keep working: ingest and other models go on; the studies this model is
                # selected for fail with this reason (visible on the study) until it is fixed.
                log.error("model card %s cannot be used: %s", card.card_path, exc)
                continue
            try:
                self.runtime.warm_up(card)
            except Exception as exc:  # a model may reject a blank image; studies will tell
                log.warning("model %s: warm-up run failed: %s", card.model.name, exc)

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
            detail = self._run(session, job, seconds)
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
        # Logged and shown to admins: an error may quote a patient's name or ID it refused.
        study = session.get(Study, job.study_id) if job.study_id is not None else None
        known = (
            patient_values(study.patient_name, (study.patient_id, study.accession_number))
            if study is not None
            else set()
        )
        reason = without_patient_data(f"{type(exc).__name__}: {exc}", known)
        log.warning(
            "job %d %s study_id=%d attempt %d failed after %.0f ms: %s",
            job.id,
            job.kind,
            job.study_id,
            job.attempts,
            (time.perf_counter() - started) * 1000,
            reason,
        )
        job = session.get(Job, job.id)
        # An export whose destination is down or vanished mid-association is kept until the
        # destination answers: nothing that was refused, nothing to give up on. Critical-result
        # notifications keep trying longer than other jobs.
        unreachable = job.kind == "export" and isinstance(exc, DestinationUnavailable)
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
        if not recorded:
            return
        if unreachable and job.attempts == self.settings.worker.max_attempts:
            log.error(
                "job %d export study_id=%d: destination %s unreachable in %d attempts; the "
                "export stays queued and is tried again at least every %.0f s until it "
                "answers: %s",
                job.id,
                job.study_id,
                job.payload.get("destination", ""),
                job.attempts,
                BACKOFF_MAX_SECONDS,
                reason,
            )
        if job.state != "dead":
            return
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
                    session, self.settings, self.cards, runtime, job.study_id, self.handover
                )
            for stage, spent in times.seconds.items():
                metrics.JOB_SECONDS.labels("analyse", stage).observe(spent)
            seconds.update(times.seconds)
            return str(times)
        if job.kind == "results":
            # Taken before anything can fail: a retry recomputes from the stored images. A job
            # postponed (a newer analysis is pending) keeps it for its next run.
            triaged = self.handover.take(job.id)
            up_to = job.payload.get("instances_up_to")
            try:
                times = write_results(
                    session,
                    self.settings,
                    self.cards,
                    self.runtime,
                    job.study_id,
                    job.id,
                    triaged,
                    None if up_to is None else int(up_to),
                )
            except Postponed:
                if triaged is not None:
                    self.handover.put(job.id, triaged, triaged.nbytes())
                raise
            for stage, spent in times.seconds.items():
                metrics.JOB_SECONDS.labels("results", stage).observe(spent)
            seconds.update(times.seconds)
            return str(times)
        if job.kind == "export":
            return self._export(session, job)
        if job.kind == "notify":
            return send_notification(session, self.settings.notify, job)
        raise ValueError(f"unknown job kind {job.kind!r}")

    def _export(self, session: Session, job: Job) -> str:
        """Send the job's result object to its destination, together with the study's other
        exports to that destination that are due, over one association (up to
        :data:`EXPORTS_PER_ASSOCIATION`); each of those jobs is completed or failed on its own.
        Raises why the job's own object was not taken."""
        name = job.payload["destination"]
        destination = next((d for d in self.settings.destinations if d.name == name), None)
        if destination is None:
            return f"destination {name!r} no longer configured"
        started = time.perf_counter()
        companions = claim_alike(
            session,
            job,
            self.owner,
            self.settings.worker.lease_seconds,
            lambda other: other.payload.get("destination") == name,
            EXPORTS_PER_ASSOCIATION - 1,
        )
        queued = {other.id: _queued_seconds(other) for other in companions}
        rows = {
            other.id: session.get(ResultObject, other.payload["result_id"])
            for other in [job, *companions]
        }
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
            outcomes = dict(zip(kinds, sent, strict=True))
        except Exception as exc:  # no association: every job of it fails alike
            for other in companions:
                self._record_failure(session, other, exc, started)
            raise
        if job.attempts > 1:
            # The destination answers again: what waits out its backoff for it goes now.
            hastened = hasten(
                session, "export", lambda other: other.payload.get("destination") == name
            )
            if hastened:
                log.info(
                    "destination %s answers again: %d waiting export(s) due now", name, hastened
                )
        for other in companions:
            outcome = outcomes.get(other.id)
            if outcome is not None:
                self._record_failure(session, other, outcome, started)
                continue
            detail = (
                f"{kinds[other.id]} -> {name} (with job {job.id})"
                if other.id in kinds
                else "result no longer exists"
            )
            self._record_done(session, other, {"queued": queued[other.id]}, detail, started)
        if job.id not in kinds:
            return "result no longer exists"
        if outcomes[job.id] is not None:
            raise outcomes[job.id]
        more = f", {len(companions)} more in the same association" if companions else ""
        return f"{kinds[job.id]} -> {name}{more}"

    def free_orphaned_jobs(self) -> None:
        """Free the jobs that worker processes of this host held when they died, for a
        prompt takeover after a crash or a kill (their leases would run for minutes)."""
        with self.sessions() as session:
            released = release_orphaned(session, socket.gethostname())
        if released:
            log.warning(
                "jobs %s were held by worker processes of this host that are gone; taken over now",
                ", ".join(map(str, released)),
            )

    def run_forever(self, stop: threading.Event, parent_pid: int | None = None) -> None:
        """Run jobs in ``[worker] threads`` threads until ``stop`` is set (or the parent
        process is gone); this thread handles reloads. Running jobs are finished first."""
        self.free_orphaned_jobs()
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
                    self.reload(name_restart_only=parent_pid is None)
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
        while not stop.is_set():
            seen = signal.generation
            try:
                busy = self.run_once()
            except Exception:
                log.exception("worker loop error; retrying")
                busy = False
            if not busy and not stop.is_set():
                signal.wait(seen, self.settings.worker.poll_seconds)


def _queued_seconds(job: Job) -> float:
    """Seconds the job has been due (to its claim, when called as it is claimed)."""
    return max(0.0, (utcnow() - as_utc(job.run_after)).total_seconds())
