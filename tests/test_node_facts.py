"""Workers whose model cards or storage folder are not the node's (acceptance test H2, M2).

Serve publishes its storage folder's id (the ``.dicomnode-storage`` marker at its root) and
its model cards in the database (:mod:`dicomnode.nodestate`):

- a worker without one of serve's cards takes no analyse or results job (it quietly triaged
  pneumothorax studies as routine, with the results job that followed in memory too), while
  a worker with serve's cards takes them: the study ends with the pneumothorax finding;
- a ``dicomnode worker`` whose storage folder is an empty folder (not mounted) or another
  node's exits at start with status 2 and one line naming the folder; the node's folder
  starts it;
- with no id published (no serve ran), the first worker publishes its folder's;
- a running worker whose folder stops being the node's takes no jobs but notifications,
  and a hung storage mount holds only the job thread that reads the marker;
- serve publishes its resolved storage path: a stand-alone worker on another path (the old
  copy of a moved folder, with the same marker) does not start, or takes no storage jobs;
- serve's own workers (``--parent-pid``) do not compare their cards: during serve's reload,
  or restarted by serve after a card was edited, they go on analysing.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import (
    REPO,
    spool_and_index,
    start_node,
    stop_node,
    wait_for,
    worker_config,
    write_config,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db.models import FindingRow, Job, Study
from dicomnode.jobs.queue import enqueue
from dicomnode.models.registry import load_card
from dicomnode.nodestate import (
    STORAGE_MARKER,
    NodeCheck,
    StorageMismatch,
    check_storage,
    publish_cards,
    publish_storage,
    read_facts,
    storage_marker,
)
from dicomnode.synth.cxr import make_cxr
from dicomnode.worker import Worker

PNEUMOTHORAX = REPO / "models" / "cxr_pneumothorax_demo.toml"
LUNG_SEG = REPO / "models" / "cxr_lung_seg_demo.toml"


def _worker(storage: Path, sessions: sessionmaker[Session], cards: list[Path]) -> Worker:
    settings = Settings(storage={"path": storage}, worker={"threads": 1})
    return Worker(settings, sessions, [load_card(card) for card in cards])


def test_a_worker_without_one_of_serves_cards_takes_no_analysis_and_one_with_them_does(
    tmp_path: Path, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    storage = tmp_path / "storage"
    with sessions() as session:
        publish_storage(session, storage)
        publish_cards(session, [load_card(PNEUMOTHORAX), load_card(LUNG_SEG)])
    # The acceptance test's extra worker: the pneumothorax card removed from its folder.
    short = _worker(storage, sessions, [LUNG_SEG])
    full = _worker(storage, sessions, [PNEUMOTHORAX, LUNG_SEG])
    with sessions() as session:
        ds, _ = make_cxr(930_001, pneumothorax=True)  # 512 px, as the model was trained
        study_id, _ = spool_and_index(session, storage, ds)
        enqueue(session, "analyse", study_id, {"generation": 1})
        session.commit()
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        assert not short.run_once()  # the analysis is left to a worker with serve's cards
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert "takes no analyses until its model cards match serve's" in errors[0]
        assert "missing cxr-pneumothorax-demo 1.1.0" in errors[0]
        assert full.run_once()  # the analysis
        assert not short.run_once()  # nor the results job the analysis queued
        assert full.run_once()  # the results job
        assert not short.run_once() and not full.run_once()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # said once, not at each claim
    with sessions() as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert [(job.kind, job.state) for job in jobs] == [
            ("analyse", "done"),
            ("results", "done"),
        ]
        assert {job.lease_owner for job in jobs} == {full.owner}
        study = session.get(Study, study_id)
        assert study.tier == "critical", study.reason
        assert study.models_not_run == ""
        assert "cxr-pneumothorax-demo" in session.scalars(select(FindingRow.model_name)).all()


def test_a_worker_whose_cards_differ_still_runs_exports_and_notifications(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    from conftest import queue_notifications

    with sessions() as session:
        publish_cards(session, [load_card(PNEUMOTHORAX)])
    short = _worker(tmp_path / "storage", sessions, [])
    [job_id] = queue_notifications(sessions, "1.2.826.0.1.3680043.10.1.94", 1)
    assert short.run_once()  # the notification (its channel not enabled: done, nothing sent)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.lease_owner) == ("done", short.owner)


def test_the_first_worker_publishes_its_storage_folder_and_a_worker_on_another_is_refused(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    first, other = tmp_path / "first", tmp_path / "other"
    with sessions() as session:
        node_id = check_storage(session, first)  # no serve ran: this folder is the node's
        assert storage_marker(first) == node_id
        assert read_facts(session)["storage_id"] == node_id
        assert check_storage(session, first) == node_id
        assert read_facts(session)["storage_path"] == str(first.resolve())
        with pytest.raises(
            StorageMismatch, match=f"storage folder {other} is not at the node's storage path"
        ):
            check_storage(session, other)
        assert not (other / STORAGE_MARKER).exists()


def _queue_analysis(sessions: sessionmaker[Session], storage: Path, number: int) -> int:
    """A study in ``storage`` and its queued analyse job; the job's id."""
    with sessions() as session:
        ds, _ = make_cxr(number, pneumothorax=True)
        study_id, _ = spool_and_index(session, storage, ds)
        job = enqueue(session, "analyse", study_id, {"generation": 1})
        session.commit()
        return job.id


def _states(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as session:
        return {job.kind: job.state for job in session.scalars(select(Job))}


def test_a_running_worker_whose_storage_folder_is_not_the_nodes_takes_only_notifications(
    tmp_path: Path, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """Review 3.3: a critical-result notification reads no file, so a worker whose folder is
    not mounted still sends it; the analysis waits for a worker on the node's folder."""
    from conftest import queue_notifications

    storage = tmp_path / "storage"
    with sessions() as session:
        publish_storage(session, storage)
    _queue_analysis(sessions, storage, 930_005)
    storage.rename(tmp_path / "not-mounted")
    storage.mkdir()  # the node's storage not mounted at serve's path on this host
    worker = _worker(storage, sessions, [])
    queue_notifications(sessions, "1.2.826.0.1.3680043.10.1.95", 1)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        assert worker.run_once()  # the notification (its channel not enabled: nothing sent)
        assert not worker.run_once()
    assert _states(sessions) == {"analyse": "queued", "notify": "done"}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "takes no jobs but notifications" in errors[0], errors
    assert f"{storage} is not the node's storage" in errors[0]
    assert f"it has no {STORAGE_MARKER} file" in errors[0]


def test_a_hung_storage_mount_holds_only_the_thread_that_reads_the_marker(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """Review 3.3: the marker is read without the check's lock. A named pipe stands for the
    marker on a hung hard NFS mount: reading it blocks until something is written into it.
    Another job thread meanwhile gets its answer (notifications only: nothing looked yet)."""
    storage = tmp_path / "storage"
    with sessions() as session:
        node_id = publish_storage(session, storage)
    (storage / STORAGE_MARKER).unlink()
    os.mkfifo(storage / STORAGE_MARKER)
    check = NodeCheck("host:1", storage, [])
    kinds = ["notify", "analyse", "results", "export"]
    answers: dict[str, list[str]] = {}

    def claim(name: str) -> None:
        with sessions() as session:
            answers[name] = check.claimable(session, kinds)

    looking = threading.Thread(target=claim, args=("looking",), daemon=True)
    looking.start()
    # The looking thread is in the marker's open() once the pipe has a reader.
    writer = wait_for(
        lambda: _open_writer(storage / STORAGE_MARKER), timeout=120, what="the marker read"
    )
    try:
        other = threading.Thread(target=claim, args=("other",), daemon=True)
        other.start()
        other.join(timeout=120)
        assert not other.is_alive(), "the second job thread waited for the hung marker read"
        assert answers["other"] == ["notify"]
        assert looking.is_alive()
    finally:
        os.write(writer, f"{node_id}\n".encode())
        os.close(writer)
    looking.join(timeout=120)
    assert answers["looking"] == kinds
    with sessions() as session:
        assert check.claimable(session, kinds) == kinds  # the look stands for the others


def _open_writer(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return None


def test_a_running_worker_on_a_copy_of_the_nodes_folder_at_another_path_takes_no_storage_jobs(
    tmp_path: Path, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """Review 3.4: the storage folder moved (rsync -a, the old folder kept, README), serve
    started on the new path: a worker still on the old copy (the same marker id) would
    write results into the folder to be removed."""
    old, moved = tmp_path / "old", tmp_path / "moved"
    with sessions() as session:
        publish_storage(session, old)
    _queue_analysis(sessions, old, 930_006)
    shutil.copytree(old, moved)
    with sessions() as session:
        publish_storage(session, moved)  # serve started on the new path
        assert read_facts(session)["storage_path"] == str(moved.resolve())
    worker = _worker(old, sessions, [])
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        assert not worker.run_once()
    assert _states(sessions) == {"analyse": "queued"}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "takes no jobs but notifications" in errors[0], errors
    assert f"storage folder {old} is not at the node's storage path {moved}" in errors[0]


def _start_worker(config: Path, log: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "worker", "--config", str(config), *options],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_a_worker_on_a_folder_that_is_not_the_nodes_storage_does_not_start(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str
) -> None:
    """The acceptance test's two set-ups: an empty folder where the node's storage should be
    mounted, and a folder of another node (its own marker); the node's folder starts. Then
    review 3.4: the folder moved to another path (serve started there), the worker still on
    the old copy (the same marker) does not start."""
    storage = tmp_path / "storage"  # the worker's [storage] path, and serve's
    node_storage = tmp_path / "node-storage"
    with sessions() as session:
        node_id = publish_storage(session, storage)
    storage.rename(node_storage)  # the node's folder, not mounted at the path
    config = worker_config(tmp_path, db_url, "threads = 1\npoll_seconds = 0.2\n")
    storage.mkdir()  # empty: the node's storage not mounted there
    log = tmp_path / "worker.log"
    process = _start_worker(config, log)
    try:
        assert process.wait(timeout=120) == 2, log.read_text()
        text = log.read_text()
        assert f"storage folder {storage} is not the node's storage" in text, text
        assert f"it has no {STORAGE_MARKER} file" in text and node_id in text, text
        assert " ready" not in text and "Traceback" not in text, text
        assert not (storage / STORAGE_MARKER).exists()

        (storage / STORAGE_MARKER).write_text("0123456789abcdef0123456789abcdef\n")
        process = _start_worker(config, log)
        assert process.wait(timeout=120) == 2, log.read_text()
        text = log.read_text()
        assert f"its {STORAGE_MARKER} file says id 0123456789abcdef" in text, text

        (storage / STORAGE_MARKER).unlink()
        storage.rmdir()
        node_storage.rename(storage)  # the node's folder mounted at the worker's path
        process = _start_worker(config, log)
        wait_for(lambda: " ready" in log.read_text(), timeout=120, what="worker ready")
        process.terminate()
        process.wait(timeout=30)

        moved = tmp_path / "moved"
        shutil.copytree(storage, moved)  # rsync -a: the old folder kept, the same marker
        with sessions() as session:
            publish_storage(session, moved)  # serve started on the new [storage] path
        process = _start_worker(config, log)
        assert process.wait(timeout=120) == 2, log.read_text()
        text = log.read_text()
        [line] = [line for line in text.splitlines() if "does not start" in line]
        assert f"storage folder {storage} is not at the node's storage path {moved}" in line
        assert "every host must mount the node's storage at the same path" in line
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
    assert "Traceback" not in log.read_text()


def test_serves_own_worker_does_not_compare_its_cards_with_the_published_ones(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str
) -> None:
    """Review 3.1, 3.2: a worker started by serve (--parent-pid) runs serve's configuration.
    Serve published cards its worker does not run (a reload between the publication and the
    worker's own reload; or an edited card file read by a worker serve restarted): it goes
    on analysing, with no ERROR."""
    config = worker_config(tmp_path, db_url, "threads = 1\npoll_seconds = 0.2\n")
    config.write_text(config.read_text().replace(str(tmp_path / "no-models"), str(REPO / "models")))
    with sessions() as session:
        publish_storage(session, tmp_path / "storage")
        publish_cards(session, [load_card(PNEUMOTHORAX)])  # serve's new set: one card
    job_id = _queue_analysis(sessions, tmp_path / "storage", 930_007)
    log = tmp_path / "worker.log"
    process = _start_worker(config, log, "--parent-pid", str(os.getpid()))
    refusal = "takes no analyses until its model cards match serve's"

    def analysed() -> bool:
        assert refusal not in log.read_text(), log.read_text()
        with sessions() as session:
            return session.get(Job, job_id).state == "done"

    try:
        wait_for(analysed, timeout=240, what="the analysis by serve's worker")
        with sessions() as session:
            assert session.get(Job, job_id).lease_owner.endswith(f":{process.pid}")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert refusal not in log.read_text() and "Traceback" not in log.read_text()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_serve_publishes_its_storage_and_cards_and_a_worker_missing_one_leaves_the_study(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str
) -> None:
    """The acceptance test's set-up: serve (here without workers of its own) and stand-alone
    workers on one PostgreSQL database. A worker whose models folder lacks the pneumothorax
    card takes none of the study's jobs; a worker with serve's cards triages it critical."""
    config, port, web_port = write_config(tmp_path, db_url)
    config.write_text(config.read_text().replace("[worker]\ncount = 1\n", "[worker]\ncount = 0\n"))
    node = start_node(tmp_path, config, port, web_port)
    short_folder = tmp_path / "short"
    short_folder.mkdir()
    short_models = short_folder / "models"
    short_models.mkdir()
    for suffix in (".toml", ".onnx"):
        name = f"cxr_lung_seg_demo{suffix}"
        (short_models / name).symlink_to(REPO / "models" / name)
    short_config = short_folder / "dicomnode.toml"
    short_config.write_text(config.read_text().replace(str(REPO / "models"), str(short_models)))
    workers: list[subprocess.Popen] = []
    try:
        with sessions() as session:
            facts = read_facts(session)
        assert facts["storage_id"] == storage_marker(node.storage)
        assert facts["storage_path"] == str(node.storage.resolve())
        assert "cxr-pneumothorax-demo" in facts["model_cards"]
        short_log = tmp_path / "short.log"
        workers.append(_start_worker(short_config, short_log))
        refusal = "takes no analyses until its model cards match serve's"
        wait_for(
            lambda: refusal in short_log.read_text(),
            timeout=120,
            what="the short worker's ERROR",
        )
        ds, _ = make_cxr(930_003, pneumothorax=True)
        path = tmp_path / "ptx.dcm"
        ds.save_as(path, enforce_file_format=True)
        sent = node.storescu(path)
        assert sent.returncode == 0, sent.stderr
        full_log = tmp_path / "full.log"
        workers.append(_start_worker(config, full_log))

        def triaged() -> Study | None:
            with sessions() as session:
                study = session.scalars(select(Study)).one_or_none()
                results = session.scalars(select(Job).where(Job.kind == "results")).all()
                done = study is not None and results and all(j.state == "done" for j in results)
                return study if done else None

        study = wait_for(triaged, timeout=240, what="the study triaged and its results written")
        assert study.tier == "critical", study.reason
        with sessions() as session:
            owners = {
                int(job.lease_owner.rsplit(":", 1)[1])
                for job in session.scalars(select(Job).where(Job.kind.in_(["analyse", "results"])))
            }
        assert owners == {workers[1].pid}, (short_log.read_text(), full_log.read_text())
        assert "cxr-pneumothorax-demo 1.1.0" in short_log.read_text().split("missing ", 1)[1]
    finally:
        for process in workers:
            if process.poll() is None:
                process.terminate()
        for process in workers:
            process.wait(timeout=30)
        stop_node(node)


def test_a_reload_of_serve_publishes_its_new_cards(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str
) -> None:
    """A card removed from serve's folder and the node reloaded: the published set loses it
    (workers that still run it then take no analyses until they are reloaded too)."""
    from dicomnode.config import load_settings
    from dicomnode.models.registry import discover_cards
    from dicomnode.nodestate import published_cards
    from dicomnode.serve import Node

    models = tmp_path / "models"
    models.mkdir()
    for card in (PNEUMOTHORAX, LUNG_SEG):
        (models / card.name).symlink_to(card)
    config = worker_config(tmp_path, db_url, "threads = 1\n")
    config.write_text(config.read_text().replace(str(tmp_path / "no-models"), str(models)))
    settings = load_settings(config)
    cards = discover_cards(settings.model_folders)
    with sessions() as session:
        publish_cards(session, cards)
    node = Node(config, settings, cards, None, sessions=sessions)
    (models / PNEUMOTHORAX.name).unlink()
    assert node.reload()
    with sessions() as session:
        assert set(published_cards(read_facts(session))) == {"cxr-lung-seg-demo"}


def test_a_worker_reloaded_onto_another_storage_path_takes_no_storage_jobs(
    tmp_path: Path, sessions: sessionmaker[Session], db_url: str
) -> None:
    """[storage] path is read again at a worker's reload: the check looks at the new path
    (it kept looking at the one the worker started with)."""
    from conftest import queue_notifications

    from dicomnode.config import load_settings
    from dicomnode.models.registry import discover_cards

    models = tmp_path / "models"
    models.mkdir()
    (models / LUNG_SEG.name).symlink_to(LUNG_SEG)
    config = worker_config(tmp_path, db_url, "threads = 1\n")
    config.write_text(config.read_text().replace(str(tmp_path / "no-models"), str(models)))
    settings = load_settings(config)
    with sessions() as session:
        publish_storage(session, settings.storage_path)
    worker = Worker(settings, sessions, discover_cards(settings.model_folders))
    assert not worker.run_once()  # nothing queued; its folder is the node's
    other = tmp_path / "other"
    config.write_text(config.read_text().replace(str(tmp_path / "storage"), str(other)))
    assert worker.reload()
    _queue_analysis(sessions, settings.storage_path, 930_008)
    queue_notifications(sessions, "1.2.826.0.1.3680043.10.1.96", 1)
    assert worker.run_once()  # the notification
    assert not worker.run_once()
    assert _states(sessions) == {"analyse": "queued", "notify": "done"}
