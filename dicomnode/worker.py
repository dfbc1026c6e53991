"""The worker: claims jobs from the database and runs them (analysis, export).

Runs as its own process (``dicomnode worker``), so inference never stalls ingest; any
number of workers on any hosts may share one PostgreSQL database.
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
from dicomnode.config import Settings
from dicomnode.db.models import Job, ResultObject
from dicomnode.export.scu import send_file
from dicomnode.jobs import claim, complete, fail
from dicomnode.models.registry import ModelCard
from dicomnode.notify import send_notification
from dicomnode.pipeline.analyse import analyse_study, mark_failed
from dicomnode.pipeline.runtime import ModelLoadError, Runtime

log = logging.getLogger("dicomnode.worker")


class Worker:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], cards: list[ModelCard]):
        self.settings = settings
        self.sessions = sessions
        self.cards = cards
        self.runtime = Runtime(settings.worker.providers)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # Set by SIGHUP: re-read the configuration between jobs.
        self.reload_requested = threading.Event()

    def reload(self) -> bool:
        """Re-read settings and cards; keep the old ones if the new ones are invalid."""
        from dicomnode.checkconfig import load_checked
        from dicomnode.tomlfile import ConfigError

        if self.settings.source is None:
            return False
        try:
            settings, cards = load_checked(self.settings.source)
        except ConfigError as exc:
            log.error("reload refused, the running configuration is kept: %s", exc)
            return False
        # Keep the warm sessions only of models whose card is unchanged.
        unchanged = {(c.model.name, c.model.version) for c in cards if c in self.cards}
        if settings.worker.providers != self.settings.worker.providers:
            self.runtime = Runtime(settings.worker.providers)
        else:
            self.runtime.keep_only(unchanged)
        self.settings, self.cards = settings, cards
        log.info("worker %s reloaded: %d model card(s)", self.owner, len(cards))
        return True

    def warm_up(self) -> None:
        """Open every model's session now, so the first study does not pay for it."""
        for card in self.cards:
            try:
                self.runtime.session(card)
            except ModelLoadError as exc:
                # Keep working: ingest and other models go on; the studies this model is
                # selected for fail with this reason (visible on the study) until it is fixed.
                log.error("model card %s cannot be used: %s", card.card_path, exc)

    def run_once(self) -> bool:
        """Claim and run one due job; False when none was due."""
        with self.sessions() as session:
            job = claim(
                session,
                self.owner,
                ["analyse", "export", "notify"],
                self.settings.worker.lease_seconds,
            )
            if job is None:
                return False
            started = time.perf_counter()
            try:
                detail = self._run(session, job)
            except Exception as exc:
                session.rollback()
                if job.kind == "export":
                    metrics.EXPORT_FAILURES.labels(job.payload.get("destination", "")).inc()
                reason = f"{type(exc).__name__}: {exc}"
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
                # Critical-result notifications keep trying longer than other jobs.
                attempts = (
                    self.settings.notify.max_attempts
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
                if recorded and job.kind == "analyse" and job.state == "dead":
                    mark_failed(session, job.study_id, reason, self.settings.worklist)
                return True
            if not complete(session, session.get(Job, job.id), owner=self.owner):
                log.warning("job %d: lease expired while running; another worker owns it", job.id)
                return True
            metrics.JOB_SECONDS.labels(job.kind, "total").observe(time.perf_counter() - started)
            log.info(
                "job %d %s study_id=%d done in %.0f ms %s",
                job.id,
                job.kind,
                job.study_id,
                (time.perf_counter() - started) * 1000,
                detail,
            )
            return True

    def _run(self, session: Session, job: Job) -> str:
        if job.kind == "analyse":
            times = analyse_study(session, self.settings, self.cards, self.runtime, job.study_id)
            for stage, seconds in times.seconds.items():
                metrics.JOB_SECONDS.labels("analyse", stage).observe(seconds)
            return str(times)
        if job.kind == "export":
            result = session.get(ResultObject, job.payload["result_id"])
            if result is None:
                return "result no longer exists"
            destination = next(
                (d for d in self.settings.destinations if d.name == job.payload["destination"]),
                None,
            )
            if destination is None:
                return f"destination {job.payload['destination']!r} no longer configured"
            send_file(Path(result.path), destination, self.settings.node.ae_title)
            return f"{result.kind} -> {destination.name}"
        if job.kind == "notify":
            return send_notification(session, self.settings.notify, job)
        raise ValueError(f"unknown job kind {job.kind!r}")

    def run_forever(self, stop: threading.Event, parent_pid: int | None = None) -> None:
        """Poll for jobs until ``stop`` is set (or the parent process is gone)."""
        while not stop.is_set():
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("parent process gone; worker exits")
                return
            try:
                busy = self.run_once()
            except Exception:
                log.exception("worker loop error; retrying")
                busy = False
            if not busy:
                stop.wait(self.settings.worker.poll_seconds)
