"""Prometheus metrics: ingest counters, job and inference histograms, database gauges.

``dicomnode serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before anything imports
``prometheus_client``, so its worker processes write their samples where ``/metrics``
(served by the main process) aggregates them. A ``dicomnode worker`` run by itself serves
its own samples (:func:`serve_process_metrics`, ``[worker] metrics_port``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    # Listener processes count stores here and load no database code.
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["CONTENT_TYPE_LATEST", "exposition"]

INSTANCES = Counter("dicomnode_instances_received", "Instances stored (C-STORE success, new)")
BYTES = Counter("dicomnode_received_bytes", "Bytes of new instances written to storage")
ASSOCIATIONS = Counter(
    "dicomnode_associations", "Associations by outcome (released, aborted, rejected)", ["outcome"]
)
REFUSALS = Counter(
    "dicomnode_refusals",
    "C-STORE refusals, association rejections and connections closed at accept, by reason",
    ["reason"],
)
JOB_SECONDS = Histogram(
    "dicomnode_job_duration_seconds",
    "Job durations by kind and stage (stage 'total' is the whole job)",
    ["kind", "stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
INFERENCE_SECONDS = Histogram(
    "dicomnode_inference_seconds",
    "onnxruntime session.run latency by model and execution provider",
    ["model", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EXPORT_FAILURES = Counter(
    "dicomnode_export_failures",
    "Result objects not sent by an export attempt, by destination: one per export job and "
    "attempt (a study's ~15 objects add ~15 per retry while the destination is down)",
    ["destination"],
)
EXPORT_ATTEMPTS_FAILED = Counter(
    "dicomnode_export_attempts_failed",
    "Export attempts (one association taking a study's result objects to a destination) "
    "that left objects unsent, by destination: one per retry while a destination is down, "
    "whatever the number of objects; the one to alert on",
    ["destination"],
)
RESULT_OBJECTS_FAILED = Counter(
    "dicomnode_result_objects_failed",
    "Result objects not written because their builder raised, by model and kind (sr, seg, "
    "overlay, gsps, derived, kos); kind 'run' counts a model whose run raised and 'all' one "
    "whose objects could not be prepared (none of their objects is written)",
    ["model", "kind"],
)

_STATUS_REASONS = {
    0xA700: "out_of_resources",
    0xC000: "cannot_understand",
    0xA900: "sop_class_mismatch",
}


def count_store(status: int, new_bytes: int) -> None:
    """Count one C-STORE: an instance and its bytes, or a refusal by reason."""
    if status == 0x0000:
        if new_bytes:
            INSTANCES.inc()
            BYTES.inc(new_bytes)
        return
    REFUSALS.labels(_STATUS_REASONS.get(status, f"status_{status:04x}")).inc()


def count_association(outcome: str) -> None:
    """Count an ended association (released, aborted)."""
    ASSOCIATIONS.labels(outcome).inc()


def count_rejection(reason: str) -> None:
    """Count a rejected association once as such and once by its reason (unknown_peer,
    called_ae, association_limit, address_limit, ...)."""
    ASSOCIATIONS.labels("rejected").inc()
    REFUSALS.labels(reason).inc()


# The job states dicomnode_queue_depth reports (done jobs are not queue depth).
QUEUE_STATES = ("queued", "leased", "dead")


class DatabaseCollector:
    """Gauges read from the database at scrape time: job queue depth, worklist by tier."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import func, or_, select

        from dicomnode.db.models import Job, Study
        from dicomnode.jobs.dead_letters import needs_retry
        from dicomnode.jobs.queue import KIND_PRIORITY

        queue = GaugeMetricFamily(
            "dicomnode_queue_depth",
            "Jobs waiting, running or dead-lettered (those no other job covers) by kind and state",
            labels=["kind", "state"],
        )
        worklist = GaugeMetricFamily(
            "dicomnode_worklist_size", "Studies not yet reported by tier", labels=["tier"]
        )
        failed = GaugeMetricFamily(
            "dicomnode_analyses_failed",
            "Studies not yet reported whose AI analysis failed (read without AI triage)",
        )
        with self.sessions() as session:
            # Dead-lettered jobs stay until an admin retries them (state "dead"); one whose
            # work another job does or did (an export a later results job queued again, an
            # analysis of the study queued after it) needs no retry and is not counted, so
            # that an alert on state="dead" > 0 ends when the work is done.
            jobs = session.execute(
                select(Job.kind, Job.state, func.count())
                .where(
                    Job.state.in_(QUEUE_STATES),
                    or_(Job.state != "dead", needs_retry(Job)),
                )
                .group_by(Job.kind, Job.state)
            ).all()
            failed.add_metric(
                [],
                session.scalar(
                    select(func.count()).where(
                        Study.analysis_status == "failed", Study.reading_status != "reported"
                    )
                )
                or 0,
            )
            tiers = dict(
                session.execute(
                    select(Study.tier, func.count())
                    .where(Study.reading_status != "reported")
                    .group_by(Study.tier)
                ).all()
            )
        # Every known kind and state has a sample, 0 when it has no jobs: an idle node's
        # dashboards and alerts (state="dead" > 0) see 0, not "no data", and a series that
        # had jobs goes back to 0 when they are gone. Kinds the node does not know (from a
        # newer version sharing the database) are reported as found.
        depth = {(kind, state): 0 for kind in KIND_PRIORITY for state in QUEUE_STATES}
        depth.update({(kind, state): count for kind, state, count in jobs})
        for (kind, state), count in depth.items():
            queue.add_metric([kind, state], count)
        for tier in ("stat", "critical", "urgent", "routine"):
            worklist.add_metric([tier], tiers.get(tier, 0))
        yield queue
        yield worklist
        yield failed


def exposition(sessions: sessionmaker[Session]) -> bytes:
    """The text exposition of every metric of this node (all its processes)."""
    database = CollectorRegistry(auto_describe=False)
    database.register(DatabaseCollector(sessions))
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        processes = CollectorRegistry()
        MultiProcessCollector(processes, path=folder)
        return generate_latest(processes) + generate_latest(database)
    return generate_latest(REGISTRY) + generate_latest(database)


def serve_process_metrics(host: str, port: int) -> WSGIServer:
    """Serve this process's metrics (not the database gauges: the node's ``/metrics`` has
    those) in Prometheus text format at ``http://host:port/metrics``, from a daemon thread.
    Raises OSError when the address cannot be bound (in use, not this host's)."""
    server, _ = start_http_server(port, addr=host)
    return server
