"""REST API: worklist, studies (claim, release, complete, reopen, override), results, audit,
log-in.

Roles: a radiologist may read the worklist, studies and results, claim, release their own
claims, complete the studies they claimed, reopen their own reports and override. An admin
may do all that, release anyone's claim, reopen anyone's report and read the audit log (who
saw or changed what), which radiologists may not. Completing needs the caller's claim for
admins too (as on the page): an admin releases a forgotten claim, then claims and completes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.config import WorklistSettings
from dicomnode.db.models import ResultObject, Study
from dicomnode.db.session import utcnow
from dicomnode.users import issue_token, revoke_token
from dicomnode.web.auth import SESSION_LIFETIME, Caller, admin_only
from dicomnode.web.job_failures import rows_out
from dicomnode.web.schemas import (
    AUTH_ERRORS,
    MAX_DB_INT,
    AuditOut,
    ErrorOut,
    LoginIn,
    MeOut,
    OverrideIn,
    ReadingStatus,
    TierName,
    TokenOut,
    WorklistOut,
    WorklistRowOut,
    audit_out,
)
from dicomnode.web.study_view import StudyDetailOut, study_detail
from dicomnode.web.throttle import attempt_login, login_throttle, wait_text
from dicomnode.worklist import audit, service
from dicomnode.worklist.service import (
    ClaimConflict,
    InvalidRequest,
    NotAllowed,
    StudyNotFound,
    WorklistError,
)

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict] = {
    404: {"model": ErrorOut, "description": "no such study or result object"},
    409: {
        "model": ErrorOut,
        "description": "not possible in the study's state (e.g. claimed by someone else)",
    },
}


def _http_error(error: WorklistError) -> HTTPException:
    if isinstance(error, StudyNotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(error))
    if isinstance(error, NotAllowed):
        return HTTPException(status.HTTP_403_FORBIDDEN, str(error))
    if isinstance(error, InvalidRequest):
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error))
    if isinstance(error, ClaimConflict):
        return HTTPException(status.HTTP_409_CONFLICT, str(error))
    return HTTPException(status.HTTP_409_CONFLICT, str(error))


def api_router(
    sessions: sessionmaker[Session],
    caller_of: Callable[..., Caller],
    views: audit.ViewThrottle,
    site_worklist: Callable[[], WorklistSettings],
) -> APIRouter:
    """The /api routes over the node's database."""
    router = APIRouter(prefix="/api", responses=AUTH_ERRORS)
    authenticated = Depends(caller_of)

    def admin(caller: Caller = authenticated) -> Caller:
        return admin_only(caller)

    admin_required = Depends(admin)

    @router.post(
        "/login",
        response_model=TokenOut,
        tags=["auth"],
        responses={
            429: {"model": ErrorOut, "description": "too many failed log-ins; see Retry-After"},
            503: {"model": ErrorOut, "description": "too many log-ins at once; see Retry-After"},
        },
    )
    def login(credentials: LoginIn, request: Request) -> TokenOut:
        """Exchange a user name and password for a bearer token (valid 12 hours).

        After 5 failed log-ins for a user name (or 20 from one address) within 15 minutes,
        log-in is refused with 429 and Retry-After; the wait grows with further failures."""
        attempt = attempt_login(
            sessions,
            login_throttle(request.app),
            request.client.host if request.client else None,
            credentials.username,
            credentials.password,
            "api",
        )
        if attempt.busy:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "too many log-ins at once; try again shortly",
                headers={"Retry-After": str(attempt.retry_after)},
            )
        if attempt.retry_after:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"too many failed log-ins; try again in {wait_text(attempt.retry_after)}",
                headers={"Retry-After": str(attempt.retry_after)},
            )
        principal = attempt.principal
        if principal is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong user name or password")
        now = utcnow()
        with sessions() as session:
            token = issue_token(session, principal.username, now, lifetime=SESSION_LIFETIME)
            audit.record(session, principal.username, "login", now, detail="api token")
            session.commit()
        log.info("user %s logged in to the API", principal.username)
        return TokenOut(
            token=token,
            expires_at=now + SESSION_LIFETIME,
            username=principal.username,
            role=principal.role,
        )

    @router.post("/logout", status_code=204, tags=["auth"])
    def logout(caller: Caller = authenticated) -> None:
        """Revoke the token (or session) this request was made with."""
        with sessions() as session:
            revoke_token(session, caller.token)
            audit.record(session, caller.principal.username, "logout", utcnow())
            session.commit()

    @router.get("/me", response_model=MeOut, tags=["auth"])
    def me(caller: Caller = authenticated) -> MeOut:
        """Who this token or session belongs to."""
        return MeOut(username=caller.principal.username, role=caller.principal.role)

    @router.get("/worklist", response_model=WorklistOut, tags=["worklist"])
    def worklist(
        caller: Caller = authenticated,
        modality: Annotated[list[str], Query(description="e.g. CR, DX, CT (any of)")] = [],  # noqa: B006
        tier: Annotated[list[TierName], Query(description="any of these tiers")] = [],  # noqa: B006
        status_: Annotated[
            list[ReadingStatus],
            Query(alias="status", description="any of these; default: all but reported"),
        ] = [],  # noqa: B006
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0,
    ) -> WorklistOut:
        """Studies in reading order (earliest due first), filtered and paged."""
        now = utcnow()
        filters = {"modality": modality, "tier": tier, "status": status_}
        with sessions() as session:
            rows = service.reading_order(session, limit, offset, site=site_worklist(), **filters)
            total = service.count(session, **filters)
            shown = rows_out(session, rows)
            if views.due(caller.principal.username, "worklist", now):
                audit.record(session, caller.principal.username, "view_worklist", now)
                session.commit()
        return WorklistOut(
            notice=RESEARCH_DEMO_NOTICE,
            server_time=now,
            total=total,
            limit=limit,
            offset=offset,
            rows=shown,
        )

    @router.get(
        "/studies/{study_instance_uid}",
        response_model=StudyDetailOut,
        responses={404: ERRORS[404]},
        tags=["studies"],
    )
    def study(study_instance_uid: str, caller: Caller = authenticated) -> StudyDetailOut:
        """One study: every model's findings (with thresholds), result objects by kind with
        their export state per destination, and its change history; audited as a view."""
        now = utcnow()
        with sessions() as session:
            try:
                detail = study_detail(session, study_instance_uid, site_worklist())
            except WorklistError as error:
                raise _http_error(error) from None
            audit.record(
                session,
                caller.principal.username,
                "view_study",
                now,
                study_instance_uid=study_instance_uid,
            )
            session.commit()
        return detail

    def _act(action: Callable[[Session], object], study_instance_uid: str) -> WorklistRowOut:
        with sessions() as session:
            try:
                action(session)
                row = service.study_row(session, study_instance_uid, site_worklist())
                return rows_out(session, [row])[0]
            except WorklistError as error:
                raise _http_error(error) from None

    @router.post(
        "/studies/{study_instance_uid}/claim",
        response_model=WorklistRowOut,
        responses=ERRORS,
        tags=["studies"],
    )
    def claim(study_instance_uid: str, caller: Caller = authenticated) -> WorklistRowOut:
        """Start reading the study: it shows as in progress with your name."""
        username = caller.principal.username
        return _act(
            lambda s: service.claim(s, study_instance_uid, username, utcnow()), study_instance_uid
        )

    @router.post(
        "/studies/{study_instance_uid}/release",
        response_model=WorklistRowOut,
        responses=ERRORS,
        tags=["studies"],
    )
    def release(study_instance_uid: str, caller: Caller = authenticated) -> WorklistRowOut:
        """Give the study back to the worklist (an admin may release anyone's claim)."""
        principal = caller.principal
        return _act(
            lambda s: service.release(
                s, study_instance_uid, principal.username, utcnow(), force=principal.is_admin
            ),
            study_instance_uid,
        )

    @router.post(
        "/studies/{study_instance_uid}/complete",
        response_model=WorklistRowOut,
        responses={
            **ERRORS,
            409: {
                "model": ErrorOut,
                "description": "not claimed by you (claim it first; admins too) or already "
                "reported",
            },
        },
        tags=["studies"],
    )
    def complete(study_instance_uid: str, caller: Caller = authenticated) -> WorklistRowOut:
        """Mark the study reported by you; it leaves the worklist (409 unless you have
        claimed it, as on the page: an unclaimed study is claimed first)."""
        username = caller.principal.username
        return _act(
            lambda s: service.complete(s, study_instance_uid, username, utcnow()),
            study_instance_uid,
        )

    @router.post(
        "/studies/{study_instance_uid}/reopen",
        response_model=WorklistRowOut,
        responses={
            **ERRORS,
            403: {"model": ErrorOut, "description": "reported by someone else (admins may)"},
        },
        tags=["studies"],
    )
    def reopen(study_instance_uid: str, caller: Caller = authenticated) -> WorklistRowOut:
        """Put a reported study back on the worklist, in progress with your name, its report
        cleared (403 unless you reported it or are an admin; 409 if it is not reported)."""
        principal = caller.principal
        return _act(
            lambda s: service.reopen(
                s, study_instance_uid, principal.username, utcnow(), force=principal.is_admin
            ),
            study_instance_uid,
        )

    @router.post(
        "/studies/{study_instance_uid}/override",
        response_model=WorklistRowOut,
        responses=ERRORS,
        tags=["studies"],
    )
    def override(
        study_instance_uid: str, body: OverrideIn, caller: Caller = authenticated
    ) -> WorklistRowOut:
        """Set the study's priority tier by hand, with a reason (tier null clears it)."""
        username = caller.principal.username
        return _act(
            lambda s: service.override(
                s, study_instance_uid, username, body.tier, body.reason, utcnow(), site_worklist()
            ),
            study_instance_uid,
        )

    @router.get(
        "/results/{sop_instance_uid}",
        response_class=FileResponse,
        responses={200: {"content": {"application/dicom": {}}}, 404: ERRORS[404]},
        tags=["studies"],
    )
    def result(sop_instance_uid: str, caller: Caller = authenticated) -> FileResponse:
        """Download a result object the node wrote (SR, SC overlay) as a DICOM file."""
        with sessions() as session:
            found = session.execute(
                select(ResultObject.path, Study.study_instance_uid)
                .join(Study, Study.id == ResultObject.study_id)
                .where(ResultObject.sop_instance_uid == sop_instance_uid)
            ).first()
            path = Path(found.path) if found else None
            if path is None or not path.is_file():
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND, f"no result object {sop_instance_uid}"
                )
            audit.record(
                session,
                caller.principal.username,
                "view_result",
                utcnow(),
                study_instance_uid=found.study_instance_uid,
                detail=f"result {sop_instance_uid}",
            )
            session.commit()
        return FileResponse(
            path, media_type="application/dicom", filename=f"{sop_instance_uid}.dcm"
        )

    @router.get("/audit", response_model=list[AuditOut], tags=["audit"])
    def audit_log(
        caller: Caller = admin_required,
        actor: str | None = None,
        action: str | None = None,
        study_instance_uid: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0,
    ) -> list[AuditOut]:
        """Who saw or changed what, newest first (admins only)."""
        with sessions() as session:
            entries = audit.entries(
                session,
                limit=limit,
                offset=offset,
                actor=actor,
                action=action,
                study_instance_uid=study_instance_uid,
            )
            return [audit_out(entry) for entry in entries]

    return router
