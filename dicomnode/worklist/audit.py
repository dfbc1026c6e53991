"""The worklist audit log: who saw or changed what, when and why."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.models import AuditEntry

# The actor of what the node itself does to a study (new images after a report): no user
# name can be this (users.USERNAME has no parentheses).
NODE = "(node)"


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


class ViewThrottle:
    """Decides when a repeated view is worth a new audit row.

    The page polls the worklist every few seconds; one "viewed the worklist" row per user and
    interval says who saw it without writing a row per poll. The same for a study's image
    previews (a list and a dozen PNGs per page load: one row per user, study and interval).
    Views of a study's page or details and of a result object are always recorded.
    """

    # Remembered views beyond which those older than the interval are forgotten (one per
    # user, and per user and study whose images were seen).
    PRUNE_AT = 4096

    def __init__(self, interval: timedelta = timedelta(minutes=5)) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], datetime] = {}
        self._lock = threading.Lock()

    def due(self, actor: str, what: str, now: datetime) -> bool:
        """True when ``actor`` viewing ``what`` now should be recorded (and remembers it)."""
        key = (actor, what)
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                return False
            if len(self._last) >= self.PRUNE_AT:
                self._last = {
                    seen: at for seen, at in self._last.items() if now - at < self.interval
                }
            self._last[key] = now
            return True
