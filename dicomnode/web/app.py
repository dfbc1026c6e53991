"""The radiologists' web side: worklist page, REST API (schema at /openapi.json), health."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import RESEARCH_DEMO_NOTICE, __version__
from dicomnode.config import WorklistSettings
from dicomnode.outage import OutageLog, database_reason, database_unavailable
from dicomnode.web.api import api_router
from dicomnode.web.auth import NotLoggedIn, authenticator
from dicomnode.web.jobs_api import jobs_router
from dicomnode.web.pages import page_router
from dicomnode.web.preview import preview_router
from dicomnode.worklist.audit import ViewThrottle

log = logging.getLogger("dicomnode.web")

STATIC = Path(__file__).parent / "static"
# While the database stays unavailable, the web's line again at most this often.
DATABASE_REMINDER_SECONDS = 60.0
# Everything is served from this node: no CDN, no inline script, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    sessions: sessionmaker[Session],
    worklist: Callable[[], WorklistSettings] = WorklistSettings,
) -> FastAPI:
    """The FastAPI application over the node's database; ``worklist`` gives the site's
    ``[worklist]`` settings as they are now (a reload may change them)."""
    app = FastAPI(
        title="dicomnode",
        version=__version__,
        description=(
            f"AI triage worklist. {RESEARCH_DEMO_NOTICE}. Authenticate with "
            "`Authorization: Bearer <token>` (`dicomnode users token NAME` or POST /api/login)."
        ),
        # Swagger UI and ReDoc load their assets from a CDN; the schema itself is enough.
        docs_url=None,
        redoc_url=None,
    )
    caller_of = authenticator(sessions)
    views = ViewThrottle()
    app.include_router(api_router(sessions, caller_of, views, worklist))
    app.include_router(page_router(sessions, caller_of, views, worklist))
    app.include_router(jobs_router(sessions, caller_of))
    app.include_router(preview_router(sessions, caller_of, views))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    outage = database_outage(sessions)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(DisconnectionError)
    async def database_unavailable_503(request: Request, error: Exception) -> Response:
        """A database the request cannot use (refused, down, its file unreadable): 503 with
        a JSON detail, as /readyz's check says it, and one WARNING for the outage (a reminder
        at most once a minute) instead of a 500 and a traceback per request (a probe or a
        polling page every few seconds flooded the log). Other database errors stay 500s."""
        if not database_unavailable(error):
            raise error
        outage.failed(
            "web: database unavailable: %s; requests that need it are answered 503 until it "
            "is back",
            database_reason(error),
        )
        detail = f"database unavailable: {type(getattr(error, 'orig', None) or error).__name__}"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(NotLoggedIn)
    async def not_logged_in(request: Request, error: NotLoggedIn) -> Response:
        if request.url.path.startswith("/api/") or request.method != "GET":
            return await http_exception_handler(request, error)
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.middleware("http")
    async def security_headers(request: Request, call_next) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if request.url.scheme == "https":  # directly, or from a trusted proxy
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    # The pages link /static/favicon.svg; whatever else a browser opens (/openapi.json, an
    # error) makes it ask for /favicon.ico, a console error when that is a 404.
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(
            STATIC / "favicon.svg",
            media_type="image/svg+xml",
            headers={"Cache-Control": "max-age=86400"},
        )

    # Liveness: the web server answers. Not the database: an outage is /readyz's (a probe
    # that failed with it had a healthy node restarted, which mends no database).
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def database_outage(sessions: sessionmaker[Session]) -> OutageLog:
    """The web's database outage in the log: started by a request the database failed (see
    ``create_app``), ended (one INFO) by the next statement the database runs for anyone in
    this process."""
    outage = OutageLog(log, remind_seconds=DATABASE_REMINDER_SECONDS)
    engine = sessions.kw.get("bind")
    if engine is not None:

        @event.listens_for(engine, "after_cursor_execute")
        def _answered(*_args: object) -> None:
            outage.ended("web: database available again after %(seconds).0f s")

    return outage
