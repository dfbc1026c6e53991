"""The radiologists' web side: worklist page, REST API (OpenAPI at /docs), health."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import RESEARCH_DEMO_NOTICE, __version__
from dicomnode.db.session import utcnow
from dicomnode.worklist.service import reading_order

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


class FindingOut(BaseModel):
    code: str
    scheme: str
    meaning: str
    probability: float
    present: bool
    critical: bool
    model: str


class ResultOut(BaseModel):
    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    model: str


class WorklistRowOut(BaseModel):
    study_instance_uid: str
    accession_number: str
    patient_id: str
    modality: str
    priority: str
    ups_priority: str
    score: float
    reason: str
    findings: list[FindingOut]
    results: list[ResultOut]
    received_at: datetime
    status: str
    analysis_status: str


class WorklistOut(BaseModel):
    notice: str
    rows: list[WorklistRowOut]


def create_app(sessions: sessionmaker[Session]) -> FastAPI:
    """The FastAPI application over the node's database."""
    app = FastAPI(
        title="dicomnode",
        version=__version__,
        description=f"AI triage worklist. {RESEARCH_DEMO_NOTICE}.",
    )

    def rows(limit: int, offset: int) -> list[WorklistRowOut]:
        with sessions() as session:
            return [
                WorklistRowOut.model_validate(row, from_attributes=True)
                for row in reading_order(session, limit=limit, offset=offset)
            ]

    @app.get("/api/worklist", response_model=WorklistOut)
    def api_worklist(
        limit: int = Query(200, ge=1, le=1000), offset: int = Query(0, ge=0)
    ) -> WorklistOut:
        """Unreported studies in reading order (critical first, then by arrival)."""
        return WorklistOut(notice=RESEARCH_DEMO_NOTICE, rows=rows(limit, offset))

    @app.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
    def worklist_page(request: Request) -> HTMLResponse:
        now = utcnow()
        return TEMPLATES.TemplateResponse(
            request,
            "worklist.html",
            {
                "rows": rows(500, 0),
                "now": now,
                "notice": RESEARCH_DEMO_NOTICE,
                "version": __version__,
            },
        )

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
