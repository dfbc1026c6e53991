"""GET /api/worklist latency at 100,000 studies on the embedded default (SQLite).

Fills a fresh SQLite database with studies, AI findings and result rows by bulk insert,
starts the real app on uvicorn in a separate process, and times authenticated requests
from an httpx client: the default first page, a deep page, and filters. Prints p50/p95 per
query and overall, then PASS or FAIL against the target (p95 <= 50 ms).

    python benchmarks/worklist_query.py [--studies 100000] [--requests 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import insert

from dicomnode.db.models import FindingRow, ResultObject, Study
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade, utcnow
from dicomnode.ports import free_port
from dicomnode.users import add_user, issue_token
from dicomnode.worklist.policy import FindingFact, StudyFacts, prioritise

TARGET_P95_MS = 50.0
MODALITIES = ["DX"] * 5 + ["CR"] * 3 + ["CT", "MR"]
QUERIES = {
    "first page (100)": {},
    "page 11 (offset 1000)": {"offset": 1000},
    "tier=critical": {"tier": "critical"},
    "modality=CT": {"modality": "CT"},
    "status=in_progress": {"status": "in_progress"},
    "tier=urgent&modality=DX": {"tier": "urgent", "modality": "DX"},
    "tier=stat&tier=critical": {"tier": ["stat", "critical"]},
}
CHUNK = 10_000


def _finding(rng: random.Random) -> FindingFact:
    """About 2% critical (pneumothorax), 10% urgent (effusion), the rest below threshold."""
    roll = rng.random()
    if roll < 0.02:
        return FindingFact("Pneumothorax", rng.uniform(0.5, 0.99), 0.5, critical=True)
    if roll < 0.12:
        return FindingFact("Pleural effusion", rng.uniform(0.5, 0.95), 0.5, critical=False)
    return FindingFact("Pneumothorax", rng.uniform(0.0, 0.49), 0.5, critical=True)


def _study(rng: random.Random, number: int, now, reported_fraction: float, seed: int):
    received = now - timedelta(minutes=rng.uniform(0, 7 * 24 * 60))
    finding = _finding(rng)
    priority = prioritise(StudyFacts(received, analysis_status="analysed"), [finding], now)
    roll = rng.random()
    status = "reported" if roll < reported_fraction else "ready"
    if status == "ready" and rng.random() < 0.01:
        status = "in_progress"
    row = {
        "study_instance_uid": f"2.25.{seed}{number:09d}",
        "patient_id": f"PID{number:07d}",
        "patient_name": f"BENCH^PATIENT^{number}",
        "accession_number": f"ACC{number:09d}",
        "modality": rng.choice(MODALITIES),
        "study_description": "Chest",
        "received_at": received,
        "last_instance_at": received,
        "ready_at": received,
        "received_generation": 1,
        "queued_generation": 1,
        "analysis_status": "analysed",
        "analysis_error": "",
        "tier": priority.tier,
        "tier_rank": priority.tier_rank,
        "score": priority.score,
        "reason": priority.reason,
        "ups_priority": priority.ups_priority,
        "due_at": priority.due_at,
        "reading_status": status,
        "claimed_by": "" if status == "ready" else "dr_bench",
        "reported_by": "dr_bench" if status == "reported" else "",
    }
    return row, finding


def fill(url: str, studies: int, reported_fraction: float, seed: int = 0) -> None:
    """Bulk-insert ``studies`` analysed studies with one finding and one SR result each."""
    rng = random.Random(seed)
    now = utcnow()
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        for start in range(0, studies, CHUNK):
            made = [
                _study(rng, number, now, reported_fraction, seed)
                for number in range(start, min(start + CHUNK, studies))
            ]
            ids = session.scalars(
                insert(Study).returning(Study.id, sort_by_parameter_order=True),
                [row for row, _ in made],
            ).all()
            session.execute(
                insert(FindingRow),
                [
                    {
                        "study_id": study_id,
                        "model_name": "cxr-demo",
                        "model_version": "1.0.0",
                        "code_value": "36118008",
                        "code_scheme": "SCT",
                        "code_meaning": finding.meaning,
                        "probability": finding.probability,
                        "threshold": finding.threshold,
                        "critical": finding.critical,
                    }
                    for study_id, (_, finding) in zip(ids, made, strict=True)
                ],
            )
            session.execute(
                insert(ResultObject),
                [
                    {
                        "study_id": study_id,
                        "kind": "sr",
                        "model_name": "cxr-demo",
                        "model_version": "1.0.0",
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
                        "sop_instance_uid": f"2.25.9{study_id:012d}",
                        "series_instance_uid": f"2.25.8{study_id:012d}",
                        "path": f"/var/dicomnode/results/{study_id}.dcm",
                        "created_at": now,
                    }
                    for study_id in ids
                ],
            )
            session.commit()
    engine.dispose()


def _serve(url: str, port: int) -> None:
    import uvicorn

    from dicomnode.web.app import create_app

    sessions = make_sessionmaker(make_engine(url))
    uvicorn.run(create_app(sessions), host="127.0.0.1", port=port, log_level="warning")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(base: str, token: str, requests: int) -> dict[str, list[float]]:
    """Latency in milliseconds of each query, ``requests`` times each, interleaved."""
    timings: dict[str, list[float]] = {name: [] for name in QUERIES}
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for params in QUERIES.values():  # warm-up: connections, caches, query plans
            for _ in range(5):
                client.get("/api/worklist", params=params).raise_for_status()
        for _ in range(requests):
            for name, params in QUERIES.items():
                started = time.perf_counter()
                response = client.get("/api/worklist", params=params)
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                timings[name].append(elapsed)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="per query")
    parser.add_argument(
        "--reported-fraction",
        type=float,
        default=0.0,
        help="share of studies already reported (0 = all 100,000 on the open worklist)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as folder:
        url = f"sqlite:///{Path(folder) / 'dicomnode.db'}"
        upgrade(url)
        started = time.perf_counter()
        fill(url, args.studies, args.reported_fraction)
        print(
            f"filled {args.studies} studies (+ findings, results) in "
            f"{time.perf_counter() - started:.1f} s"
        )
        engine = make_engine(url)
        with make_sessionmaker(engine)() as session:
            add_user(session, "bench", "radiologist", "benchmark-password", utcnow())
            token = issue_token(session, "bench", utcnow())
            session.commit()
        engine.dispose()

        port = free_port()
        server = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(url, port), daemon=True
        )
        server.start()
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{base}/healthz", timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or not server.is_alive():
                        raise RuntimeError("the web server did not start") from None
                    time.sleep(0.1)
            timings = measure(base, token, args.requests)
        finally:
            server.terminate()
            server.join(10)

    print(
        f"GET /api/worklist on SQLite, {args.studies} studies, "
        f"{args.reported_fraction:.0%} reported, {args.requests} requests per query"
    )
    print(f"{'query':<28} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for name, values in timings.items():
        print(
            f"{name:<28} {statistics.median(values):8.1f} {_percentile(values, 0.95):8.1f} "
            f"{max(values):8.1f}"
        )
    everything = [value for values in timings.values() for value in values]
    p50, p95 = statistics.median(everything), _percentile(everything, 0.95)
    worst = max(_percentile(values, 0.95) for values in timings.values())
    print(f"{'all queries':<28} {p50:8.1f} {p95:8.1f} {max(everything):8.1f}")
    verdict = "PASS" if worst <= TARGET_P95_MS else "FAIL"
    print(f"{verdict}: worst per-query p95 {worst:.1f} ms (target <= {TARGET_P95_MS:.0f} ms)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
