"""The radiologists' pages: log-in, log-out, the live worklist and a study's detail."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import RESEARCH_DEMO_NOTICE, __version__
from dicomnode.config import WorklistSettings
from dicomnode.db.models import Study
from dicomnode.db.session import utcnow
from dicomnode.findings import probability_text
from dicomnode.users import issue_token, principal_for_token, revoke_token
from dicomnode.web.auth import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    SESSION_LIFETIME,
    Caller,
    new_login_csrf,
    same_secret,
    session_csrf,
)
from dicomnode.web.job_failures import rows_out
from dicomnode.web.schemas import WorklistOut
from dicomnode.web.study_view import study_detail
from dicomnode.web.throttle import attempt_login, login_throttle, wait_text
from dicomnode.worklist import audit, service
from dicomnode.worklist.policy import TIERS
from dicomnode.worklist.service import StudyNotFound

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
TEMPLATES.env.filters["probability"] = probability_text
PAGE_SIZE = 100
POLL_SECONDS = 3


def _safe_next(target: str) -> str:
    """Only same-site paths, so the log-in form cannot redirect to another site."""
    return target if target.startswith("/") and not target.startswith("//") else "/worklist"


def _login_page(
    request: Request, next_path: str, error: str = "", code: int = 200, retry_after: int = 0
) -> Response:
    token = new_login_csrf()
    response = TEMPLATES.TemplateResponse(
        request,
        "login.html",
        {
            "csrf_token": token,
            "next": next_path,
            "error": error,
            "notice": RESEARCH_DEMO_NOTICE,
            "version": __version__,
        },
        status_code=code,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=3600,
    )
    if retry_after:
        response.headers["Retry-After"] = str(retry_after)
    return response


def page_router(
    sessions: sessionmaker[Session],
    caller_of: Callable[..., Caller],
    views: audit.ViewThrottle,
    site_worklist: Callable[[], WorklistSettings],
) -> APIRouter:
    """The HTML routes; they stay out of the OpenAPI schema."""
    router = APIRouter(include_in_schema=False)
    authenticated = Depends(caller_of)

    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/worklist", status.HTTP_303_SEE_OTHER)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/worklist") -> Response:
        return _login_page(request, _safe_next(next))

    @router.post("/login")
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=1024)],
        csrf_token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/worklist",
    ) -> Response:
        next_path = _safe_next(next)
        if not same_secret(csrf_token, request.cookies.get(LOGIN_CSRF_COOKIE, "")):
            return _login_page(request, next_path, "The form expired; please log in again.", 403)
        attempt = attempt_login(
            sessions,
            login_throttle(request.app),
            request.client.host if request.client else None,
            username,
            password,
            "page",
        )
        if attempt.busy:
            message = "Too many log-ins at once; please try again in a few seconds."
            return _login_page(request, next_path, message, 503, attempt.retry_after)
        if attempt.retry_after:
            message = (
                "Too many failed log-ins for this user name or from this computer; "
                f"please try again in {wait_text(attempt.retry_after)}."
            )
            return _login_page(request, next_path, message, 429, attempt.retry_after)
        principal = attempt.principal
        if principal is None:
            return _login_page(request, next_path, "Wrong user name or password.", 401)
        now = utcnow()
        with sessions() as session:
            # A session this browser still had ends: one cookie, one live session.
            previous = request.cookies.get(SESSION_COOKIE, "")
            if previous:
                revoke_token(session, previous, kind="session")
            token = issue_token(
                session, principal.username, now, kind="session", lifetime=SESSION_LIFETIME
            )
            audit.record(session, principal.username, "login", now, detail="page")
            session.commit()
        log.info("user %s logged in", principal.username)
        response = RedirectResponse(next_path, status.HTTP_303_SEE_OTHER)
        response.set_cookie(
            SESSION_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            max_age=int(SESSION_LIFETIME.total_seconds()),
        )
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    @router.post("/logout")
    def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
        # The presented session always ends, CSRF token or not: a forged log-out can do no
        # harm, while keeping the session after showing the log-in page would mislead.
        token = request.cookies.get(SESSION_COOKIE, "")
        response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
        if token:
            now = utcnow()
            with sessions() as session:
                principal = principal_for_token(session, token, now, kind="session")
                revoke_token(session, token, kind="session")
                if principal is not None:
                    detail = "" if same_secret(csrf_token, session_csrf(token)) else "no CSRF token"
                    audit.record(session, principal.username, "logout", now, detail=detail)
                session.commit()
        response.delete_cookie(SESSION_COOKIE)
        return response

    @router.get("/worklist", response_class=HTMLResponse)
    def worklist(request: Request, caller: Caller = authenticated) -> Response:
        now = utcnow()
        with sessions() as session:
            rows = service.reading_order(session, PAGE_SIZE, 0, site=site_worklist())
            total = service.count(session)
            shown = rows_out(session, rows)
            modalities = sorted(m for m in session.scalars(select(Study.modality).distinct()) if m)
            if views.due(caller.principal.username, "worklist", now):
                audit.record(session, caller.principal.username, "view_worklist", now)
                session.commit()
        initial = WorklistOut(
            notice=RESEARCH_DEMO_NOTICE,
            server_time=now,
            total=total,
            limit=PAGE_SIZE,
            offset=0,
            rows=shown,
        )
        return TEMPLATES.TemplateResponse(
            request,
            "worklist.html",
            {
                "initial": initial.model_dump(mode="json"),
                "user": caller.principal,
                "csrf_token": caller.csrf_token,
                "modalities": modalities,
                "tiers": list(TIERS),
                "notice": RESEARCH_DEMO_NOTICE,
                "version": __version__,
                "page_size": PAGE_SIZE,
                "poll_ms": POLL_SECONDS * 1000,
            },
            headers={"Cache-Control": "no-store"},
        )

    @router.get("/worklist/study/{study_instance_uid}", response_class=HTMLResponse)
    def study(
        request: Request, study_instance_uid: str, caller: Caller = authenticated
    ) -> Response:
        """Every model's findings and the study's result objects with their export state."""
        now = utcnow()
        with sessions() as session:
            try:
                detail = study_detail(session, study_instance_uid, site_worklist())
            except StudyNotFound as error:
                detail, missing = None, str(error)
            else:
                missing = ""
                audit.record(
                    session,
                    caller.principal.username,
                    "view_study",
                    now,
                    study_instance_uid=study_instance_uid,
                    detail="page",
                )
                session.commit()
        return TEMPLATES.TemplateResponse(
            request,
            "study.html",
            {
                "study": detail,
                "missing": missing,
                "user": caller.principal,
                "csrf_token": caller.csrf_token,
                "tiers": list(TIERS),
                "notice": RESEARCH_DEMO_NOTICE,
                "version": __version__,
            },
            status_code=404 if detail is None else 200,
            headers={"Cache-Control": "no-store"},
        )

    return router
