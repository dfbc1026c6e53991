"""One SQLite writer at a time among listener processes (dicomnode.db.writer_lock)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine

from dicomnode.db.writer_lock import WriterLock

HOLDER = """
import sys, time
from pathlib import Path
from dicomnode.db.writer_lock import WriterLock
lock = WriterLock(Path(sys.argv[1]))
with lock.held():
    print("held", flush=True)
    time.sleep(0.5)
    print(time.monotonic(), flush=True)
"""


def test_a_writer_waits_for_another_process_to_release(tmp_path: Path) -> None:
    path = tmp_path / "node.db.writers"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with WriterLock(path).held():
            acquired = time.monotonic()
        released = float(holder.stdout.readline())
    finally:
        holder.wait(timeout=30)
    assert acquired >= released


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "node.db.writers")
    inside = []
    overlaps = []

    def write() -> None:
        for _ in range(50):
            with lock.held():
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.0005)
                inside.pop()

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlaps


def test_only_sqlite_files_get_a_lock(tmp_path: Path) -> None:
    database = tmp_path / "node.db"
    assert WriterLock.for_engine(create_engine(f"sqlite:///{database}")).path == Path(
        f"{database}.writers"
    )
    assert WriterLock.for_engine(create_engine("sqlite://")).path is None
    postgres = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    assert WriterLock.for_engine(postgres).path is None
    assert WriterLock.for_engine(None).path is None
    with WriterLock(None).held():
        pass
