"""Time to triage: from the last C-STORE of a chest X-ray study to its reprioritised worklist row.

Starts a real node (``dicomnode serve`` on SQLite in a temporary folder, one worker process,
the model cards of ``--models``, a dcmtk ``storescp`` as PACS destination), sends ``--studies``
synthetic PA chest radiographs (a mix of findings) with dcmtk ``storescu``, one association
per study, and measures for each study

  from the end of ``storescu`` (the last instance acknowledged, the association released)
  to the moment the study's row reads ``analysis_status = analysed`` with its tier set,

by polling the database every few milliseconds, and cross-checks it with the times the node
records (analysis job created/finished, per-stage seconds in the job payload). Prints p50, p95
and max, and the breakdown per stage: assembly wait (the quiet period after the association
and the assembly check), queue, decode, preprocess, inference, postprocess, database commits;
then what follows the triage, not part of it: the study's results job (its wait in the queue,
the models that do not set the priority, the result objects, and how often it had to run the
triage models again because the analysis was not handed over in memory) and the exports.

By default a study is sent when the previous one is triaged and exported (the latency of one
study on an idle node, as when studies arrive minutes apart); ``--interval S`` sends one every
S seconds instead, whatever the node is doing.

    python benchmarks/triage.py [--studies 50] [--size 2048] [--models models/]
        [--set assembly.quiet_seconds=0.3 --set worker.threads=2 ...] [--profile out.html]

``--profile`` runs the worker in a process of this script under pyinstrument (jobs one at a
time on its main thread) and writes the profile of all analysed studies.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from dicomnode.ports import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
GOAL_P50, GOAL_P95 = 1.0, 2.0
# Findings of the distinct phantoms, in turn (None = normal).
FINDING_MIX: list[tuple[str, ...]] = [
    (),
    ("pneumothorax",),
    ("effusion",),
    (),
    ("consolidation",),
    ("cardiomegaly",),
    ("nodule",),
    ("pneumothorax", "effusion"),
    ("edema",),
    (),
]
# Site settings for a CXR node: a radiograph study comes in one association, so a short quiet
# period after its release is enough to catch a second one. The worker's poll is left at its
# default: each queued job wakes it, and a short poll would hide a wake-up lost.
DEFAULT_SETTINGS = {
    "assembly": {"quiet_seconds": "0.2"},
    "worker": {"count": "1"},
}
STAGES = ("decode", "preprocess", "inference", "postprocess")
# Payload seconds that are not stages of the job body.
NOT_STAGES = {"queued", "total", "triaged"}
NOT_SHOWN = {
    "analyses", "assembly wait", "job other", "job total", "node finished", "node triaged",
    "exports", "export", "exported after", "claim+complete", "results written after",
    "results recomputed",
}  # fmt: skip
# The results job's stages (after the triage), shown with this prefix.
RESULTS = "results job: "


# ---------------------------------------------------------------------------------- studies


def phantoms(count: int, size: int, cache: Path) -> list[Path]:
    """``count`` distinct PA phantoms of ``size`` px (a mix of findings), cached on disk."""
    from dicomnode.synth.cxr import make_cxr

    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        findings = FINDING_MIX[index % len(FINDING_MIX)]
        seed = 7_000_000 + index
        path = cache / f"pa-{size}-{seed}-{'-'.join(findings) or 'normal'}.dcm"
        if not path.exists():
            ds, _ = make_cxr(seed, findings=findings, view="PA", size=size)
            partial = path.with_suffix(".part")
            ds.save_as(partial, enforce_file_format=True)
            partial.rename(path)
        paths.append(path)
    return paths


def write_studies(sources: list[Path], count: int, folder: Path, run_id: str) -> list[Study]:
    """``count`` studies from the phantoms in turn, each with its own patient and UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    studies = []
    for index in range(count):
        source = sources[index % len(sources)]
        ds = pydicom.dcmread(source)
        key = f"{run_id}-{index}"
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[key, "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[key, "series"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[key, "image"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"TRI{index:05d}"
        ds.PatientID = f"TRI{run_id[:6]}{index:05d}"
        path = folder / f"study-{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        studies.append(Study(index, str(ds.StudyInstanceUID), path, source.stem))
    return studies


@dataclass
class Study:
    index: int
    study_instance_uid: str
    path: Path
    phantom: str
    sent_at: float = 0.0  # time.time() when storescu returned
    send_seconds: float = 0.0
    triaged_at: float | None = None  # first poll that saw the row analysed with a tier
    tier: str = ""
    exported: bool = False
    node: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- node


def config_text(folder: Path, models: Path, ports: dict[str, int], settings: dict) -> str:
    sections = {
        "node": {"ae_title": '"DICOMNODE"', "host": '"127.0.0.1"', "port": str(ports["dicom"])},
        "storage": {"path": f'"{folder / "storage"}"'},
        "database": {"url": f'"sqlite:///{folder / "dicomnode.db"}"'},
        "web": {"host": '"127.0.0.1"', "port": str(ports["web"])},
        "models": {"folders": f'["{models}"]'},
    }
    for section, values in settings.items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
        lines.append("")
    if ports.get("pacs"):
        lines += [
            "[[destinations]]",
            'name = "pacs"',
            'ae_title = "PACS"',
            'host = "127.0.0.1"',
            f"port = {ports['pacs']}",
            "",
        ]
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``section.key=value`` (value as TOML) over the defaults."""
    settings = {section: dict(values) for section, values in DEFAULT_SETTINGS.items()}
    for item in items:
        name, _, value = item.partition("=")
        section, _, key = name.strip().partition(".")
        if not key or not value:
            raise SystemExit(f"--set wants section.key=value, got {item!r}")
        settings.setdefault(section, {})[key] = value.strip()
    return settings


class Node:
    """A running node, its PACS and (with --profile) the profiled worker."""

    def __init__(self, folder: Path, models: Path, settings: dict, export: bool, profile: Path):
        self.folder = folder
        self.ports = {"dicom": free_port(), "web": free_port()}
        self.processes: list[subprocess.Popen] = []
        env = {**os.environ, "TCP_NODELAY": "1"}
        if export:
            self.ports["pacs"] = free_port()
            (folder / "pacs").mkdir()
            pacs_log = folder / "pacs.log"
            pacs = subprocess.Popen(
                [STORESCP, "--aetitle", "PACS", "--output-directory", str(folder / "pacs"),
                 "--accept-all", str(self.ports["pacs"])],
                stdout=pacs_log.open("w"), stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
            self.processes.append(pacs)
            wait_for_port(self.ports["pacs"], pacs, timeout=120, log=pacs_log)
        self.config = folder / "dicomnode.toml"
        self.config.write_text(config_text(folder, models, self.ports, settings))
        self.log = folder / "node.log"
        serve = [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config)]
        if profile:
            serve += ["--workers", "0"]
        node = subprocess.Popen(
            serve, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=folder, env=env
        )
        self.processes.append(node)
        wait_for_port(self.ports["dicom"], node, timeout=120, log=self.log)
        wait_for_port(self.ports["web"], node, timeout=120, log=self.log)
        self.profiled: subprocess.Popen | None = None
        if profile:
            self.worker_log = folder / "worker.log"
            self.profiled = subprocess.Popen(
                [sys.executable, __file__, "--profile-worker", str(self.config), str(profile)],
                stdout=self.worker_log.open("w"), stderr=subprocess.STDOUT, cwd=folder, env=env,
            )  # fmt: skip
            self.processes.append(self.profiled)
        else:
            self.worker_log = self.log
        deadline = time.monotonic() + 180
        while not self._worker_ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"the worker did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.db = folder / "dicomnode.db"

    def _worker_ready(self) -> bool:
        return (
            re.search(r"worker \S+ ready", self.worker_log.read_text(errors="replace")) is not None
        )

    def store(self, path: Path) -> None:
        done = subprocess.run(
            [STORESCU, "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1",
             str(self.ports["dicom"]), str(path)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---------------------------------------------------------------------------------- watcher


class Watcher(threading.Thread):
    """Polls the node's SQLite database (read-only) for triaged studies and finished exports."""

    def __init__(self, db: Path, period: float = 0.005):
        super().__init__(name="watcher", daemon=True)
        self.db, self.period = db, period
        self.pending: dict[str, Study] = {}
        self.lock = threading.Condition()
        self.stopped = threading.Event()

    def watch(self, study: Study) -> None:
        with self.lock:
            self.pending[study.study_instance_uid] = study

    def run(self) -> None:
        connection = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            while not self.stopped.wait(self.period):
                with self.lock:
                    waiting = list(self.pending.values())
                for study in waiting:
                    self._check(connection, study)
        finally:
            connection.close()

    def _check(self, connection: sqlite3.Connection, study: Study) -> None:
        row = connection.execute(
            "SELECT id, analysis_status, tier FROM studies WHERE study_instance_uid = ?",
            (study.study_instance_uid,),
        ).fetchone()
        if row is None:
            return
        if study.triaged_at is None and row[1] in ("analysed", "failed") and row[2]:
            study.triaged_at = time.time()
            study.tier = row[2] if row[1] == "analysed" else "FAILED"
        if study.triaged_at is not None:
            unfinished = connection.execute(
                "SELECT count(*) FROM jobs WHERE study_id = ? AND state NOT IN ('done', 'dead')",
                (row[0],),
            ).fetchone()[0]
            if unfinished == 0:
                study.exported = True
                with self.lock:
                    self.pending.pop(study.study_instance_uid, None)
                    self.lock.notify_all()

    def wait_done(self, study: Study, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while study.study_instance_uid in self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lock.wait(min(remaining, 0.05))
        return True


# ------------------------------------------------------------------------------ node record


def node_records(db: Path, studies: list[Study]) -> None:
    """What the node recorded per study: analysis job times and stage seconds, exports."""
    from sqlalchemy import select

    from dicomnode.db.models import Job
    from dicomnode.db.models import Study as StudyRow
    from dicomnode.db.session import as_utc, make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{db}")
    try:
        with make_sessionmaker(engine)() as session:
            for study in studies:
                row = session.scalars(
                    select(StudyRow).where(StudyRow.study_instance_uid == study.study_instance_uid)
                ).one()
                jobs = session.scalars(select(Job).where(Job.study_id == row.id)).all()
                analyses = [j for j in jobs if j.kind == "analyse" and j.state == "done"]
                results = [j for j in jobs if j.kind == "results" and j.state == "done"]
                exports = [j for j in jobs if j.kind == "export" and j.state == "done"]
                if not analyses:
                    continue
                job = analyses[-1]
                seconds = job.payload.get("seconds", {})
                created = as_utc(job.created_at).timestamp()
                finished = as_utc(job.finished_at).timestamp()
                stages = [k for k in seconds if k not in NOT_STAGES]
                record = {
                    "analyses": len(analyses),
                    "assembly wait": created - study.sent_at,
                    "queued": seconds.get("queued", 0.0),
                    **{stage: seconds[stage] for stage in stages},
                    "job other": seconds.get("total", 0.0) - sum(seconds[k] for k in stages),
                    "job total": seconds.get("total", 0.0),
                    "node finished": finished - study.sent_at,
                    "exports": len(exports),
                    # From the first export job's start to the last's end (several exports run
                    # as one association, each job's seconds spanning all of it).
                    "export": max((as_utc(j.finished_at).timestamp() for j in exports), default=0.0)
                    - min(
                        (
                            as_utc(j.finished_at).timestamp()
                            - j.payload.get("seconds", {}).get("total", 0.0)
                            for j in exports
                        ),
                        default=0.0,
                    ),
                }
                # Between claim (created + queued) and finished, outside the timed job body:
                # the claim and the complete commits.
                record["claim+complete"] = (
                    finished - created - record["queued"] - record["job total"]
                )
                if "triaged" in seconds:  # the analysis commits the priority before results
                    record["node triaged"] = created + record["queued"] + seconds["triaged"]
                    record["node triaged"] -= study.sent_at
                if results:
                    # The result objects: a job of their own after the triage commit.
                    written = results[-1]
                    after = written.payload.get("seconds", {})
                    for key, value in after.items():
                        record[RESULTS + key] = value
                    record["results recomputed"] = "recompute" in after
                    record["results written after"] = (
                        as_utc(written.finished_at).timestamp() - study.sent_at
                    )
                if exports:
                    last = max(as_utc(j.finished_at).timestamp() for j in exports)
                    record["exported after"] = last - study.sent_at
                study.node = record
    finally:
        engine.dispose()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def report(studies: list[Study], node: Node, settings: dict, args: argparse.Namespace) -> bool:
    measured = [s for s in studies if s.triaged_at is not None]
    latencies = [s.triaged_at - s.sent_at for s in measured]
    recorded = [s.node["node finished"] for s in measured if s.node]
    print(f"\ntime to triage over {len(measured)} of {len(studies)} studies (seconds)")
    print(f"{'':40} {'p50':>7} {'p95':>7} {'max':>7} {'mean':>7}")

    def line(name: str, values: list[float]) -> None:
        if values:
            print(
                f"{name:40} {quantile(values, 0.5):7.3f} {quantile(values, 0.95):7.3f} "
                f"{max(values):7.3f} {statistics.fmean(values):7.3f}"
            )

    line("triage (row analysed, polled)", latencies)
    line("triage (job finished, node clock)", recorded)
    line(
        "triage (priority committed, node)",
        [s.node["node triaged"] for s in measured if s.node.get("node triaged")],
    )
    line("storescu (whole association)", [s.send_seconds for s in measured])
    print("\nbreakdown per stage (node's records; 'assembly wait' = quiet period + check):")
    seen = [k for s in measured for k in s.node if k not in STAGES]
    extra = [
        k
        for k in dict.fromkeys(seen)
        if k not in NOT_STAGES and k not in NOT_SHOWN and not k.startswith(RESULTS)
    ]
    keys = ["assembly wait", "queued", *STAGES, *extra, "job other", "claim+complete"]
    for key in keys:
        line(f"  {key}", [s.node.get(key, 0.0) for s in measured if s.node])
    after = [k for k in dict.fromkeys(seen) if k.startswith(RESULTS)]
    for key in sorted(after, key=lambda k: (k != RESULTS + "queued", k == RESULTS + "total")):
        line(f"  (after triage) {key}", [s.node[key] for s in measured if key in s.node])
    line(
        "  (after triage) results written, from send",
        [s.node["results written after"] for s in measured if "results written after" in s.node],
    )
    recomputed = sum(bool(s.node.get("results recomputed")) for s in measured if s.node)
    print(
        f"  (after triage) results jobs that ran the triage models again (analysis not "
        f"handed over in memory): {recomputed} of "
        f"{sum('results written after' in s.node for s in measured)}"
    )
    line(
        "  (after triage) export, first start to last end",
        [s.node["export"] for s in measured if s.node],
    )
    line(
        "  (after triage) exported, from send",
        [s.node["exported after"] for s in measured if s.node.get("exported after")],
    )
    tiers: dict[str, int] = {}
    for study in measured:
        tiers[study.tier] = tiers.get(study.tier, 0) + 1
    exports = sum(s.node.get("exports", 0) for s in measured if s.node)
    print(f"\ntiers: {tiers}; {exports} result objects exported to the PACS")
    reruns = [s.index for s in measured if s.node and s.node["analyses"] > 1]
    if reruns:
        print(f"studies analysed more than once (late instances?): {reruns}")
    p50, p95 = quantile(latencies, 0.5), quantile(latencies, 0.95)
    ok = len(measured) == len(studies) and p50 <= GOAL_P50 and p95 <= GOAL_P95
    print(
        f"\np50 {p50:.3f} s (goal <= {GOAL_P50}), p95 {p95:.3f} s (goal <= {GOAL_P95}): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return ok


def api_rows(node: Node, studies: list[Study]) -> None:
    """Read the worklist through the API, as a viewer would, and check every study is there."""
    from dicomnode.demo import add_demo_user

    _, token = add_demo_user(node.config)
    response = httpx.get(
        f"http://127.0.0.1:{node.ports['web']}/api/worklist",
        params={"limit": 500},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    response.raise_for_status()
    rows = {r["accession_number"]: r for r in response.json()["rows"]}
    analysed = sum(
        rows.get(f"TRI{s.index:05d}", {}).get("analysis_status") == "analysed" for s in studies
    )
    print(f"worklist API: {analysed}/{len(studies)} benchmark studies analysed with a priority")


# ------------------------------------------------------------------------------------ main


def models_line(node: Node) -> str:
    lines = [
        line.split("model ", 1)[1]
        for line in node.worker_log.read_text(errors="replace").splitlines()
        if " loaded, running on " in line
    ]
    return "\n  ".join(lines) or "(no model load lines in the log)"


def run(args: argparse.Namespace) -> int:
    settings = parse_overrides(args.set)
    folder = Path(tempfile.mkdtemp(prefix="dicomnode-triage-"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), load "
        f"{os.getloadavg()[0]:.2f}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; loopback; SQLite"
    )
    started = time.perf_counter()
    sources = phantoms(min(args.distinct, args.studies), args.size, args.cache)
    studies = write_studies(sources, args.studies + args.warm_up, folder / "studies", folder.name)
    warm, studies = studies[: args.warm_up], studies[args.warm_up :]
    size_mb = studies[0].path.stat().st_size / 1e6
    print(
        f"{len(studies)} PA studies of {args.size} px ({size_mb:.1f} MB, one instance each), "
        f"from {len(sources)} distinct phantoms ({time.perf_counter() - started:.0f} s to make)"
    )
    print("node settings: " + "; ".join(
        f"[{s}] " + ", ".join(f"{k} = {v}" for k, v in values.items())
        for s, values in settings.items()
    ))  # fmt: skip
    node = Node(folder, args.models.resolve(), settings, not args.no_export, args.profile)
    ok = False
    try:
        print(f"models ({args.models}):\n  {models_line(node)}")
        watcher = Watcher(node.db)
        watcher.start()
        for study in warm + studies:
            next_send = time.monotonic() + args.interval
            begin = time.time()
            node.store(study.path)
            study.sent_at = time.time()
            study.send_seconds = study.sent_at - begin
            watcher.watch(study)
            if args.interval <= 0:
                if not watcher.wait_done(study, args.timeout):
                    print(f"study {study.index} not triaged/exported in {args.timeout} s")
            else:
                time.sleep(max(0.0, next_send - time.monotonic()))
        for study in studies:
            watcher.wait_done(study, args.timeout)
        watcher.stopped.set()
        watcher.join()
        node_records(node.db, studies)
        ok = report(studies, node, settings, args)
        api_rows(node, studies)
    finally:
        node.stop()
        if args.keep:
            print(f"kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if args.profile:
        print(f"profile: {args.profile} (and {args.profile.with_suffix('.txt')})")
    return 0 if ok else 1


def profile_worker(config: Path, out: Path) -> int:
    """A worker running its jobs on the main thread under pyinstrument, until SIGTERM."""
    from pyinstrument import Profiler

    from dicomnode.cli.resources import database_sessions, model_cards
    from dicomnode.config import load_settings
    from dicomnode.logs import setup_logging
    from dicomnode.worker import Worker

    settings = load_settings(config)
    setup_logging(settings.log_level, settings.logging.json_lines)
    worker = Worker(settings, database_sessions(settings), model_cards(settings))
    worker.warm_up()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    profiler = Profiler(interval=0.001)
    import logging

    logging.getLogger("dicomnode.worker").info("worker %s ready (profiled)", worker.owner)
    profiler.start()
    while not stop.is_set():
        if not worker.run_once():
            # Idle time is not part of the hot path: stop sampling while waiting.
            profiler.stop()
            stop.wait(0.005)
            profiler.start()
    profiler.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profiler.output_html())
    out.with_suffix(".txt").write_text(profiler.output_text(unicode=True, show_all=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--profile-worker"]:
        return profile_worker(Path(argv[1]), Path(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048, help="rows = columns of the phantoms")
    parser.add_argument("--distinct", type=int, default=10, help="distinct phantoms (slow to make)")
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="node setting (TOML value) over the defaults, e.g. assembly.quiet_seconds=0.5",
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=0.0, help="0 = after the previous")
    parser.add_argument("--warm-up", type=int, default=2, help="studies sent first, not counted")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--no-export", action="store_true", help="no PACS destination")
    parser.add_argument("--profile", type=Path, help="write a pyinstrument profile (HTML)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "triage-cxr")
    parser.add_argument("--keep", action="store_true", help="keep the node's folder")
    args = parser.parse_args(argv)
    if args.profile:
        args.profile = args.profile.resolve()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
