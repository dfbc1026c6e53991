"""Index a stored instance: study, series and instance rows in the database.

A series row belongs to one study: an instance is filed under the series of its own Study
Instance UID, where its file lies (``<storage>/<StudyUID>/<SeriesUID>/``). A sender that
reuses a Series Instance UID in another study (against PS3.3) gets a second series row of
that study, logged; the instance was acknowledged before its rows are written, so it can no
longer be refused, and analysing it with another patient's study would be worse.

An image that arrives after a reader looked at its study (claimed or reported) is a new image
no report covers: a reported study goes back on the worklist unread, a claimed one keeps its
reader, and either is flagged with the count until it is reported again
(:mod:`dicomnode.worklist.policy`), audited as the node's. Only images count
(:attr:`InstanceFacts.image`): a report SR the PACS sends back, a dose SR, a KOS, presentation
state, SEG or PDF is stored and indexed, and re-runs the analysis like any instance, but leaves
the study's reading status and flag as they are.

Several studies' rows are updated in one transaction (a batch): in study id order, the order
in which the assembly and the worklist lock them, so that two transactions never wait on each
other's studies (a deadlock on PostgreSQL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, Integer, bindparam, case, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomnode.config import WorklistSettings
from dicomnode.db.models import Instance, Series, Study
from dicomnode.ingest.arrival import Arrival, InstanceFacts
from dicomnode.ingest.assembly import quiet_period_end
from dicomnode.worklist.policy import NEW_IMAGE_STATUSES, UNREAD_AGAIN
from dicomnode.worklist.service import note_new_images, reprioritise

log = logging.getLogger("dicomnode.ingest")


def _new_study(
    session: Session, facts: InstanceFacts, now: datetime, worklist: WorklistSettings
) -> int:
    study = Study(
        study_instance_uid=facts.study_instance_uid,
        patient_id=facts.patient_id,
        patient_name=facts.patient_name,
        accession_number=facts.accession_number,
        modality=facts.modality,
        study_description=facts.study_description,
        received_at=now,
        last_instance_at=now,
        ready_at=now,
        due_at=now,  # NOT NULL at the flush below; reprioritise sets the real one
    )
    session.add(study)
    session.flush()
    # On the worklist from the first instance on, in arrival order until analysed.
    reprioritise(session, study, now, worklist)
    return study.id


def _new_series(session: Session, study_id: int, facts: InstanceFacts) -> int:
    """A series row of the instance's own study; a sender's reuse of its Series Instance UID
    in another study is logged (UIDs only) and kept apart."""
    _warn_if_reused(session, study_id, facts)
    series = Series(
        study_id=study_id,
        series_instance_uid=facts.series_instance_uid,
        modality=facts.modality,
        body_part=facts.body_part,
        view_position=facts.view_position,
        series_description=facts.series_description,
    )
    session.add(series)
    session.flush()
    return series.id


# Built once: an instance of a known series runs these three statements and the commit,
# on the session's connection (Core, no ORM unit of work); building and caching statements
# per call cost more than the database work.
_STUDIES, _SERIES, _INSTANCES = Study.__table__, Series.__table__, Instance.__table__
# A series is one study's: the same Series Instance UID in another study (a sender that
# reused it, against PS3.3 C.7.3.1) is another series, never this one.
_KNOWN_IDS = (
    select(_STUDIES.c.id, _SERIES.c.id)
    .select_from(
        _STUDIES.outerjoin(
            _SERIES,
            (_SERIES.c.series_instance_uid == bindparam("series_uid"))
            & (_SERIES.c.study_id == _STUDIES.c.id),
        )
    )
    .where(_STUDIES.c.study_instance_uid == bindparam("study_uid"))
)
_OTHER_STUDIES = (
    select(_STUDIES.c.study_instance_uid)
    .join(_SERIES, _SERIES.c.study_id == _STUDIES.c.id)
    .where(
        _SERIES.c.series_instance_uid == bindparam("series_uid"),
        _SERIES.c.study_id != bindparam("study_id"),
    )
)
_INSTANCE_ID = select(_INSTANCES.c.id).where(_INSTANCES.c.sop_instance_uid == bindparam("sop_uid"))
_ADD_INSTANCE = insert(_INSTANCES)
# New images (worklist.policy): the study was claimed or reported, or has new images already
# (read again after a report). The CASEs read the row as it is when the update runs, so that a
# claim or report committed meanwhile counts (a status read before would be stale). "images":
# how many of the arrivals are images; other instances neither reopen nor flag a study.
_IMAGES_ARRIVED = bindparam("images", type_=Integer()) > 0
_NEW_IMAGES = _STUDIES.c.reading_status.in_(NEW_IMAGE_STATUSES) | (_STUDIES.c.new_images > 0)
_TOUCH_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("study_id"))
    .values(
        last_instance_at=bindparam("now"),
        ready_at=bindparam("ready_at"),
        received_generation=_STUDIES.c.received_generation + bindparam("arrived"),
        analysis_status=case(
            (_STUDIES.c.analysis_status.in_(("analysed", "failed")), "receiving"),
            else_=_STUDIES.c.analysis_status,
        ),
        reading_status=case(
            (_IMAGES_ARRIVED & (_STUDIES.c.reading_status == "reported"), UNREAD_AGAIN),
            else_=_STUDIES.c.reading_status,
        ),
        new_images=case(
            (_IMAGES_ARRIVED & _NEW_IMAGES, _STUDIES.c.new_images + bindparam("images")),
            else_=_STUDIES.c.new_images,
        ),
        new_images_at=case(
            (
                _IMAGES_ARRIVED & _NEW_IMAGES & _STUDIES.c.new_images_at.is_(None),
                bindparam("first", type_=_STUDIES.c.new_images_at.type),
            ),
            else_=_STUDIES.c.new_images_at,
        ),
    )
    .returning(_STUDIES.c.new_images)
)


def _known_ids(session: Session, facts: InstanceFacts) -> tuple[int | None, int | None]:
    """The ids of the instance's study and of its series in that study, where they exist:
    one query (a study not yet known has no series)."""
    uids = {"study_uid": facts.study_instance_uid, "series_uid": facts.series_instance_uid}
    row = session.connection().execute(_KNOWN_IDS, uids).first()
    if row is None:
        return None, None
    return row[0], row[1]


def _warn_if_reused(session: Session, study_id: int, facts: InstanceFacts) -> None:
    """Log a Series Instance UID that another study already has.

    The instance was acknowledged before its rows are written (the file is durable), so it
    can no longer be refused: it is indexed under its own study, where its file lies
    (``<storage>/<StudyUID>/<SeriesUID>/``), and analysed with that study only. One query
    per new series, none per instance."""
    others = (
        session.connection()
        .execute(_OTHER_STUDIES, {"series_uid": facts.series_instance_uid, "study_id": study_id})
        .scalars()
        .all()
    )
    if others:
        log.warning(
            "series %s of study %s (instance %s) reuses the Series Instance UID of a series "
            "of study %s: the sender broke UID uniqueness; indexed apart as a series of "
            "study %s",
            facts.series_instance_uid,
            facts.study_instance_uid,
            facts.sop_instance_uid,
            ", ".join(sorted(others)),
            facts.study_instance_uid,
        )


@dataclass
class _Touched:
    """A study's arrivals in a batch: who sent the first, the last arrival, how many, how many
    of them images and the first image's arrival (None when no image came)."""

    sender: str
    last: datetime
    count: int = 0
    images: int = 0
    first_image: datetime | None = None

    @classmethod
    def of(cls, arrivals: Sequence[Arrival]) -> _Touched:
        touched = cls(arrivals[0].calling_ae, arrivals[0].received_at)
        touched.add(arrivals)
        return touched

    def add(self, arrivals: Sequence[Arrival]) -> None:
        self.last = max(self.last, *(arrival.received_at for arrival in arrivals))
        self.count += len(arrivals)
        for arrival in arrivals:
            if arrival.facts.image:
                self.images += 1
                if self.first_image is None or arrival.received_at < self.first_image:
                    self.first_image = arrival.received_at


def add_rows(
    session: Session,
    arrivals: Sequence[Arrival],
    quiet_seconds: float,
    worklist: WorklistSettings,
) -> None:
    """Add the rows of ``arrivals`` (and their studies' and series' where new) and push
    each study's assembly deadline past its last arrival, without committing.

    Per series one lookup and one multi-row insert, per study one update. IntegrityError
    if an instance is known, or a concurrent transaction created the same study or series.
    """
    by_series: dict[tuple[str, str], list[Arrival]] = {}
    for arrival in arrivals:
        key = (arrival.facts.study_instance_uid, arrival.facts.series_instance_uid)
        by_series.setdefault(key, []).append(arrival)
    touched: dict[int, _Touched] = {}
    new_studies: set[int] = set()
    connection = session.connection()
    for group in by_series.values():
        first = group[0]
        study_id, series_id = _known_ids(session, first.facts)
        if study_id is None:
            study_id = _new_study(session, first.facts, first.received_at, worklist)
            new_studies.add(study_id)
        if series_id is None:
            series_id = _new_series(session, study_id, first.facts)
        connection.execute(_ADD_INSTANCE, [arrival.row(series_id) for arrival in group])
        # The node's own results routed back by a PACS start no new analysis of a study it
        # knows (which would write and send every result again); a study made of nothing else
        # is analysed once, like any new study (no model selects them).
        arrived = [a for a in group if study_id in new_studies or not a.facts.own_result]
        if arrived:
            if study_id in touched:
                touched[study_id].add(arrived)
            else:
                touched[study_id] = _Touched.of(arrived)
    # In study id order, as the assembly and the worklist lock studies: two batches touching
    # the same studies then never wait on each other (PostgreSQL row locks, no deadlock).
    for study_id in sorted(touched):
        study = touched[study_id]
        new_images = connection.execute(
            _TOUCH_STUDY,
            {
                "study_id": study_id,
                "now": study.last,
                "ready_at": quiet_period_end(study.last, quiet_seconds),
                "arrived": study.count,
                "images": study.images,
                "first": study.first_image,
            },
        ).scalar_one()
        if study.images and new_images and study_id not in new_studies:
            note_new_images(
                session,
                study_id,
                study.images,
                study.last,
                worklist,
                study.sender,
            )


def index_instance(
    session: Session,
    facts: InstanceFacts,
    *,
    path: str,
    size_bytes: int,
    transfer_syntax_uid: str,
    calling_ae: str,
    now: datetime,
    quiet_seconds: float,
    worklist: WorklistSettings,
) -> bool:
    """Add one instance's rows (:func:`add_rows`) and commit; False if it was known.

    Safe to call again for the same instance (a resent C-STORE, the spool re-index).
    """
    arrival = Arrival(facts, path, size_bytes, transfer_syntax_uid, calling_ae, now)
    return index_arrival(session, arrival, quiet_seconds, worklist)


def index_arrival(
    session: Session,
    arrival: Arrival,
    quiet_seconds: float,
    worklist: WorklistSettings,
) -> bool:
    """:func:`index_instance` for an :class:`Arrival`."""
    for attempt in range(3):
        try:
            add_rows(session, [arrival], quiet_seconds, worklist)
            session.commit()
            return True
        except IntegrityError:
            # The instance is known (a retried C-STORE), or another association created the
            # same study or series concurrently: then try again.
            session.rollback()
            known = (
                session.connection()
                .execute(_INSTANCE_ID, {"sop_uid": arrival.facts.sop_instance_uid})
                .scalar()
            )
            session.rollback()
            if known is not None:
                return False
            if attempt == 2:
                raise
    return False


_REPOINT_INSTANCE = (
    update(_INSTANCES)
    .where(_INSTANCES.c.sop_instance_uid == bindparam("sop_uid"))
    .values(path=bindparam("found_path"), size_bytes=bindparam("found_size"))
)
_FORGET_INSTANCE = delete(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == bindparam("sop_uid"))


def indexed_copy_gone(indexed_path: str) -> bool:
    """Whether a known instance's indexed file is no longer there (lost): a copy of it that
    comes under another study or series then replaces it (:func:`forget_instance`) instead of
    being removed as a second copy."""
    return not Path(indexed_path).is_file()


def repoint_instances(connection: Connection, moves: Iterable[tuple[str, str, int]]) -> None:
    """Point each known instance's row ``(sop_instance_uid, path, size)`` at its copy at
    ``path``, at the same place in the storage's layout under another storage root (the
    caller commits)."""
    params = [{"sop_uid": uid, "found_path": path, "found_size": size} for uid, path, size in moves]
    if params:
        connection.execute(_REPOINT_INSTANCE, params)


def forget_instance(connection: Connection, sop_instance_uid: str) -> None:
    """Delete the row of an instance whose file is lost, so that the copy that came again
    (under another study or series: the study corrected at the PACS) is indexed as what it
    says it is (the caller commits). Nothing refers to instance rows."""
    connection.execute(_FORGET_INSTANCE, {"sop_uid": sop_instance_uid})


def drop_second_copy(sop_instance_uid: str, path: str) -> None:
    """Remove the copy of a known instance that came again under another study or series
    (a study merged or corrected at the PACS and sent again): the first copy is kept, as for
    any duplicate (the sender was answered success), and this one would lie unindexed."""
    Path(path).unlink(missing_ok=True)
    log.warning(
        "instance %s received again under another study or series; the first copy is kept "
        "and this one removed (%s)",
        sop_instance_uid,
        path,
    )
