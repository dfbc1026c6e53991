"""The web side while its database is unavailable: the API answers 503 with a JSON detail
naming the database, /healthz (liveness) still 200, and the log has one WARNING for the
outage and one INFO when it ends, not an ~80-line "Exception in ASGI application" traceback
per request (a liveness probe every few seconds flooded the log) and bare 500s.

The outages are real: an SQLite database whose file cannot be opened (a folder stands where
it should be), a PostgreSQL URL to a port where nothing listens, and a PostgreSQL database
that refuses connections and then takes them again (its connections ended, as a restart
does).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from test_assembly_outage import _refuse_connections, private_database  # noqa: F401
from web_server import add_users, serve

from dicomnode.config import Settings
from dicomnode.db.session import make_engine, make_sessionmaker
from dicomnode.ports import free_port
from dicomnode.web.app import create_app
from dicomnode.web.health import health_router

# Requests that read the database (a bearer token is looked up in it; without one the API
# answers 401 without asking it).
NEED_THE_DATABASE = [
    ("GET", "/api/worklist", True),
    ("GET", "/api/me", True),
    ("POST", "/api/login", False),
]


def _unavailable_url(db_url: str, tmp_path: Path) -> str:
    if db_url.startswith("sqlite"):
        (tmp_path / "gone.db").mkdir()  # a folder: SQLite cannot open it
        return f"sqlite:///{tmp_path / 'gone.db'}"
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=5"


def _loud(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [
        (r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelno > logging.INFO
    ]


def test_an_unavailable_database_is_a_503_with_one_warning_and_healthz_stays_live(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(_unavailable_url(db_url, tmp_path))
    sessions = make_sessionmaker(engine)
    app = create_app(sessions)
    settings = Settings(storage={"path": tmp_path / "storage"})
    app.include_router(health_router(sessions, lambda: (settings, [])))
    try:
        with (
            caplog.at_level(logging.INFO),
            serve(app) as url,
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            for _ in range(3):
                for method, path, token in NEED_THE_DATABASE:
                    headers = {"Authorization": "Bearer dn_anything"} if token else {}
                    body = {"username": "dr_house", "password": "x"}
                    response = client.request(
                        method, path, headers=headers, json=body if method == "POST" else None
                    )
                    assert response.status_code == 503, (method, path, response.text)
                    assert response.json() == {"detail": "database unavailable: OperationalError"}
                    assert response.headers["content-type"] == "application/json"
                # Liveness: the web server answers, whatever the database does.
                live = client.get("/healthz")
                assert (live.status_code, live.json()) == (200, {"status": "ok"})
                # Readiness says why (as before); the metrics' database gauges cannot be read.
                ready = client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["database"] == "unavailable: OperationalError"
                scrape = client.get("/metrics")
                assert scrape.status_code == 503
                assert scrape.json() == {"detail": "database unavailable: OperationalError"}
    finally:
        engine.dispose()
    loud = _loud(caplog)
    assert len(loud) == 1, loud
    ((logger, level, line),) = loud
    assert (logger, level) == ("dicomnode.web", "WARNING"), loud
    assert line.startswith("web: database unavailable: OperationalError: "), line
    assert "Traceback" not in caplog.text and "Exception in ASGI" not in caplog.text


def test_the_web_answers_again_once_the_database_does_with_one_line_each_way(
    private_database: tuple[str, str],  # noqa: F811 (the fixture imported above)
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, name = private_database
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    auth = {"Authorization": f"Bearer {add_users(sessions)['boss']}"}
    try:
        with (
            caplog.at_level(logging.INFO),
            serve(create_app(sessions)) as web,
            httpx.Client(base_url=web, timeout=30, headers=auth) as client,
        ):
            assert client.get("/api/worklist").status_code == 200
            _refuse_connections(name, refused=True)
            for _ in range(4):
                answer = client.get("/api/worklist")
                assert answer.status_code == 503, answer.text
                assert answer.json() == {"detail": "database unavailable: OperationalError"}
                assert client.get("/healthz").status_code == 200
            during = _loud(caplog)
            _refuse_connections(name, refused=False)
            assert client.get("/api/worklist").status_code == 200
    finally:
        engine.dispose()
    assert [(logger, level) for logger, level, _ in during] == [("dicomnode.web", "WARNING")]
    web_lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "dicomnode.web"]
    assert len(web_lines) == 2, web_lines
    assert web_lines[1][0] == "INFO"
    assert web_lines[1][1].startswith("web: database available again after "), web_lines
    assert _loud(caplog) == during
    assert "Traceback" not in caplog.text
