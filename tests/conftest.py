"""Shared fixtures: databases (SQLite and PostgreSQL), dcmtk tools, a running node."""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dicomnode.ports import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get(
    "DICOMNODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# dcmtk as Debian installs it: pynetdicom's console scripts of the same names live in the
# virtual environment and take other options, so never resolve these through PATH.
DCMTK_DIR = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))


def source_digest(function) -> str:
    """A short digest of a library function's source: tests pin the pynetdicom code that
    dicomnode replaces or takes work over from, so that an upgrade that changes it fails."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def dcmtk(tool: str) -> str:
    """Absolute path of a dcmtk tool; skips the test with a reason if dcmtk is missing."""
    path = DCMTK_DIR / tool
    if not path.exists():
        pytest.skip(f"dcmtk {tool} not found in {DCMTK_DIR} (apt-get install dcmtk)")
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
    if "dcmtk" not in version.lower():
        pytest.skip(f"{path} is not OFFIS dcmtk")
    return str(path)


def _postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(
            POSTGRES_URL.replace("postgresql+psycopg", "postgresql"), connect_timeout=3
        ):
            return True
    except Exception:
        return False


def require_postgres() -> None:
    """Skip the test when PostgreSQL is not reachable, fail it under CI (the suite must use it)."""
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL not reachable at {POSTGRES_URL}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: an SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dicomnode.db'}"
        return
    require_postgres()
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    plain = POSTGRES_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def sessions(db_url: str):
    """A migrated database and its sessionmaker."""
    from dicomnode.db.session import make_engine, make_sessionmaker, upgrade

    upgrade(db_url)
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@dataclass
class StoreSCP:
    """dcmtk storescp acting as a PACS destination."""

    ae_title: str
    port: int
    folder: Path
    log: Path | None = None  # storescp's verbose log

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def associations(self) -> int:
        """Associations storescp has accepted so far (from its log; a connection that only
        probes the port is received, not acknowledged)."""
        assert self.log is not None, "this storescp keeps no log"
        return self.log.read_text(errors="replace").count("Association Acknowledged")


@contextmanager
def storescp(where: Path, *options: str, port: int = 0) -> Iterator[StoreSCP]:
    """A dcmtk storescp on ``port`` (0: a free one; AE title PACS, ``options`` added: by
    default every transfer syntax accepted), writing what it receives to ``where``/pacs,
    logging verbosely to ``where``/storescp.log."""
    binary = dcmtk("storescp")
    folder = where / "pacs"
    folder.mkdir()
    port = port or free_port()
    log = where / "storescp.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                *(binary, "--verbose", "--aetitle", "PACS", "--output-directory", str(folder)),
                *(options or ("--accept-all",)),
                str(port),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    try:
        wait_for_port(port, process, log=log)
        yield StoreSCP("PACS", port, folder, log)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """A dcmtk storescp on a free port, writing what it receives to a folder."""
    with storescp(tmp_path) as running:
        yield running


@dataclass
class RunningNode:
    config: Path
    ae_title: str
    port: int
    web_port: int
    storage: Path
    log: Path
    process: subprocess.Popen
    # Bearer token of the radiologist "tester" (password TEST_PASSWORD), made by the CLI.
    token: str = ""

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def worklist(self) -> list[dict]:
        response = httpx.get(f"{self.web}/api/worklist", headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.json()["rows"]

    def storescu(self, *files: Path, calling_ae: str = "MODALITY") -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                dcmtk("storescu"),
                "-aet",
                calling_ae,
                "-aec",
                self.ae_title,
                "127.0.0.1",
                str(self.port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TCP_NODELAY": "1"},
        )


def worker_config(folder: Path, db_url: str, worker: str, extra: str = "") -> Path:
    """A stand-alone ``dicomnode worker``'s configuration: no models (an empty folder),
    ``worker`` as the lines of its ``[worker]`` table, then ``extra`` (other tables)."""
    (folder / "no-models").mkdir()
    config = folder / "dicomnode.toml"
    config.write_text(
        f'[database]\nurl = "{db_url}"\n'
        f'[storage]\npath = "{folder / "storage"}"\n'
        f'[models]\nfolders = ["{folder / "no-models"}"]\n'
        f"[worker]\n{worker}{extra}"
    )
    return config


def write_config(
    folder: Path,
    db_url: str,
    *,
    destinations: list[StoreSCP] = (),
    extra: str = "",
    listeners: int = 2,
) -> tuple[Path, int, int]:
    """A node configuration on free ports, using the repository's models. Two listener
    processes, not the default four: on two cores each one more cost a node's start ~1 s of
    CPU (tests of more listeners say so)."""
    port, web_port = free_port(), free_port()
    config = folder / "dicomnode.toml"
    lines = [
        f'[node]\nae_title = "DICOMNODE"\nhost = "127.0.0.1"\nport = {port}\n'
        f"listeners = {listeners}\n",
        f'[storage]\npath = "{folder / "storage"}"\n',
        f'[database]\nurl = "{db_url}"\n',
        f'[web]\nhost = "127.0.0.1"\nport = {web_port}\n',
        "[assembly]\nquiet_seconds = 0.5\n",
        "[worker]\ncount = 1\n",
        f'[models]\nfolders = ["{REPO / "models"}"]\n',
    ]
    for index, destination in enumerate(destinations):
        lines.append(
            f'[[destinations]]\nname = "pacs{index}"\nae_title = "{destination.ae_title}"\n'
            f'host = "127.0.0.1"\nport = {destination.port}\n'
        )
    config.write_text("\n".join(lines) + extra)
    return config, port, web_port


def start_serve(
    folder: Path, config: Path, env: dict[str, str] | None = None, *, new_session: bool = False
) -> tuple[subprocess.Popen, Path]:
    """``dicomnode serve`` in ``folder`` (with ``env`` over this environment), logging to
    node.log; returns the process and its log at once. ``new_session``: in a process group of
    its own with its children, as a terminal runs a command (a test's Ctrl-C then reaches
    that group only)."""
    log = folder / "node.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=folder,
        env={**os.environ, **(env or {})},
        start_new_session=new_session,
    )
    return process, log


def launch_node(
    folder: Path,
    config: Path,
    port: int,
    web_port: int,
    env: dict[str, str] | None = None,
    *,
    new_session: bool = False,
) -> tuple[subprocess.Popen, Path]:
    """:func:`start_serve`, returned once its DICOM and web ports listen."""
    process, log = start_serve(folder, config, env, new_session=new_session)
    try:
        wait_for_port(port, process)
        wait_for_port(web_port, process)
        wait_until_listening(web_port, process)
    except Exception:
        process.kill()
        raise RuntimeError(f"node did not start:\n{log.read_text()}") from None
    return process, log


def wait_until_listening(web_port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    """Return once the node's /readyz says its DICOM listeners listen (serve opens the web
    port while they start; whether the node is ready otherwise is the test's business)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with status {process.returncode}")
        checks = httpx.get(f"http://127.0.0.1:{web_port}/readyz", timeout=10).json()["checks"]
        if checks["dicom"] == "ok":
            return
        time.sleep(0.05)
    raise TimeoutError(f"DICOM listeners not listening after {timeout} s")


def start_node(folder: Path, config: Path, port: int, web_port: int) -> RunningNode:
    process, log = launch_node(folder, config, port, web_port)
    token = add_user_directly(config, "tester", "radiologist")
    return RunningNode(config, "DICOMNODE", port, web_port, folder / "storage", log, process, token)


TEST_PASSWORD = "correct horse battery"


def add_user(config: Path, name: str, role: str, password: str = TEST_PASSWORD) -> str:
    """Add a web user through the CLI and return a new bearer token for it."""
    command = [sys.executable, "-m", "dicomnode", "users"]
    subprocess.run(
        [*command, "add", name, "--role", role, "--password-stdin", "--config", str(config)],
        input=password + "\n",
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    made = subprocess.run(
        [*command, "token", name, "--config", str(config)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return made.stdout.strip()


def add_user_directly(config: Path, name: str, role: str, password: str = TEST_PASSWORD) -> str:
    """Add a web user in the database ``config`` names, in this process (the CLI's own
    tests use :func:`add_user`; two CLI processes cost a node's start-up ~3 s more), and
    return a new bearer token for it."""
    from dicomnode.config import load_settings
    from dicomnode.db.session import make_engine, make_sessionmaker, utcnow
    from dicomnode.users import add_user as add_web_user
    from dicomnode.users import issue_token

    engine = make_engine(load_settings(config).database_url)
    try:
        with make_sessionmaker(engine)() as session:
            add_web_user(session, name, role, password, utcnow())
            token = issue_token(session, name, utcnow())
            session.commit()
    finally:
        engine.dispose()
    return token


def stop_node(node: RunningNode) -> None:
    stop_process(node.process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def node(tmp_path: Path, db_url: str, pacs: StoreSCP) -> Iterator[RunningNode]:
    """A running ``dicomnode serve`` on free ports, exporting to the ``pacs`` fixture."""
    config, port, web_port = write_config(tmp_path, db_url, destinations=[pacs])
    running = start_node(tmp_path, config, port, web_port)
    yield running
    stop_node(running)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def spool_and_index(session, storage: Path, ds) -> tuple[int, Path]:
    """Write ``ds`` into the spool under ``storage`` and index it as the SCP does (committed,
    study quiet at once); returns the study's row id and the instance's file."""
    from sqlalchemy import select

    from dicomnode.config import WorklistSettings
    from dicomnode.db.models import Study
    from dicomnode.db.session import utcnow
    from dicomnode.ingest.arrival import instance_facts
    from dicomnode.ingest.index import index_instance
    from dicomnode.ingest.spool import instance_path

    facts = instance_facts(ds)
    path = instance_path(
        storage, facts.study_instance_uid, facts.series_instance_uid, facts.sop_instance_uid
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    index_instance(
        session,
        facts,
        path=str(path),
        size_bytes=path.stat().st_size,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="MODALITY",
        now=utcnow(),
        quiet_seconds=0,
        worklist=WorklistSettings(),
    )
    session.commit()
    study_id = session.scalar(
        select(Study.id).where(Study.study_instance_uid == facts.study_instance_uid)
    )
    return study_id, path


def spool_late_instance(session, storage: Path, study_id: int, seed: int) -> str:
    """Spool and index another (normal) radiograph in study ``study_id``, in a new series, as
    if it arrived after the study's analysis; returns its SOP Instance UID."""
    import pydicom
    from sqlalchemy import select

    from dicomnode.db.models import Instance, Series
    from dicomnode.synth.cxr import make_cxr

    first = session.scalars(select(Instance).join(Series).where(Series.study_id == study_id))
    source = pydicom.dcmread(first.first().path, stop_before_pixels=True)
    ds, _ = make_cxr(seed, pneumothorax=False)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        setattr(ds, keyword, source.get(keyword, ""))
    spool_and_index(session, storage, ds)
    return str(ds.SOPInstanceUID)


def referenced_uids(session, study_id: int) -> set[str]:
    """Every SOP Instance UID that the study's result files reference."""
    import pydicom
    from sqlalchemy import select

    from dicomnode.db.models import ResultObject

    uids: set[str] = set()
    for path in session.scalars(select(ResultObject.path).where(ResultObject.study_id == study_id)):
        for element in pydicom.dcmread(path).iterall():
            if element.keyword == "ReferencedSOPInstanceUID":
                uids.add(str(element.value))
    return uids


def queue_notifications(sessions, study_uid: str, count: int) -> list[int]:
    """A critical study and ``count`` queued webhook notification jobs for it; their ids."""
    from datetime import UTC, datetime

    from dicomnode.db.models import Study
    from dicomnode.jobs.queue import enqueue

    now = datetime.now(UTC)
    with sessions() as session:
        study = Study(
            study_instance_uid=study_uid,
            received_at=now,
            last_instance_at=now,
            ready_at=now,
            due_at=now,
            tier="critical",
        )
        session.add(study)
        session.flush()
        jobs = [enqueue(session, "notify", study.id, {"channel": "webhook"}) for _ in range(count)]
        session.commit()
        return [job.id for job in jobs]
