"""A worker's claim time beside a study with many sent exports, on SQLite and PostgreSQL.

Fills a fresh database (an SQLite file; a new schema of the test PostgreSQL) with one
study's ``done`` sent exports and ``queued`` exports due now, all to one destination, and
ten queued analyses (PostgreSQL: then ANALYZE, as autovacuum would), and times the worker's
claims as it makes them (``claim_together`` with :data:`~dicomnode.export.jobs.TOGETHER`):
of exports only, of every kind (an analysis is taken first), of notify and analyse only.
Prints the median and the slowest of 9 claims per case.

    python benchmarks/job_claims.py [--databases sqlite postgresql] [--queued 1200]
        [--done 0 1200 5000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import timedelta

from sqlalchemy import insert, text

from dicomnode.db.models import Job, Study
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade, utcnow
from dicomnode.export.jobs import TOGETHER
from dicomnode.jobs.queue import claim_together

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CLAIMS = 9
KINDS = {
    "export": ["export"],
    "every kind": ["notify", "analyse", "results", "export"],
    "notify, analyse": ["notify", "analyse"],
}


def fill(url: str, done: int, queued: int) -> None:
    """One study's ``done`` sent exports, ``queued`` due ones and ten queued analyses."""
    upgrade(url)
    engine = make_engine(url)
    now = utcnow()
    before = now - timedelta(hours=1)
    with make_sessionmaker(engine)() as session:
        study = Study(
            study_instance_uid=f"2.25.{uuid.uuid4().int}",
            received_at=now,
            last_instance_at=now,
            ready_at=now,
            due_at=now,
        )
        session.add(study)
        session.flush()
        common = {"study_id": study.id, "lease_owner": "", "last_error": ""}
        sent = {"state": "done", "attempts": 1, "run_after": before, "finished_at": before}
        due = {"state": "queued", "attempts": 0, "run_after": now - timedelta(seconds=1)}
        rows = [
            {**common, **sent, "kind": "export", "created_at": before, "payload": export}
            for export in ({"destination": "pacs", "result_id": n} for n in range(done))
        ]
        rows += [
            {**common, **due, "kind": "export", "created_at": now, "payload": export}
            for export in ({"destination": "pacs", "result_id": n} for n in range(queued))
        ]
        rows += [{**common, **due, "kind": "analyse", "created_at": now, "payload": {}}] * 10
        session.execute(insert(Job), rows)
        session.commit()
        if engine.dialect.name == "postgresql":
            session.execute(text("ANALYZE jobs"))
            session.commit()
    engine.dispose()


def claim_seconds(url: str, kinds: list[str]) -> list[float]:
    engine = make_engine(url)
    seconds = []
    with make_sessionmaker(engine)() as session:
        for _ in range(CLAIMS):
            started = time.perf_counter()
            claimed = claim_together(session, "bench", kinds, 30, {"export": TOGETHER})
            seconds.append(time.perf_counter() - started)
            assert claimed, "nothing to claim"
    engine.dispose()
    return seconds


def database_url(database: str) -> tuple[str, str | None]:
    """A fresh database's URL and, on PostgreSQL, its schema (to drop)."""
    if database == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp()}/dicomnode.db", None
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", schema


def drop(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--queued", type=int, default=1200)
    parser.add_argument("--done", type=int, nargs="+", default=[0, 1200, 5000])
    args = parser.parse_args()
    for database in args.databases:
        for done in args.done:
            for name, kinds in KINDS.items():
                url, schema = database_url(database)
                try:
                    fill(url, done, args.queued)
                    seconds = claim_seconds(url, kinds)
                finally:
                    if schema is not None:
                        drop(schema)
                print(
                    f"{database:10} done {done:5}  queued {args.queued:5}  {name:15}"
                    f"  median {statistics.median(seconds) * 1000:7.1f} ms"
                    f"  max {max(seconds) * 1000:7.1f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
