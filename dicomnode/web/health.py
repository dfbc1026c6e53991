"""Readiness and Prometheus metrics endpoints (no log-in: for probes and scrapers)."""

from __future__ import annotations

import os
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.ingest.spool import free_bytes
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.sessions import onnx_problem


def no_free_inodes(path: os.PathLike[str] | str) -> bool:
    """True when the file system holding ``path`` has inodes and none is free for the node (a
    file system that reports no inode count at all, e.g. btrfs, has no such limit)."""
    stats = os.statvfs(path)
    return stats.f_files > 0 and stats.f_favail == 0


def readiness(
    sessions: sessionmaker[Session],
    settings: Settings,
    cards: list[ModelCard],
    listening: Callable[[], bool] | None = None,
) -> dict[str, str]:
    """Each check's outcome: 'ok' or the reason it failed (``listening``: whether every DICOM
    listener has started and runs, where the web server knows)."""
    checks: dict[str, str] = {}
    if listening is not None:
        checks["dicom"] = "ok" if listening() else "DICOM listeners not (all) listening"
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    storage = settings.storage_path
    if not storage.is_dir():
        checks["storage"] = "storage folder missing"
    elif not os.access(storage, os.W_OK):
        checks["storage"] = "storage folder not writable"
    elif (free := free_bytes(storage)) < settings.storage.min_free_bytes:
        # Every instance is refused (0xA700) until space is freed.
        checks["storage"] = (
            f"below the free-space watermark: {free // 2**20} MiB free, [storage] "
            f"min_free_bytes {settings.storage.min_free_bytes // 2**20} MiB"
        )
    elif no_free_inodes(storage):
        # No new file can be made: every instance fails to spool.
        checks["storage"] = "no free inodes on the storage file system"
    else:
        checks["storage"] = "ok"
    # An ensemble card has no ONNX file of its own (its members do).
    unusable = {c.model.name: onnx_problem(c) for c in cards if c.model.onnx}
    unusable = {name: problem for name, problem in unusable.items() if problem}
    if not cards:
        checks["models"] = "no model cards found"
    elif unusable:
        checks["models"] = "ONNX file unusable: " + "; ".join(unusable.values())
    else:
        checks["models"] = "ok: " + ", ".join(f"{c.model.name} {c.model.version}" for c in cards)
    return checks


def health_router(
    sessions: sessionmaker[Session],
    current: Callable[[], tuple[Settings, list[ModelCard]]],
    listening: Callable[[], bool] | None = None,
) -> APIRouter:
    """``/readyz`` and ``/metrics`` over the node's current settings and model cards (and
    its DICOM listeners, with ``listening``)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        checks = readiness(sessions, *current(), listening)
        ready = all(value.startswith("ok") for value in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @router.get("/metrics")
    def metrics() -> Response:
        from dicomnode.metrics import CONTENT_TYPE_LATEST, exposition

        return Response(exposition(sessions), media_type=CONTENT_TYPE_LATEST)

    return router
