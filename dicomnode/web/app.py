"""The radiologists' web side: worklist page, REST API (schema at /openapi.json), health."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import RESEARCH_DEMO_NOTICE, __version__
from dicomnode.config import WorklistSettings
from dicomnode.web.api import api_router
from dicomnode.web.auth import NotLoggedIn, authenticator
from dicomnode.web.jobs_api import jobs_router
from dicomnode.web.pages import page_router
from dicomnode.web.preview import preview_router
from dicomnode.worklist.audit import ViewThrottle

STATIC = Path(__file__).parent / "static"
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

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
