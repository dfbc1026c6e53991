"""Ingest throughput: dicomnode against dcmtk storescp and a bare pynetdicom SCP.

Two workloads (cached under ``--cache``): ``--dx`` DX radiographs of ~10 MB (2240 x 2240,
16 bit, one study each) and ``--ct`` CT slices of ~0.5 MB (512 x 512, one study). Each is
sent by dcmtk ``storescu`` (one association, TCP_NODELAY=1) to

  (a) dcmtk ``storescp`` writing to a folder (TCP_NODELAY=1),
  (b) ``benchmarks/reference_scp.py``: bare pynetdicom writing the received bytes,
      no fsync, no database,
  (c) ``dicomnode serve`` (durable spool: fsync + rename + folder fsync; study, series and
      instance rows; ``--listeners`` listener processes; no workers),

and the script prints MB/s, instances/s, the CPU time per instance of the target's processes
and of the senders (on a machine with few cores, what bounds many senders), and the ratios
c/a and c/b. Then the CT workload goes again in ``--senders`` concurrent storescu processes
(equal shares) to each target, right after one more single-sender run of it to the same
target, and the script prints the speed-up of many senders over that single sender, with
what the machine's cores allow at the CPU per instance the two runs took (the CPU of a
``--database`` server is not counted).
Then ``--associations`` (default 100) CT slices go one association each, one ``storescu``
after another (a modality sending each image as it is made; what an association costs to
set up and release), and the script prints the time and target CPU per association.
With ``--big-mb`` (default 1000) one multi-frame instance of that size is sent to the node
in one association while the resident memory of all the node's processes is sampled; the
peak is printed.
Every store is checked: storescu must exit 0, every instance must be in the target's
folder, and for (c) every instance must have its database row.

    python benchmarks/ingest.py [--dx 60] [--ct 1000] [--senders 4] [--associations 100]
        [--big-mb 1000] [--listeners 4] [--database URL] [--profile FOLDER] [--rounds N]

``--rounds N`` measures the targets in turn N times (a, b, c, a, b, c, ...) and prints each
round's ratios and their median: on a shared virtual machine whose speed drifts over minutes,
the ratio of runs made back to back is steadier than any single throughput.

Each run's files are kept (moved aside) until the script ends, not deleted when the run
ends: see ``retire``.

``--profile FOLDER`` samples the node's processes with py-spy (in the dev extra)
in an extra single-sender CT run (not counted) and writes one collapsed-stack file per
process there (``--idle``: waits count, so the files show where the wall time goes).
Run it under the team's CPU lock: ``flock /tmp/dicomnode-cpu.lock python benchmarks/...``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.ports import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
STORESCU = os.environ.get("STORESCU", "/usr/bin/storescu")
STORESCP = os.environ.get("STORESCP", "/usr/bin/storescp")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DX_SIZE = 2240  # 2240 x 2240 x 16 bit = 10.0 MB
CT_ROWS = 512  # 512 x 512 x 16 bit = 0.5 MB
CT_RENDERED = 50  # slices rendered; the rest are copies with their own UIDs
BIG_SIDE = 2048


# Workloads -------------------------------------------------------------------------


def _save_copies(template: list[Dataset], count: int, folder: Path, *, one_study: bool) -> None:
    """``count`` files cycling over ``template`` with new UIDs (``one_study``: one study and
    series; else one study per file)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for index in range(count):
        ds = template[index % len(template)]
        if not one_study:
            study_uid, series_uid = generate_uid(), generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        if one_study and "ImagePositionPatient" in ds:
            ds.ImagePositionPatient = [-150.0, -150.0, -float(index)]
            ds.SliceLocation = -float(index)
        ds.save_as(folder / f"{index:05d}.dcm", enforce_file_format=True)


def make_dx(folder: Path, count: int) -> None:
    from dicomnode.synth.cxr import make_cxr

    ds, _ = make_cxr(8, size=DX_SIZE, bits=16)
    _save_copies([ds], count, folder, one_study=False)


def make_ct(folder: Path, count: int) -> None:
    from dicomnode.synth.ct import make_ct_series

    slices, _ = make_ct_series(8, rows=CT_ROWS, slices=min(count, CT_RENDERED))
    _save_copies(slices, count, folder, one_study=True)


def make_big(path: Path, megabytes: int) -> None:
    """One Multi-frame Grayscale Word SC instance of about ``megabytes`` MB, written in
    chunks (the pixel data is never whole in this process's memory either)."""
    from dicomnode.synth.multiframe import write_multiframe_word_sc

    frame_bytes = BIG_SIDE * BIG_SIDE * 2
    frames = max(1, megabytes * 1_000_000 // frame_bytes)
    frame = bytes(range(256)) * (frame_bytes // 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    write_multiframe_word_sc(partial, BIG_SIDE, frames, frame, "BENCHBIG", "Bench^Big")
    partial.rename(path)


def workload(cache: Path, name: str, count: int) -> Path:
    """The cached folder of ``count`` ``name`` files, made on first use."""
    folder = cache / f"{name}-{count}"
    if (folder / "complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"generating {count} {name} instances in {folder} ...", flush=True)
    (make_dx if name == "dx" else make_ct)(folder, count)
    (folder / "complete").write_text("")
    return folder


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


# Targets ---------------------------------------------------------------------------

# Below this much free space, finished runs' files are deleted at once after all.
RETIRED_FREE_BYTES = 8 * 1024**3


def retire(folder: Path) -> None:
    """Move a finished run's folder aside (into ``retired/`` beside it); the script deletes
    them all at its end.

    Deleting a run's thousands of files at once would charge the next target for them on a
    file system like this VM's (ext4 without a journal): for 60 s after a deletion (300 s
    while the inode's block is unwritten) ext4 will not reuse the inode, and each new file
    then costs a scan past every such inode (``find_inode_bit``/``recently_deleted``):
    0.56-0.76 ms of kernel CPU per file created instead of 0.02 ms.
    """
    if not folder.exists():
        return
    retired = folder.parent / "retired"
    if shutil.disk_usage(folder).free < RETIRED_FREE_BYTES:
        shutil.rmtree(retired, ignore_errors=True)
    retired.mkdir(exist_ok=True)
    folder.rename(retired / f"{folder.name}-{time.monotonic_ns()}")


class Target:
    """Something storescu sends to; ``run`` starts it fresh and stops it afterwards."""

    label = ""
    ae_title = ""

    def __init__(self, work: Path):
        self.work = work
        self.port = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        """Instances the target has stored (and, for the node, indexed)."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process else []

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        retire(self.work)

    @contextmanager
    def running(self) -> Iterator[Target]:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.port = free_port()
        self.start()
        try:
            yield self
        finally:
            self.stop()


class DcmtkSCP(Target):
    label = "a dcmtk storescp"
    ae_title = "STORESCP"

    def start(self) -> None:
        out = self.work / "out"
        out.mkdir()
        self.process = subprocess.Popen(
            [STORESCP, "-aet", self.ae_title, "-od", str(out), str(self.port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)

    def stored(self) -> int:
        return sum(1 for path in (self.work / "out").iterdir() if path.is_file())


class ReferenceSCP(Target):
    label = "b pynetdicom reference"
    ae_title = "REFERENCE"

    def __init__(self, work: Path, max_pdu: int):
        super().__init__(work)
        self.max_pdu = max_pdu

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "benchmarks" / "reference_scp.py"),
                "--port",
                str(self.port),
                "--folder",
                str(self.work / "out"),
                "--max-pdu",
                str(self.max_pdu),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)

    def stored(self) -> int:
        return sum(1 for _ in (self.work / "out").glob("*.dcm"))


class Node(Target):
    label = "c dicomnode"
    ae_title = "DICOMNODE"

    def __init__(self, work: Path, listeners: int, database: str | None, max_pdu: int):
        super().__init__(work)
        self.listeners = listeners
        self.database = database
        self.max_pdu = max_pdu

    def _database_url(self) -> str:
        return self.database or f"sqlite:///{self.work / 'dicomnode.db'}"

    def start(self) -> None:
        models = self.work / "no-models"
        models.mkdir()
        web_port = free_port()
        config = self.work / "dicomnode.toml"
        # log_level is a top-level key: before the first table.
        config.write_text(
            'log_level = "WARNING"\n'
            f'[node]\nae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f"listeners = {self.listeners}\nmax_associations = 64\nmax_pdu = {self.max_pdu}\n"
            # Every sender connects from 127.0.0.1: no per-address limit (default 16).
            "max_associations_per_address = 0\n"
            f'[storage]\npath = "{self.work / "storage"}"\nmin_free_bytes = 0\n'
            f'[database]\nurl = "{self._database_url()}"\n'
            f'[web]\nhost = "127.0.0.1"\nport = {web_port}\n'
            "[worker]\ncount = 0\n"
            f'[models]\nfolders = ["{models}"]\n'
        )
        if self.database:
            self._clear_database()
        self.log = (self.work / "node.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
        )
        # The supervisor binds the DICOM port before its listeners have started; the web
        # server starts once they all listen.
        try:
            wait_for_port(web_port, self.process)
        except RuntimeError:
            self.log.flush()
            tail = (self.work / "node.log").read_text(errors="replace").splitlines()[-20:]
            print("\n".join(["node.log, last lines:", *tail]), file=sys.stderr)
            raise

    def _clear_database(self) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database)
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()

    def stored(self) -> int:
        from sqlalchemy import create_engine, text

        engine = create_engine(self._database_url())
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT count(*) FROM instances")).scalar_one()
        engine.dispose()
        files = sum(1 for _ in (self.work / "storage").rglob("*.dcm"))
        if files != rows:
            raise AssertionError(f"dicomnode: {files} files but {rows} instance rows")
        return rows

    def pids(self) -> list[int]:
        return [self.process.pid, *descendants(self.process.pid)] if self.process else []

    def stop(self) -> None:
        super().stop()
        self.log.close()


# Measuring -------------------------------------------------------------------------


def idle_note() -> str:
    """How an idle CPU waits here, where the kernel says: on a VM whose idle vCPUs halt at
    once (haltpoll with no polling), waking one costs the host's scheduler, and work that
    keeps the other vCPU busy can make a lone sender faster (benchmarks/README.md)."""
    driver = Path("/sys/devices/system/cpu/cpuidle/current_driver")
    poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    try:
        note = f"; cpuidle {driver.read_text().strip()}"
        if poll.exists():
            note += f", guest_halt_poll_ns={poll.read_text().strip()}"
    except OSError:
        return ""
    return note


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        fields = proc_stat(entry.name) if entry.name.isdigit() else None
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (from /proc)."""
    ticks = 0
    for pid in pids:
        fields = proc_stat(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children (the storescu senders)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Samples the summed resident memory of a process tree every ``period`` seconds."""

    def __init__(self, root: int, period: float = 0.05):
        self.root = root
        self.period = period
        self.peak = 0
        self.peak_by_process: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = {pid: rss_bytes(pid) for pid in [self.root, *descendants(self.root)]}
            self.peak = max(self.peak, sum(sizes.values()))
            for pid, size in sizes.items():
                self.peak_by_process[pid] = max(self.peak_by_process.get(pid, 0), size)
            self._stop.wait(self.period)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measurement:
    target: str
    workload: str
    senders: int
    instances: int
    megabytes: float
    seconds: float
    target_cpu: float = 0.0
    senders_cpu: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def cpu_per_instance(self) -> float:
        """Seconds of CPU per instance, target and senders together."""
        return (self.target_cpu + self.senders_cpu) / self.instances

    @property
    def cores_busy(self) -> float:
        """Cores the target and senders kept busy on average."""
        return (self.target_cpu + self.senders_cpu) / self.seconds

    def line(self) -> str:
        return (
            f"  {self.target:<24} {self.workload:<10} senders={self.senders}  "
            f"{self.seconds:7.2f} s  {self.mb_per_s:8.1f} MB/s  "
            f"{self.instances_per_s:8.1f} instances/s  CPU ms/instance: target "
            f"{1000 * self.target_cpu / self.instances:.2f}, senders "
            f"{1000 * self.senders_cpu / self.instances:.2f}"
        )


def storescu(target: Target, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(
        [STORESCU, "-aet", "BENCH", "-aec", target.ae_title, "127.0.0.1", str(target.port)]
        + [str(path) for path in files],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def send(target: Target, files: list[Path], senders: int) -> float:
    """Send ``files`` in ``senders`` concurrent storescu processes; seconds until all
    instances are stored (and indexed). Raises if a store failed."""
    return send_counted(target, files, senders)[0]


def send_counted(
    target: Target,
    files: list[Path],
    senders: int,
    *,
    per_association: bool = False,
    held_before: int = 0,
) -> tuple[float, float, float]:
    """:func:`send`, also returning the CPU seconds the target and the senders used.
    ``per_association``: each sender sends its instances one association (one ``storescu``)
    after another, as a modality that sends each image as it is made. ``held_before``: the
    instances the target already held (a target that stays up between runs)."""
    shares = [files[index::senders] for index in range(senders)]
    # What an earlier run left for the kernel to write (the references write without fsync:
    # 600 MB of DX) is written now, not during this run and charged to it.
    os.sync()
    pids = target.pids()
    target_cpu, senders_cpu = cpu_seconds(pids), children_cpu_seconds()
    started = time.perf_counter()

    def sender(share: list[Path]) -> tuple[float, int, str]:
        for batch in [[path] for path in share] if per_association else [share]:
            process = storescu(target, batch)
            _, errors = process.communicate()
            if process.returncode != 0:
                break
        return time.perf_counter() - started, process.returncode, errors

    # Each sender's own end: a tail where the last senders run alone is not parallel.
    with ThreadPoolExecutor(max_workers=senders) as pool:
        ends = list(pool.map(sender, [share for share in shares if share]))
    for _, returncode, errors in ends:
        if returncode != 0:
            raise RuntimeError(f"storescu to {target.label} failed: {errors[-2000:]}")
    seconds = time.perf_counter() - started
    if len(ends) > 1:
        print(
            f"    {target.label}: senders ended at "
            + ", ".join(f"{end:.2f}" for end, _, _ in sorted(ends))
            + " s",
            flush=True,
        )
    target_cpu = cpu_seconds(pids) - target_cpu
    senders_cpu = children_cpu_seconds() - senders_cpu
    stored = target.stored() - held_before
    if stored != len(files):
        raise AssertionError(f"{target.label}: {stored} of {len(files)} instances stored")
    return seconds, target_cpu, senders_cpu


def measure(
    target: Target, name: str, files: list[Path], senders: int, *, per_association: bool = False
) -> Measurement:
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    with target.running():
        seconds, target_cpu, senders_cpu = send_counted(
            target, files, senders, per_association=per_association
        )
    result = Measurement(
        target.label, name, senders, len(files), megabytes, seconds, target_cpu, senders_cpu
    )
    print(result.line(), flush=True)
    return result


@contextmanager
def profiling(pids: list[int], folder: Path | None) -> Iterator[None]:
    """py-spy record of each process in ``pids`` while the block runs (if ``folder``)."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    recorders = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--threads",
                "--idle",
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(folder / f"ingest-{pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for recorder in recorders:
            recorder.wait(timeout=60)


def latest(
    results: dict[tuple[str, str, int], list[Measurement]], key: tuple[str, str, int]
) -> Measurement | None:
    return results[key][-1] if results.get(key) else None


def median_ratio(
    results: dict[tuple[str, str, int], list[Measurement]],
    numerator: str,
    denominator: str,
    workload: str,
) -> str:
    """The median over rounds of one round's throughput ratio (runs of a round are
    back to back, so a shared machine's drift affects both sides alike)."""
    tops = results.get((numerator, workload, 1), [])
    bottoms = results.get((denominator, workload, 1), [])
    if not tops or not bottoms:
        return "n/a"
    ratios = [top.mb_per_s / bottom.mb_per_s for top, bottom in zip(tops, bottoms, strict=True)]
    return f"{statistics.median(ratios):.2f}"


def ratio(numerator: Measurement | None, denominator: Measurement | None) -> str:
    if numerator is None or denominator is None:
        return "n/a"
    return f"{numerator.mb_per_s / denominator.mb_per_s:.2f}"


def speedup_ceiling(one: Measurement, many: Measurement) -> str:
    """What this machine's cores allow many senders over one, at the CPU per instance both
    runs took: one sender's time is its CPU over the cores it kept busy, the many senders'
    time at least their CPU over all cores."""
    cores = os.cpu_count() or 1
    ceiling = cores / one.cores_busy * one.cpu_per_instance / many.cpu_per_instance
    return (
        f"cores busy {one.cores_busy:.2f} -> {many.cores_busy:.2f}, CPU ms/instance of target "
        f"and senders {1000 * one.cpu_per_instance:.2f} -> {1000 * many.cpu_per_instance:.2f}: "
        f"{cores} cores allow at most {ceiling:.2f}"
    )


def print_round_ratios(results: dict[tuple[str, str, int], list[Measurement]], name: str) -> None:
    """The last round's c/a and c/b of one workload (one sender)."""
    a, b, c = (latest(results, (key, name, 1)) for key in "abc")
    print(f"  ratios {name}: c/a = {ratio(c, a)}   c/b = {ratio(c, b)}", flush=True)


def print_median_ratios(
    results: dict[tuple[str, str, int], list[Measurement]], name: str, rounds: int
) -> None:
    """The median over the rounds of c/a and c/b (nothing for a single round)."""
    if rounds > 1:
        print(
            f"  median of {rounds} rounds {name}: "
            f"c/a = {median_ratio(results, 'c', 'a', name)}   "
            f"c/b = {median_ratio(results, 'c', 'b', name)}",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dx", type=int, default=60, help="DX instances of ~10 MB")
    parser.add_argument("--ct", type=int, default=1000, help="CT slices of ~0.5 MB")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu (0: skip)")
    parser.add_argument(
        "--associations",
        type=int,
        default=100,
        help="CT slices sent one association each, in turn (0: skip)",
    )
    parser.add_argument("--big-mb", type=int, default=1000, help="one instance (0: skip)")
    parser.add_argument(
        "--listeners",
        type=int,
        default=4,
        help="node listener processes (the default of [node] listeners)",
    )
    parser.add_argument("--max-pdu", type=int, default=0, help="node and reference max PDU")
    parser.add_argument("--database", default=None, help="node database URL (default SQLite)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dicomnode-bench-ingest"))
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output folder")
    parser.add_argument("--skip", default="", help="targets to skip, e.g. 'a,b'")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure a, b, c in turn this many times"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-ingest-"))
    targets: dict[str, Target] = {
        "a": DcmtkSCP(work / "a"),
        "b": ReferenceSCP(work / "b", args.max_pdu),
        "c": Node(work / "c", args.listeners, args.database, args.max_pdu),
    }
    skip = set(filter(None, args.skip.split(",")))
    print(
        f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, loopback; node listeners={args.listeners}, "
        f"database={'SQLite' if args.database is None else args.database.split(':')[0]}"
        f"{idle_note()}",
        flush=True,
    )
    workloads = []
    if args.ct:
        workloads.append(("ct", files_of(workload(args.cache, "ct", args.ct))))
    if args.dx:
        workloads.append(("dx", files_of(workload(args.cache, "dx", args.dx))))
    # One list per (target, workload, senders): a measurement per round.
    results: dict[tuple[str, str, int], list[Measurement]] = {}
    active = {key: target for key, target in targets.items() if key not in skip}
    try:
        for name, files in workloads:
            print(f"\n{name}: {len(files)} instances, one storescu", flush=True)
            for _ in range(args.rounds):
                for key, target in active.items():
                    results.setdefault((key, name, 1), []).append(measure(target, name, files, 1))
                print_round_ratios(results, name)
            print_median_ratios(results, name, args.rounds)
        if args.senders > 1 and workloads:
            name, files = workloads[0]
            print(f"\n{name}: {len(files)} instances, {args.senders} concurrent storescu")
            # Each target's one-sender run again right before its many-sender run: on a VM
            # whose speed drifts within minutes, a speed-up means something only between
            # runs made back to back (not against the first phase's, minutes earlier).
            alone: dict[str, list[Measurement]] = {}
            for _ in range(args.rounds):
                for key, target in active.items():
                    one = measure(target, name, files, 1)
                    many = measure(target, name, files, args.senders)
                    alone.setdefault(key, []).append(one)
                    results.setdefault((key, name, args.senders), []).append(many)
                    print(
                        f"  {target.label}: {args.senders} senders / 1 sender just before = "
                        f"{ratio(many, one)} ({speedup_ceiling(one, many)})",
                        flush=True,
                    )
            if args.rounds > 1:
                for key, target in active.items():
                    speedups = [
                        many.mb_per_s / one.mb_per_s
                        for many, one in zip(
                            results[(key, name, args.senders)], alone[key], strict=True
                        )
                    ]
                    print(
                        f"  {target.label}: median of {args.rounds} rounds "
                        f"{args.senders} senders / 1 sender = {statistics.median(speedups):.2f}",
                        flush=True,
                    )
        if args.associations:
            name = "associations"
            files = files_of(workload(args.cache, "ct", args.associations))
            print(f"\n{name}: {len(files)} CT slices, one association (one storescu) each")
            for _ in range(args.rounds):
                for key, target in active.items():
                    one_each = measure(target, name, files, 1, per_association=True)
                    results.setdefault((key, name, 1), []).append(one_each)
                    print(
                        f"    {target.label}: {1000 * one_each.seconds / len(files):.1f} ms and "
                        f"{1000 * one_each.target_cpu / len(files):.1f} ms of its CPU "
                        "per association",
                        flush=True,
                    )
                print_round_ratios(results, name)
            print_median_ratios(results, name, args.rounds)
        if args.profile and workloads:
            name, files = workloads[0]
            node = targets["c"]
            with node.running(), profiling(node.pids(), args.profile):
                seconds = send(node, files, 1)
            megabytes = sum(path.stat().st_size for path in files) / 1e6
            profiled = Measurement(node.label, name, 1, len(files), megabytes, seconds)
            print(f"\nprofiled again (py-spy, not counted; {args.profile}):\n{profiled.line()}")
        if args.big_mb:
            big = args.cache / f"big-{args.big_mb}.dcm"
            if not big.exists():
                print(f"\ngenerating a {args.big_mb} MB multi-frame instance ...", flush=True)
                make_big(big, args.big_mb)
            node = targets["c"]
            print(f"\nbig: one {big.stat().st_size / 1e6:.0f} MB instance to the node")
            with node.running(), PeakRSS(node.process.pid) as peak:
                seconds = send(node, [big], 1)
            print(
                f"  {seconds:.2f} s, {big.stat().st_size / 1e6 / seconds:.1f} MB/s; peak RSS of "
                f"the node (all processes summed) {peak.peak / 1e6:.0f} MB; largest single "
                f"process {max(peak.peak_by_process.values()) / 1e6:.0f} MB (goal <= 1500 MB)",
                flush=True,
            )
    finally:
        for target in targets.values():
            target.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
