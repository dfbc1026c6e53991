"""The worklist audit log: who saw or changed what, when and why."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.models import AuditEntry


def record(
    session: Session,
    actor: str,
    action: str,
    now: datetime,
    *,
    study_instance_uid: str = "",
    detail: str = "",
    reason: str = "",
) -> AuditEntry:
    """Add an audit entry (the caller commits, together with the change it describes)."""
    entry = AuditEntry(
        at=now,
        actor=actor,
        action=action,
        study_instance_uid=study_instance_uid,
        detail=detail,
        reason=reason,
    )
    session.add(entry)
    return entry


def entries(
    session: Session,
    *,
    limit: int = 100,
    offset: int = 0,
    actor: str | None = None,
    action: str | None = None,
    study_instance_uid: str | None = None,
) -> list[AuditEntry]:
    """Audit entries, newest first, optionally for one actor, action or study."""
    query = select(AuditEntry)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if action:
        query = query.where(AuditEntry.action == action)
    if study_instance_uid:
        query = query.where(AuditEntry.study_instance_uid == study_instance_uid)
    query = query.order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(query))
