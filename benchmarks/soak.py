"""Soak: a real node under a steady stream of studies for many minutes, watched for leaks.

Starts a real node as ``triage.py`` does (``dicomnode serve`` on SQLite in a temporary folder,
the model cards of ``--models``, default worker settings, a dcmtk ``storescp`` as PACS
destination, ``[assembly] quiet_seconds = 0.2``) and for ``--minutes`` sends one study every
``--interval`` seconds with dcmtk ``storescu`` (``TCP_NODELAY=1``), one association per study:
PA chest phantoms (``dicomnode.synth.cxr``, ``--size`` px, a mix of findings) and every
``--ct-every``-th study a short CT series (``dicomnode.synth.ct``, ``--ct-slices`` slices of
256 x 256); each study with its own patient, accession and UIDs.

Every ``--sample-seconds`` it records, for ``serve`` and each of its child processes
(listeners, workers), the resident memory (VmRSS), open file descriptors and threads; the
SQLite file sizes (and -wal), the jobs by state, the files under storage, and each study's time
to triage (from the end of ``storescu`` to the first poll that sees the study analysed with
its tier, as ``triage.py`` measures it). At the end it prints the samples over time, per
process the growth of RSS, fds and threads from the first quarter of the sending window
(after ``--settle`` seconds) to the last, per 100 studies, and time to triage p50/p95 in
the first and last quarter.

Exit status 1 if any study was not triaged and exported (``--drain`` seconds after the last
send), any job is dead, a node process exited, or a process's fds or threads grew without
bound: the fewest of the last quarter's samples above the most of the first quarter's (by
more than ``FD_SLACK`` / ``THREAD_SLACK``), a count that only rises.

    python benchmarks/soak.py [--minutes 10] [--interval 2] [--size 1024] [--ct-every 10]
        [--ct-slices 24] [--sample-seconds 10] [--settle 60] [--models models/] [--keep]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import descendants, rss_bytes  # beside this file
from triage import (  # beside this file
    STORESCU,
    Node,
    Study,
    Watcher,
    node_records,
    phantoms,
    quantile,
    write_studies,
)

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"assembly": {"quiet_seconds": "0.2"}}
CT_ROWS = 256
# A count may sit this much higher in the last quarter (a pool grown once to its size).
FD_SLACK, THREAD_SLACK = 4, 2


# ---------------------------------------------------------------------------------- studies


def write_ct_studies(count: int, slices: int, folder: Path, run_id: str) -> list[Study]:
    """``count`` CT series (one study each) from one phantom, each with its own patient and
    UIDs; a study's ``path`` is its folder of slices."""
    from pydicom.uid import generate_uid

    from dicomnode.synth.ct import make_ct_series

    template, _ = make_ct_series(8_100_000, rows=CT_ROWS, slices=slices)
    studies = []
    for index in range(count):
        key = f"{run_id}-ct-{index}"
        series = folder / f"ct-{index:05d}"
        series.mkdir(parents=True)
        study_uid = generate_uid(entropy_srcs=[key, "study"])
        series_uid = generate_uid(entropy_srcs=[key, "series"])
        frame_uid = generate_uid(entropy_srcs=[key, "frame"])
        for number, ds in enumerate(template):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[key, "slice", str(number)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"SOAKCT{run_id[:6]}{index:05d}"
            ds.AccessionNumber = f"SOAKCT{index:05d}"
            ds.save_as(series / f"{number:04d}.dcm", enforce_file_format=True)
        studies.append(Study(index, str(study_uid), series, "ct"))
    return studies


def send_series(node: Node, folder: Path) -> None:
    """Every file of ``folder`` in one association (``storescu`` scanning the folder)."""
    done = subprocess.run(
        [STORESCU, "-aet", "MODALITY", "-aec", "DICOMNODE", "+sd", "127.0.0.1",
         str(node.ports["dicom"]), str(folder)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")


def schedule(cxr: list[Study], ct: list[Study], ct_every: int) -> list[Study]:
    """The sending order: CXR studies and, second and then every ``ct_every``-th, a CT series
    (so that a warm-up of two studies has one of each)."""
    order: list[Study] = []
    cxr_left, ct_left = iter(cxr), iter(ct)
    for position in range(len(cxr) + len(ct)):
        pick = ct_left if ct_every and position % ct_every == 1 else cxr_left
        study = next(pick, None) or next(cxr_left, None) or next(ct_left, None)
        if study is not None:
            order.append(study)
    return order


# --------------------------------------------------------------------------------- sampling


@dataclass
class Usage:
    rss_mb: float
    fds: int
    threads: int


@dataclass
class Sample:
    seconds: float  # since the first study after the warm-up was sent
    sent: int
    triaged: int
    exported: int
    processes: dict[str, Usage]
    db_mb: float
    wal_mb: float
    jobs: dict[str, int]
    storage_files: int
    triage_p50: float  # of the studies triaged since the previous sample


def usage(pid: int) -> Usage | None:
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as handle:
            threads = next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))
    except (OSError, StopIteration):
        return None
    return Usage(rss_bytes(pid) / 1e6, fds, threads)


class Processes:
    """Names ``serve``'s process and its children (``listener1``, ``worker1``, ...) by the
    order they were first seen; a restarted child gets a new name."""

    def __init__(self, serve_pid: int):
        self.serve_pid = serve_pid
        self.names: dict[int, str] = {serve_pid: "serve"}

    def name(self, pid: int) -> str:
        if pid not in self.names:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                command = []
            words = [w.decode(errors="replace") for w in command]
            kind = next((w for w in ("listener", "worker") if w in words), "child")
            seen = sum(name.startswith(kind) for name in self.names.values())
            self.names[pid] = f"{kind}{seen + 1}"
        return self.names[pid]

    def usage(self) -> dict[str, Usage]:
        found = {}
        for pid in [self.serve_pid, *descendants(self.serve_pid)]:
            measured = usage(pid)
            if measured is not None:
                found[self.name(pid)] = measured
        return found


def files_under(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def jobs_by_state(db: Path) -> dict[str, int]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = connection.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
    finally:
        connection.close()
    return dict(rows)


@dataclass
class Soak:
    node: Node
    processes: Processes
    studies: list[Study] = field(default_factory=list)  # sent, in order
    failed_sends: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0  # monotonic, first counted study
    stopped_sending: float = 0.0
    _last_triaged: float = 0.0  # time.time() of the previous sample

    def sample(self) -> None:
        now = time.time()
        recent = [
            s.triaged_at - s.sent_at
            for s in self.studies
            if s.triaged_at is not None and self._last_triaged < s.triaged_at <= now
        ]
        self._last_triaged = now
        db = self.node.db
        wal = db.with_name(db.name + "-wal")
        self.samples.append(
            Sample(
                seconds=time.monotonic() - self.started,
                sent=len(self.studies),
                triaged=sum(s.triaged_at is not None for s in self.studies),
                exported=sum(s.exported for s in self.studies),
                processes=self.processes.usage(),
                db_mb=db.stat().st_size / 1e6,
                wal_mb=wal.stat().st_size / 1e6 if wal.exists() else 0.0,
                jobs=jobs_by_state(db),
                storage_files=files_under(self.node.folder / "storage"),
                triage_p50=quantile(recent, 0.5),
            )
        )

    def sample_every(self, period: float, stop: threading.Event) -> None:
        while not stop.wait(period):
            self.sample()


# ---------------------------------------------------------------------------------- report


def quarters(soak: Soak, settle: float) -> tuple[list[Sample], list[Sample]]:
    """The samples of the first and last quarter of the sending window, the first quarter's
    taken after ``settle`` seconds (a node's first studies fill its caches and pools: the
    whole node grew ~250 MB over its first ten studies, once, which read as growth per
    study when the first quarter began at the start)."""
    window = soak.stopped_sending - soak.started
    during = [s for s in soak.samples if s.seconds <= window]
    settle = min(settle, window / 2)
    first = [s for s in during if settle <= s.seconds <= settle + (window - settle) / 4]
    last = [s for s in during if s.seconds >= window * 3 / 4]
    return first, last


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def print_samples(samples: list[Sample]) -> None:
    print(
        f"\n{'min':>5} {'sent':>5} {'triaged':>7} {'exported':>8} {'queued':>6} {'leased':>6} "
        f"{'done':>6} {'dead':>4} {'RSS MB':>7} {'fds':>5} {'thr':>4} {'db MB':>6} "
        f"{'wal MB':>6} {'files':>6} {'ttt p50':>7}"
    )
    for s in samples:
        procs = s.processes.values()
        print(
            f"{s.seconds / 60:5.1f} {s.sent:5d} {s.triaged:7d} {s.exported:8d} "
            f"{s.jobs.get('queued', 0):6d} {s.jobs.get('leased', 0):6d} "
            f"{s.jobs.get('done', 0):6d} {s.jobs.get('dead', 0):4d} "
            f"{sum(p.rss_mb for p in procs):7.0f} {sum(p.fds for p in procs):5d} "
            f"{sum(p.threads for p in procs):4d} {s.db_mb:6.1f} {s.wal_mb:6.1f} "
            f"{s.storage_files:6d} {s.triage_p50:7.3f}"
        )
    print("(RSS, fds, threads: serve and its children together; ttt p50: time to triage of")
    print(" the studies triaged since the previous sample, seconds)")


def growth(first: list[Sample], last: list[Sample]) -> list[str]:
    """Per process: first- and last-quarter means, growth per 100 studies; the unbounded."""
    studies = mean([s.sent for s in last]) - mean([s.sent for s in first])
    per_100 = 100 / studies if studies > 0 else float("nan")
    names = list(dict.fromkeys(n for s in first + last for n in s.processes))
    print(
        f"\ngrowth from the first to the last quarter ({studies:.0f} studies apart), "
        "per process: first-quarter mean -> last-quarter mean (per 100 studies)"
    )
    print(f"{'process':10} {'RSS MB':>28} {'fds':>24} {'threads':>24}")
    unbounded = []
    for name in names:
        cells = []
        for metric, slack in (("rss_mb", None), ("fds", FD_SLACK), ("threads", THREAD_SLACK)):
            early = [getattr(s.processes[name], metric) for s in first if name in s.processes]
            late = [getattr(s.processes[name], metric) for s in last if name in s.processes]
            if not early or not late:
                cells.append(f"{'(not in both)':>24}")
                continue
            a, b = mean(early), mean(late)
            cells.append(f"{a:8.1f} -> {b:8.1f} ({(b - a) * per_100:+6.2f})")
            if slack is not None and min(late) > max(early) + slack:
                unbounded.append(f"{name} {metric} {max(early)} -> {min(late)}")
        print(f"{name:10} {cells[0]:>28} {cells[1]:>24} {cells[2]:>24}")
    s_first, s_last = first[-1], last[-1]
    per_study = (s_last.storage_files - s_first.storage_files) / max(1, s_last.sent - s_first.sent)
    print(
        f"database {first[0].db_mb:.1f} -> {s_last.db_mb:.1f} MB (wal {s_last.wal_mb:.1f} MB); "
        f"files under storage {per_study:.1f} per study"
    )
    return unbounded


def triage_quarters(soak: Soak) -> None:
    window = soak.stopped_sending - soak.started
    start = time.time() - (time.monotonic() - soak.started)
    print("\ntime to triage (seconds, end of storescu to the study analysed with its tier)")
    print(f"{'':22} {'studies':>7} {'p50':>7} {'p95':>7} {'max':>7}")
    for label, low, high in (
        ("first quarter", 0.0, window / 4),
        ("last quarter", window * 3 / 4, window),
        ("all", 0.0, window),
    ):
        chosen = [s for s in soak.studies if low <= s.sent_at - start <= high]
        for kind in ("cxr", "ct"):
            values = [
                s.triaged_at - s.sent_at
                for s in chosen
                if s.triaged_at is not None and (s.phantom == "ct") == (kind == "ct")
            ]
            if values:
                print(
                    f"{label + ' ' + kind.upper():22} {len(values):7d} "
                    f"{quantile(values, 0.5):7.3f} {quantile(values, 0.95):7.3f} "
                    f"{max(values):7.3f}"
                )
    recorded = [s.node["node triaged"] for s in soak.studies if s.node.get("node triaged")]
    if recorded:
        print(
            f"{'all (node records)':22} {len(recorded):7d} {quantile(recorded, 0.5):7.3f} "
            f"{quantile(recorded, 0.95):7.3f} {max(recorded):7.3f}"
        )


def report(soak: Soak, settle: float) -> bool:
    print_samples(soak.samples)
    first, last = quarters(soak, settle)
    unbounded = growth(first, last) if first and last else ["too few samples"]
    triage_quarters(soak)
    missing = [s.study_instance_uid for s in soak.studies if not s.exported]
    final = soak.samples[-1]
    names = set(soak.samples[0].processes)
    gone = sorted(names - set(final.processes))
    new = sorted(set(final.processes) - names)
    problems = [
        *(f"fds/threads grew without bound: {item}" for item in unbounded),
        *([f"{len(missing)} studies not triaged and exported"] if missing else []),
        *([f"{final.jobs['dead']} dead jobs"] if final.jobs.get("dead") else []),
        *([f"{len(soak.failed_sends)} sends failed"] if soak.failed_sends else []),
        *([f"node processes gone: {gone}, new: {new}"] if gone or new else []),
    ]
    print(
        f"\n{len(soak.studies)} studies sent "
        f"({sum(s.phantom == 'ct' for s in soak.studies)} CT), "
        f"{sum(s.exported for s in soak.studies)} triaged and exported; jobs {final.jobs}"
    )
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return not problems


# -------------------------------------------------------------------------------------- run


def send(soak: Soak, study: Study, watcher: Watcher) -> None:
    begin = time.time()
    try:
        if study.path.is_dir():
            send_series(soak.node, study.path)
        else:
            soak.node.store(study.path)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        soak.failed_sends.append(f"{study.study_instance_uid}: {error}")
        print(f"send failed: {error}", file=sys.stderr)
        return
    study.sent_at = time.time()
    study.send_seconds = study.sent_at - begin
    soak.studies.append(study)
    watcher.watch(study)
    if study.path.is_dir():
        shutil.rmtree(study.path)
    else:
        study.path.unlink()


def make_studies(args: argparse.Namespace, folder: Path) -> list[Study]:
    started = time.perf_counter()
    total = math.ceil(args.minutes * 60 / args.interval) + args.warm_up
    ct_count = total // args.ct_every if args.ct_every else 0
    sources = phantoms(args.distinct, args.size, args.cache)
    run_id = folder.name.rsplit("-", 1)[-1]
    cxr = write_studies(sources, total - ct_count, folder / "studies", run_id)
    for study in cxr:
        study.phantom = "cxr"
    ct = write_ct_studies(ct_count, args.ct_slices, folder / "studies", run_id)
    print(
        f"{total} studies made ({ct_count} CT series of {args.ct_slices} slices, the rest "
        f"PA phantoms of {args.size} px) in {time.perf_counter() - started:.0f} s"
    )
    return schedule(cxr, ct, args.ct_every)


def run(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="dicomnode-soak-"))
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), load "
        f"{os.getloadavg()[0]:.2f}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {commit}; "
        f"loopback; SQLite; one study every {args.interval} s for {args.minutes} min"
    )
    order = make_studies(args, folder)
    node = Node(folder, args.models.resolve(), SETTINGS, True, None)
    soak = Soak(node, Processes(node.processes[-1].pid))
    watcher = Watcher(node.db, period=0.02)
    watcher.start()
    stop_sampling = threading.Event()
    try:
        for study in order[: args.warm_up]:
            send(soak, study, watcher)
            watcher.wait_done(study, args.drain)
        soak.studies.clear()
        soak.started = time.monotonic()
        soak.sample()
        sampler = threading.Thread(
            target=soak.sample_every, args=(args.sample_seconds, stop_sampling), daemon=True
        )
        sampler.start()
        end = soak.started + args.minutes * 60
        for position, study in enumerate(order[args.warm_up :]):
            if time.monotonic() >= end:
                break
            send(soak, study, watcher)
            time.sleep(max(0.0, soak.started + (position + 1) * args.interval - time.monotonic()))
        soak.stopped_sending = time.monotonic()
        deadline = time.monotonic() + args.drain
        for study in soak.studies:
            watcher.wait_done(study, max(0.0, deadline - time.monotonic()))
        stop_sampling.set()
        sampler.join()
        soak.sample()
        watcher.stopped.set()
        watcher.join()
        node_records(node.db, soak.studies)
        ok = report(soak, args.settle)
    finally:
        stop_sampling.set()
        node.stop()
        if args.keep:
            print(f"kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between studies")
    parser.add_argument("--size", type=int, default=1024, help="rows = columns of the phantoms")
    parser.add_argument("--distinct", type=int, default=10, help="distinct CXR phantoms")
    parser.add_argument("--ct-every", type=int, default=10, help="every N-th study a CT (0: no)")
    parser.add_argument("--ct-slices", type=int, default=24)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds left out of the first quarter"
    )
    parser.add_argument("--warm-up", type=int, default=2, help="studies sent first, not counted")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds to wait at the end")
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "triage-cxr")
    parser.add_argument("--keep", action="store_true", help="keep the node's folder")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
