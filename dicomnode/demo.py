"""``dicomnode demo``: a node on SQLite, synthetic chest X-rays sent by C-STORE, live worklist."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from dicomnode import RESEARCH_DEMO_NOTICE

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
DEMO_USER = "demo"


@dataclass
class DemoStudy:
    accession: str
    seed: int
    pneumothorax: bool


def plan_studies(count: int) -> list[DemoStudy]:
    """A mixed set in arrival order: every second study has a pneumothorax."""
    return [
        DemoStudy(f"DEMO{index + 1:04d}", 20_260_000 + index, index % 2 == 1)
        for index in range(count)
    ]


def port_free(port: int) -> bool:
    """True when nothing listens on ``port`` on this machine."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def write_demo_config(folder: Path, port: int, web_port: int) -> Path:
    """A configuration for the demo node inside ``folder``."""
    models = REPO_MODELS if REPO_MODELS.is_dir() else Path.cwd() / "models"
    config = folder / "dicomnode.toml"
    config.write_text(
        "# dicomnode demo: embedded SQLite, demo models. "
        f"{RESEARCH_DEMO_NOTICE}.\n"
        # One listener process: the demo is its only sender, one association at a time,
        # and each listener more costs the start ~1 s of CPU.
        f'[node]\nae_title = "DICOMNODE"\nhost = "127.0.0.1"\nport = {port}\nlisteners = 1\n\n'
        f'[storage]\npath = "{folder / "storage"}"\n\n'
        f'[database]\nurl = "sqlite:///{folder / "dicomnode.db"}"\n\n'
        f'[web]\nhost = "127.0.0.1"\nport = {web_port}\n\n'
        "[assembly]\nquiet_seconds = 0.5\n\n"
        "[worker]\ncount = 1\n\n"
        f'[models]\nfolders = ["{models}"]\n',
        encoding="utf-8",
    )
    return config


def add_demo_user(config: Path) -> tuple[str, str]:
    """A radiologist ``demo`` with a fresh password; returns (password, API token)."""
    from dicomnode.config import load_settings
    from dicomnode.db.session import make_engine, make_sessionmaker, utcnow
    from dicomnode.users import add_user, issue_token

    password = secrets.token_urlsafe(9)
    engine = make_engine(load_settings(config).database_url)
    try:
        with make_sessionmaker(engine)() as session:
            add_user(session, DEMO_USER, "radiologist", password, utcnow())
            session.commit()
            token = issue_token(session, DEMO_USER, utcnow())
            session.commit()
    finally:
        engine.dispose()
    return password, token


def send_study(study: DemoStudy, port: int) -> int:
    """Send one phantom in its own association, as a modality would; returns the status."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    from dicomnode.export.scu import keep_responses
    from dicomnode.synth.cxr import make_cxr

    ds, _ = make_cxr(study.seed, pneumothorax=study.pneumothorax, accession_number=study.accession)
    ae = AE(ae_title="DEMO-DX")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        raise RuntimeError(f"the demo node at port {port} refused the association")
    keep_responses(assoc)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status) if status else -1


def progress_bar(done: int, total: int, width: int = 30) -> str:
    """``[#########.........]  3/9 analysed``."""
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} analysed"


def render_table(rows: list[dict], truth: dict[str, DemoStudy]) -> str:
    """The worklist as a terminal table, reading order first."""
    lines = [f"{'#':>2}  {'PRIORITY':<9} {'ACCESSION':<10} {'PHANTOM':<12} {'AI':<10} REASON"]
    for number, row in enumerate(rows, 1):
        study = truth.get(row["accession_number"])
        phantom = "pneumothorax" if study and study.pneumothorax else "normal"
        lines.append(
            f"{number:>2}  {row['priority'].upper():<9} {row['accession_number']:<10} "
            f"{phantom:<12} {row['analysis_status']:<10} {row['reason']}"
        )
    return "\n".join(lines)


class Screen:
    """Redraws status and table in place on a terminal. Elsewhere (logs, pipes) prints a
    status line when it changes and no table (a table per change was some ten tables for four
    studies): the final worklist is printed once at the end."""

    def __init__(self) -> None:
        self.live = sys.stdout.isatty()
        self.last = ""

    def show(self, note: str, progress: str, table: str) -> None:
        text = f"{note}\n{progress}\n\n{table}" if self.live else f"{note}  {progress}"
        if text == self.last:
            return
        self.last = text
        if self.live:
            sys.stdout.write("\x1b[H\x1b[J" + text + "\n")
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _wait_for_node(
    url: str, process: subprocess.Popen, log: Path, ready: bool, timeout: float = 120
) -> None:
    """Return once the node's /readyz answers (its web server runs and its database is
    made) or, with ``ready``, says ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo node exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 or not ready:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the demo node was not ready after {timeout:.0f} s")


def run_demo(studies: int, port: int, web_port: int, keep: bool, folder: Path | None = None) -> int:
    """Run the demo; returns the exit status."""
    for number in (port, web_port):
        if not port_free(number):
            print(f"port {number} is in use; choose others with --port/--web-port", file=sys.stderr)
            return 1
    temporary = folder is None
    folder = Path(tempfile.mkdtemp(prefix="dicomnode-demo-")) if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    config = write_demo_config(folder, port, web_port)
    log = folder / "node.log"
    url = f"http://127.0.0.1:{web_port}"
    keep_files = keep or not temporary
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    try:
        _wait_for_node(url, process, log, ready=False)
        password, token = add_demo_user(config)  # while the node's DICOM listeners start
        _wait_for_node(url, process, log, ready=True)
        print(f"dicomnode demo ({RESEARCH_DEMO_NOTICE})")
        print(f"  DICOM:    DICOMNODE@127.0.0.1:{port}")
        print(f"  worklist: {url}/worklist  (user {DEMO_USER}, password {password})")
        print(f"  files:    {folder}  (node log: {log})")
        if temporary and not keep:
            print("            removed when the demo ends; --keep or --folder keeps them")
        print()
        plan = plan_studies(studies)
        truth = {s.accession: s for s in plan}
        screen = Screen()
        headers = {"Authorization": f"Bearer {token}"}

        def refresh(note: str) -> list[dict]:
            response = httpx.get(f"{url}/api/worklist", headers=headers, timeout=10)
            response.raise_for_status()
            rows = [r for r in response.json()["rows"] if r["accession_number"] in truth]
            done = sum(r["analysis_status"] == "analysed" for r in rows)
            screen.show(note, progress_bar(done, len(plan)), render_table(rows, truth))
            return rows

        for index, study in enumerate(plan, 1):
            status = send_study(study, port)
            if status != 0:
                raise RuntimeError(f"C-STORE of {study.accession} answered 0x{status:04X}")
            refresh(f"sent {index}/{len(plan)} studies by C-STORE")
            if screen.live:
                time.sleep(0.3)  # a pause to watch the worklist take each study in
        deadline = time.monotonic() + 60 + 20 * len(plan)
        while True:
            rows = refresh("all studies sent; waiting for analysis")
            failed = [r for r in rows if r["analysis_status"] == "failed"]
            if failed:
                raise RuntimeError(f"analysis failed for {len(failed)} study(ies)")
            if len(rows) == len(plan) and all(r["analysis_status"] == "analysed" for r in rows):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("analysis did not finish in time")
            time.sleep(0.2)
        print("\nfinal worklist (reading order):")
        print(render_table(rows, truth))
        if keep:
            print(f"\nthe node keeps running at {url}/worklist; Ctrl+C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                process.wait()
        return 0
    except (RuntimeError, httpx.HTTPError) as exc:
        # The folder stays for the log the message names, temporary or not.
        keep_files = True
        print(f"demo failed: {exc}\n  see {log} (kept)", file=sys.stderr)
        return 1
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        if not keep_files:
            shutil.rmtree(folder, ignore_errors=True)
