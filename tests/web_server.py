"""Serve the FastAPI app on a real uvicorn server in a thread, and seed web users."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from conftest import free_port
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.session import utcnow
from dicomnode.users import add_user, issue_token

PASSWORD = "correct horse battery"


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """The app's base URL while a uvicorn server runs it on a free port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def add_users(sessions: sessionmaker[Session]) -> dict[str, str]:
    """Radiologists dr_house and dr_grey and admin "boss", with a bearer token each."""
    tokens = {}
    with sessions() as session:
        for name, role in (("dr_house", "radiologist"), ("dr_grey", "radiologist")):
            add_user(session, name, role, PASSWORD, utcnow())
        add_user(session, "boss", "admin", PASSWORD, utcnow())
        for name in ("dr_house", "dr_grey", "boss"):
            tokens[name] = issue_token(session, name, utcnow())
        session.commit()
    return tokens
