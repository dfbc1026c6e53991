"""Crash safety: SIGKILL the node at random points while a modality sends, restart, check.

Each trial starts a fresh ``dicomnode serve`` (SQLite, one worker, no destinations), sends
chest phantoms over one association from a pynetdicom SCU that records the status of every
C-STORE, kills the node's whole process group (listener, assembler, workers) with SIGKILL
at a random moment (while sending, assembling or analysing), restarts it and waits for it
to settle. Then:

- lost: instances answered 0x0000 that are not on disk or have no database row;
- duplicated: studies with more than one SR from one model (results repeated, not replaced);
- unsettled: studies not analysed, or with analysis or result writing still pending (or no
  SR), after recovery.

    python benchmarks/fault_injection.py [--trials 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from dicomnode.db.models import Instance, Job, ResultObject, Series, Study
from dicomnode.db.session import make_engine, make_sessionmaker
from dicomnode.export.scu import keep_responses
from dicomnode.ports import free_port, wait_for_port
from dicomnode.synth.cxr import make_cxr

REPO = Path(__file__).resolve().parent.parent
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


@dataclass
class Node:
    """A ``dicomnode serve`` in its own process group, so one signal reaches its workers."""

    folder: Path
    port: int
    web_port: int
    config: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.folder / f"node-{self.starts}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            start_new_session=True,
        )
        wait_for_port(self.port, self.process)
        wait_for_port(self.web_port, self.process)
        self.wait_until_listening()

    def wait_until_listening(self, timeout: float = 60.0) -> None:
        """Return once /readyz says the DICOM listeners run: serve binds the DICOM port
        while they start, and a kill timed from a send that waits on them hits no transfer."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the node exited with status {self.process.returncode}")
            readyz = httpx.get(f"http://127.0.0.1:{self.web_port}/readyz", timeout=10)
            if readyz.json()["checks"].get("dicom") == "ok":
                return
            time.sleep(0.05)
        raise TimeoutError(f"DICOM listeners not listening after {timeout} s")

    def kill(self) -> None:
        """SIGKILL the listener and its workers at once: nothing gets to clean up."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def make_node(
    folder: Path,
    lease_seconds: float = 10.0,  # the least a node takes ([worker] lease_seconds)
    models: Path = REPO / "models",
    listeners: int = 4,
) -> Node:
    """Write a node configuration on free ports (SQLite, one worker, ``listeners`` listener
    processes, the model cards in ``models``: by default the repository's)."""
    port, web_port = free_port(), free_port()
    config = folder / "dicomnode.toml"
    config.write_text(
        f'[node]\nae_title = "DICOMNODE"\nhost = "127.0.0.1"\nport = {port}\n'
        f"listeners = {listeners}\n\n"
        f'[storage]\npath = "{folder / "storage"}"\n\n'
        f'[database]\nurl = "sqlite:///{folder / "dicomnode.db"}"\n\n'
        f'[web]\nhost = "127.0.0.1"\nport = {web_port}\n\n'
        "[assembly]\nquiet_seconds = 0.3\n\n"
        f"[worker]\ncount = 1\nlease_seconds = {lease_seconds}\n\n"
        f'[models]\nfolders = ["{models}"]\n'
    )
    return Node(folder, port, web_port, config)


def phantoms(seed: int, studies: int, per_study: int, size: int = 96) -> list[Dataset]:
    """Chest phantoms: ``studies`` studies of ``per_study`` images each."""
    images = []
    for study in range(studies):
        first, _ = make_cxr(seed * 1000 + study * 100, pneumothorax=study % 2 == 0, size=size)
        images.append(first)
        for image in range(1, per_study):
            ds, _ = make_cxr(
                seed * 1000 + study * 100 + image,
                pneumothorax=study % 2 == 0,
                size=size,
                patient_id=str(first.PatientID),
                study_instance_uid=str(first.StudyInstanceUID),
            )
            images.append(ds)
    return images


def send(
    port: int, images: list[Dataset], acked: list[str], opened: list[Association] | None = None
) -> None:
    """C-STORE the images over one association (appended to ``opened``); append each SOP
    UID answered 0x0000 to ``acked``."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for syntax in {str(ds.file_meta.TransferSyntaxUID) for ds in images} | {ExplicitVRLittleEndian}:
        ae.add_requested_context(DX_STORAGE, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if opened is not None:
        opened.append(assoc)
    if not assoc.is_established:
        return
    keep_responses(assoc)  # pynetdicom's reactor can take a response meant for the send
    try:
        for ds in images:
            if not assoc.is_established:
                return
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) == 0x0000:
                acked.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()


def end_sends(sender: threading.Thread, opened: list[Association], timeout: float = 30) -> None:
    """Wait for the modality's ``sender`` thread once the node is killed. A C-STORE whose
    connection is gone still waits the whole DIMSE timeout for its response (pynetdicom's
    get_msg looks only at its queue): once an association has seen its connection end (the
    responses the node sent before are read by then), its waiting send is woken."""
    deadline = time.monotonic() + timeout
    while sender.is_alive() and time.monotonic() < deadline:
        for assoc in opened:
            if assoc.is_aborted or not assoc.dul.is_alive() or assoc.acse.is_aborted():
                assoc.dimse.msg_queue.put((None, None))
        sender.join(0.05)


@dataclass
class TrialResult:
    acked: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    kill_after: float = 0.0


def _check(node: Node, acked: list[str]) -> TrialResult:
    engine = make_engine(f"sqlite:///{node.folder / 'dicomnode.db'}")
    try:
        with make_sessionmaker(engine)() as session:
            paths = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())
            lost = [uid for uid in acked if uid not in paths or not Path(paths[uid]).is_file()]
            # SRs per study and model: each model writes one SR per study, replaced on re-runs.
            sr_counts: dict[str, dict[str, int]] = {}
            for uid, model, count in session.execute(
                select(Study.study_instance_uid, ResultObject.model_name, func.count())
                .join(ResultObject, ResultObject.study_id == Study.id)
                .where(ResultObject.kind == "sr")
                .group_by(Study.study_instance_uid, ResultObject.model_name)
            ).all():
                sr_counts.setdefault(uid, {})[model] = count
            pending = set(
                session.scalars(
                    select(Study.study_instance_uid)
                    .join(Job, Job.study_id == Study.id)
                    .where(
                        Job.kind.in_(("analyse", "results")),
                        Job.state.in_(("queued", "leased")),
                    )
                ).all()
            )
            studies = session.execute(
                select(
                    Study.study_instance_uid,
                    Study.analysis_status,
                    Study.received_generation,
                    Study.queued_generation,
                )
                .join(Series)
                .distinct()
            ).all()
    finally:
        engine.dispose()
    result = TrialResult(acked=len(acked), lost=lost)
    for uid, status, received, queued in studies:
        settled = status == "analysed" and received == queued and uid not in pending
        if not settled or not sr_counts.get(uid):
            result.unsettled.append(uid)
        elif max(sr_counts[uid].values()) > 1:
            result.duplicated.append(uid)
    return result


def run_trial(
    folder: Path,
    seed: int,
    *,
    kill_after: float | None = None,
    studies: int = 5,
    per_study: int = 4,
    settle: float = 60.0,
    models: Path = REPO / "models",
    listeners: int = 4,
) -> TrialResult:
    """One kill-restart-check trial in ``folder``; see the module docstring.

    ``kill_after`` (seconds after sending starts) defaults to a random time from ``seed``.
    ``models`` is the folder of model cards the node runs (each writes its result objects
    for every study before the study settles), ``listeners`` its listener processes.
    """
    rng = random.Random(seed)
    images = phantoms(seed, studies, per_study)
    node = make_node(folder, models=models, listeners=listeners)
    node.start()
    acked: list[str] = []
    opened: list[Association] = []
    try:
        sender = threading.Thread(target=send, args=(node.port, images, acked, opened), daemon=True)
        sender.start()
        if kill_after is None:
            kill_after = rng.uniform(0.0, 2.5)
        time.sleep(kill_after)
        node.kill()
        end_sends(sender, opened)
        node.start()
        deadline = time.monotonic() + settle
        while True:
            result = _check(node, list(acked))
            if not result.unsettled or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        result.kill_after = kill_after
        return result
    finally:
        node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    totals = {"acked": 0, "lost": 0, "duplicated": 0, "unsettled": 0, "errors": 0}
    for trial in range(args.trials):
        with tempfile.TemporaryDirectory(prefix="dicomnode-fault-") as folder:
            try:
                result = run_trial(Path(folder), args.seed + trial)
            except Exception as exc:
                # A node that does not come back up is a failure too: show why.
                totals["errors"] += 1
                print(f"trial {trial + 1:>3}: ERROR {exc}", flush=True)
                for log in sorted(Path(folder).glob("node-*.log")):
                    print(
                        f"--- {log.name} (last lines)\n"
                        + "".join(log.read_text().splitlines(True)[-15:])
                    )
                continue
        totals["acked"] += result.acked
        totals["lost"] += len(result.lost)
        totals["duplicated"] += len(result.duplicated)
        totals["unsettled"] += len(result.unsettled)
        print(
            f"trial {trial + 1:>3}: killed after {result.kill_after:.2f} s, "
            f"acked={result.acked} lost={len(result.lost)} "
            f"duplicated={len(result.duplicated)} unsettled={len(result.unsettled)}",
            flush=True,
        )
    print(
        f"{args.trials} trials: acked={totals['acked']} lost={totals['lost']} "
        f"duplicated={totals['duplicated']} unsettled={totals['unsettled']} "
        f"errors={totals['errors']}"
    )
    ok = not any(totals[key] for key in ("lost", "duplicated", "unsettled", "errors"))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
