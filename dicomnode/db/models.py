"""Tables: studies, series, instances, jobs, findings, results, audit log."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


UID = String(64)
# Every table's __table_args__ ends with this: on SQLite, INTEGER PRIMARY KEY AUTOINCREMENT,
# so that the id of a deleted row (retention, a superseded result, a revoked token) is never
# given to a new one; a job or audit entry id once shown or logged names that row for good.
# PostgreSQL sequences never hand an id out twice anyway.
AUTOINCREMENT = {"sqlite_autoincrement": True}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_instance_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Assembly: the study is ready when ready_at has passed and received_generation is
    # ahead of queued_generation (each stored instance bumps received_generation).
    ready_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_generation: Mapped[int] = mapped_column(Integer, default=0)
    queued_generation: Mapped[int] = mapped_column(Integer, default=0)
    # receiving | queued | analysing | analysed | failed
    analysis_status: Mapped[str] = mapped_column(String(16), default="receiving")
    analysis_error: Mapped[str] = mapped_column(Text, default="")
    # Finding models that would have read the study's images in its latest analysis but did
    # not run (their ONNX file cannot be loaded), names separated by ", " (worklist.policy).
    models_not_run: Mapped[str] = mapped_column(Text, default="", server_default="")
    # The images its latest analysis was to read (pixel data, not this node's own) and how
    # many of them could not be read (left out; the reason says so, worklist.policy).
    image_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    unreadable_image_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Worklist: tier rank (0 = read first), score within the tier, reason, UPS priority.
    tier: Mapped[str] = mapped_column(String(16), default="routine")
    tier_rank: Mapped[int] = mapped_column(Integer, default=3)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str] = mapped_column(Text, default="")
    ups_priority: Mapped[str] = mapped_column(String(8), default="MEDIUM")
    # Reading order: earliest due first (see worklist.policy).
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # waiting | ready | in_progress | reported
    reading_status: Mapped[str] = mapped_column(String(16), default="waiting")
    # Who is reading the study (in_progress) and who reported it (its latest report, kept
    # while new images after it are read), with when.
    claimed_by: Mapped[str] = mapped_column(String(64), default="", server_default="")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reported_by: Mapped[str] = mapped_column(String(64), default="", server_default="")
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Instances that arrived after a reader looked at the study (claimed or reported) and that
    # no report covers yet, and when the first of them arrived (worklist.policy); 0 and None
    # once it is reported again.
    new_images: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    new_images_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Manual priority override by a radiologist ("" = none): tier, why, who, when.
    override_tier: Mapped[str] = mapped_column(String(16), default="", server_default="")
    override_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    override_by: Mapped[str] = mapped_column(String(64), default="", server_default="")
    override_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all")
    findings: Mapped[list[FindingRow]] = relationship(back_populates="study", cascade="all")
    results: Mapped[list[ResultObject]] = relationship(back_populates="study", cascade="all")

    __table_args__ = (
        Index("ix_studies_reading_order", "reading_status", "due_at"),
        Index("ix_studies_assembly", "analysis_status", "ready_at"),
        # The open worklist in reading order: a partial index, so that 100,000 reported
        # studies cost nothing and LIMIT stops early instead of sorting.
        Index(
            "ix_studies_open_due",
            "due_at",
            "id",
            sqlite_where=text("reading_status != 'reported'"),
            postgresql_where=text("reading_status != 'reported'"),
        ),
        # Filtered worklists (tier, modality, both): each filter reads its rows in due order
        # and counts them from the index alone, whatever the planner knows about the data.
        *(
            Index(
                f"ix_studies_open_{'_'.join(columns)}",
                *columns,
                "due_at",
                sqlite_where=text("reading_status != 'reported'"),
                postgresql_where=text("reading_status != 'reported'"),
            )
            for columns in (("tier",), ("modality",), ("tier", "modality"))
        ),
        AUTOINCREMENT,
    )


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (
        # A Series Instance UID is unique per study here, not over the whole database: a
        # sender that reuses one in another study (against PS3.3) gets a series of that
        # study, not its images filed under the first one (migration 0004). The UID leads,
        # so that the index also serves a lookup by the UID alone.
        UniqueConstraint("series_instance_uid", "study_id", name="uq_series_uid_study"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (AUTOINCREMENT,)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """A durable unit of work with a lease: analyse a study (up to its priority), write its
    results, export one result, or send a critical-result notification."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # notify | analyse | results | export
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    # queued | leased | done | dead
    state: Mapped[str] = mapped_column(String(8), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_jobs_claim", "state", "run_after"), AUTOINCREMENT)


class FindingRow(Base):
    """One label's outcome of one model on one study (the highest probability over images)."""

    __tablename__ = "findings"
    __table_args__ = (AUTOINCREMENT,)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    code_value: Mapped[str] = mapped_column(String(64))
    code_scheme: Mapped[str] = mapped_column(String(16))
    code_meaning: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    critical: Mapped[bool] = mapped_column(default=False)

    study: Mapped[Study] = relationship(back_populates="findings")


def _own_sop_instance_uid(context: DefaultExecutionContext) -> str:
    return context.get_current_parameters()["sop_instance_uid"]


class ResultObject(Base):
    """A DICOM object the node wrote (SR, SC overlay, ...), kept on disk for export."""

    __tablename__ = "results"
    __table_args__ = (AUTOINCREMENT,)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr | overlay
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    # The UID the object was first made with: its own (the default), or for a later version
    # whose content changed (dicomnode.results.versions.revision_uid) the first version's, by which
    # a results job made again finds it (migration 0006). The server default only lets SQLite
    # add the column.
    first_sop_instance_uid: Mapped[str] = mapped_column(
        UID, default=_own_sop_instance_uid, server_default=""
    )
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # SHA-256 of what the object was made from (dicomnode.results.inputs; migration 0008): a
    # results job that builds it again from the same inputs keeps it. '' where unknown (rows
    # from before 0008): the contents are compared.
    inputs_digest: Mapped[str] = mapped_column(String(64), default="", server_default="")

    study: Mapped[Study] = relationship(back_populates="results")


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (AUTOINCREMENT,)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str] = mapped_column(UID, default="", index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    # Why (a manual override's reason); what is in detail.
    reason: Mapped[str] = mapped_column(Text, default="", server_default="")


class NodeFact(Base):
    """What the node's processes on every host share besides the jobs
    (:mod:`dicomnode.nodestate`): the storage folder's id, the model cards serve runs."""

    __tablename__ = "node_facts"
    __table_args__ = (AUTOINCREMENT,)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class User(Base):
    """A local web user: radiologist or admin, with an Argon2id password hash."""

    __tablename__ = "users"
    __table_args__ = (AUTOINCREMENT,)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # radiologist | admin
    password_hash: Mapped[str] = mapped_column(String(256))
    disabled: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    """An opaque bearer or session token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (AUTOINCREMENT,)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # api | session
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    user: Mapped[User] = relationship()
