"""Serve the FastAPI app on a real uvicorn server in a thread, seed web users, and open its
pages in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import uvicorn
from conftest import free_port
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.session import utcnow
from dicomnode.users import add_user, issue_token

if TYPE_CHECKING:
    from playwright.sync_api import Page

PASSWORD = "correct horse battery"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


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


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A fresh 1440 x 900 page in headless Chromium (15 s timeouts); skips without Playwright."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        page = context.new_page()
        page.set_default_timeout(15_000)
        yield page
        context.close()
        browser.close()


def log_in(page: Page, base: str, username: str = "dr_house") -> None:
    """Open the worklist, be sent to the log-in form, log in and wait for the rows."""
    page.goto(f"{base}/worklist")
    assert page.url.startswith(f"{base}/login")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/worklist")
    page.wait_for_selector("#rows tr[data-study-uid]")


def screenshot(page: Page, name: str) -> None:
    """Keep a screenshot where ``WORKLIST_SCREENSHOTS`` (a folder) says, for a person to look at."""
    folder = os.environ.get("WORKLIST_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name))
