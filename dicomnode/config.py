"""The node's configuration: ``conf/dicomnode.toml`` -> typed, validated settings."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dicomnode.tomlfile import ConfigError, key_line, load_toml

AE_TITLE_RULE = "an AE title is 1-16 characters of printable ASCII without backslash"


def _ae_title(value: str) -> str:
    """DICOM AE titles: 1-16 characters of the default repertoire, no backslash, not all
    spaces (leading spaces are allowed, as the standard's padding)."""
    if not value.strip(" "):
        found = "it is empty" if not value else "it is all spaces"
    elif len(value) > 16:
        found = f"{value!r} has {len(value)} characters"
    elif bad := sorted({c for c in value if not " " <= c <= "~" or c == "\\"}):
        found = f"{value!r} contains {', '.join(repr(c) for c in bad)}"
    else:
        return value
    raise PydanticCustomError(
        "ae_title", "{rule} ({found})", {"rule": AE_TITLE_RULE, "found": found}
    )


AETitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]
# Paths are TOML strings: the one type the strict settings convert.
ConfigPath = Annotated[Path, Strict(False)]


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


# A path that may be left out: empty ("") or absent is None.
OptionalConfigPath = Annotated[ConfigPath | None, BeforeValidator(_empty_is_none)]


class _Section(BaseModel):
    # Strict: a quoted number or boolean ("11999", "true") is an error, not converted;
    # an integer is still a valid float.
    model_config = ConfigDict(extra="forbid", strict=True)


class NodeSettings(_Section):
    ae_title: AETitle = "DICOMNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    # Also caps the node's open connections, at twice this (ingest/addresses.py). Restart-only:
    # the listeners' tables of peer addresses and pynetdicom's own limit are sized by it.
    max_associations: int = Field(default=16, ge=1)
    # So that one host cannot take every slot; over all listener processes, read per
    # association request and per accepted connection (twice as many may be open), so a
    # reload applies it to new associations and connections.
    max_associations_per_address: int = Field(default=16, ge=0, description="0 = unlimited")
    # Advertised to senders; a longer PDU closes the connection. 0 = no limit, which lets a
    # peer make the listener hold whatever PDU it announces (up to 4 GiB).
    max_pdu: int = Field(default=4 * 1024 * 1024, ge=0, description="0 = unlimited")
    require_known_peers: bool = False
    # Off by default, as dcmtk's storescp and Orthanc: senders configured with another
    # called AE title are still served.
    require_called_ae: bool = Field(
        default=False,
        description="reject associations whose called AE title is not ae_title",
    )
    # Larger C-STORE datasets are refused with 0xA700 (checked while the data arrive).
    max_instance_bytes: int = Field(default=1024**3, ge=1)
    # Four by default, also on two cores: one association per process keeps concurrent
    # senders from taking turns on one interpreter's lock (benchmarks/README.md).
    listeners: int = Field(
        default=4,
        ge=1,
        le=64,
        description="listener processes sharing the port; the least busy one accepts",
    )
    # The listener's pynetdicom timeouts, read as each connection is accepted (a reload
    # applies them to new connections; pynetdicom also hands them to established ones).
    # Longer for slow WAN links and modalities that pause between images. (No DIMSE timeout:
    # a wait for a DIMSE reply, which the node as Storage and Verification SCP never makes.)
    acse_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="a connection's whole association request must arrive within this",
    )
    # Also bounds a PDU that stalls halfway (the socket's timeout).
    network_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description="an association from which nothing arrives for this long is aborted",
    )


class StorageSettings(_Section):
    path: ConfigPath = Path("var/storage")
    # Below this much free space new instances are refused with 0xA700.
    min_free_bytes: int = Field(default=256 * 1024**2, ge=0)
    retention_days: float = Field(
        default=0,
        ge=0,
        description="delete reported, fully exported studies older than this; 0 = keep forever",
    )


class TLSSettings(_Section):
    """DICOM TLS for the listener (certificate, key, CA for client certificates)."""

    enabled: bool = False
    cert: ConfigPath = Path("conf/tls/node.pem")
    key: ConfigPath = Path("conf/tls/node.key")
    ca: OptionalConfigPath = None
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _ca_for_client_certs(self) -> TLSSettings:
        if self.enabled and self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert = true needs ca (the CA that signs clients)")
        return self


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/dicomnode.db"

    @field_validator("url")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError("url must start with sqlite:/// or postgresql+psycopg://")
        return valid_database_url(value)


def valid_database_url(url: str) -> str:
    """``url`` once SQLAlchemy can parse it and its port is one; else a ValueError that
    says what is wrong without the URL (it may hold a password)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        port = parsed.port
    except ValueError as exc:
        port_text = "invalid literal for int()" in str(exc)
        what = "its port is not a number" if port_text else "SQLAlchemy cannot parse it"
        raise ValueError(
            f"url is not a valid database URL: {what} "
            "(dialect+driver://user:password@host:port/database)"
        ) from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"url is not a valid database URL: port {port} is not 1-65535")
    if "@" in (parsed.host or ""):
        # user:p@ss@host reads as the password "p" on the host "ss@host": the rest of the
        # password would be shown wherever the host is.
        raise ValueError(
            "url is not a valid database URL: more than one '@' before the host; "
            "percent-encode an '@' in the user name or password as %40"
        )
    return url


class WebSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (the client's
    # address for the log-in throttle, https for Secure cookies and HSTS).
    trusted_proxies: list[str] = Field(
        default=["127.0.0.1"], description='addresses or networks, or ["*"] for any'
    )


class LoggingSettings(_Section):
    json_lines: bool = Field(
        default=False, alias="json", description="one JSON object per line instead of plain text"
    )


class AssemblySettings(_Section):
    quiet_seconds: float = Field(default=1.0, ge=0.0)


# The shortest ``[worker] lease_seconds``: a running job's lease is renewed every third of it
# (dicomnode.jobs.leases), and a renewal may wait seconds for SQLite's write lock or a slow
# database.
MIN_LEASE_SECONDS = 10.0


class WorkerSettings(_Section):
    count: int = Field(default=1, ge=0)
    providers: list[str] = ["CPUExecutionProvider"]
    lease_seconds: float = 60.0
    max_job_seconds: float = Field(
        default=1800.0,
        gt=0,
        description=(
            "a job running longer is thought hung: its lease is no longer renewed (one ERROR) "
            "and another worker takes it over when the lease runs out"
        ),
    )
    poll_seconds: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    # Jobs one worker process runs at once (threads sharing its warm model sessions).
    threads: int = Field(default=2, ge=1)
    # Threads that may run results and export jobs at once; 0 = all but one (all with one).
    background_threads: int = Field(default=0, ge=0)
    # Memory for analyses kept for their results job in the same process (0 = none kept).
    handover_mb: int = Field(default=256, ge=0)
    # A stand-alone "dicomnode worker" serves its own /metrics here; serve's workers do not.
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 = none")
    metrics_host: str = "127.0.0.1"

    @field_validator("lease_seconds")
    @classmethod
    def _renewable_lease(cls, value: float) -> float:
        if value < MIN_LEASE_SECONDS:
            raise PydanticCustomError(
                "lease_seconds",
                "lease_seconds = {value} is shorter than the minimum, {minimum} seconds: a running "
                "job's lease is renewed every third of it, and a renewal may wait seconds for "
                "the database (default 60: a dead worker's jobs are taken over within a minute)",
                {"value": f"{value:g}", "minimum": f"{MIN_LEASE_SECONDS:g}"},
            )
        return value


class InferenceSettings(_Section):
    """onnxruntime sessions: thread pools, batching across studies, IO binding."""

    intra_op_threads: int = Field(
        default=0, ge=0, description="0 = one on the CPU, onnxruntime's default on a device"
    )
    inter_op_threads: int = Field(default=0, ge=0, description="0 = onnxruntime's default")
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    batch_size: int = Field(default=8, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    io_binding: Literal["auto", "on", "off"] = "auto"
    # Batches of one model run at once; 0 = 2 on GPU providers, cores / intra-op threads on CPU.
    in_flight: int = Field(default=0, ge=0)
    # GPU batches joined in page-locked host memory; "off" = pageable.
    pinned_buffers: Literal["auto", "off"] = "auto"
    # IO-bound runs write outputs of a known shape into reused host buffers; "off" = onnxruntime
    # allocates them on the device and they are copied back after the run.
    bound_outputs: Literal["auto", "off"] = "auto"


class ModelsSettings(_Section):
    folders: list[ConfigPath] = [Path("models"), Path("conf/models")]


class Destination(_Section):
    name: str
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    # Result kinds sent to this destination (sr, overlay, seg, gsps, derived, kos); empty = all.
    outputs: list[Literal["sr", "overlay", "seg", "gsps", "derived", "kos"]] = []
    # Longest wait for the destination's answer to the association request, to each C-STORE
    # and for any network data; a destination that stays silent longer fails the export,
    # which is retried with backoff.
    timeout_seconds: float = Field(default=30.0, gt=0)
    # IHE IOCM: after late images superseded result objects this destination received, send
    # it a rejection note (KOS titled 113001 "Rejected for Quality Reasons") naming them, once
    # their superseding objects are there. Off by default: a PACS without IOCM support shows
    # the note as one more key object and keeps showing the old objects.
    reject_superseded: bool = False
    # DICOM TLS to this destination (TLS 1.2 or later); the files are checked by
    # check-config, as [tls]'s are.
    tls: bool = False
    tls_ca: OptionalConfigPath = None  # none: the system's trust store
    tls_cert: OptionalConfigPath = None
    tls_key: OptionalConfigPath = None
    tls_verify_hostname: bool = True

    @model_validator(mode="after")
    def _tls_keys(self) -> Destination:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (
                ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            )
            raise ValueError(
                f"{given} needs {missing}: the node's client certificate and its private key "
                "go together (set both, or neither)"
            )
        if not self.tls and (self.tls_ca or self.tls_cert):
            raise ValueError(
                "tls_ca, tls_cert and tls_key apply only with tls = true: set tls = true "
                "(or remove them; exports would otherwise go without TLS)"
            )
        return self


class Peer(_Section):
    ae_title: AETitle
    host: str = ""

    @field_validator("host")
    @classmethod
    def _ip_or_empty(cls, value: str) -> str:
        if value:
            ipaddress.ip_address(value)
        return value


TierName = Literal["stat", "critical", "urgent", "routine"]


class MaxWaitMinutes(_Section):
    """Longest wait per tier; a higher tier may not wait longer than a lower one."""

    stat: float = Field(default=15.0, ge=0)
    critical: float = Field(default=30.0, ge=0)
    urgent: float = Field(default=240.0, ge=0)
    routine: float = Field(default=1440.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> MaxWaitMinutes:
        if not self.stat <= self.critical <= self.urgent <= self.routine:
            raise ValueError("max waits must not decrease from stat to critical, urgent, routine")
        return self


class WorklistSettings(_Section):
    max_wait_minutes: MaxWaitMinutes = MaxWaitMinutes()
    stat_priorities: list[str] = ["STAT"]
    urgent_priorities: list[str] = ["HIGH"]
    urgent_locations: list[str] = []
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = {}
    critical_findings: list[str] = []
    non_critical_findings: list[str] = []
    full_head_start_probability: float = Field(default=0.0, ge=0, le=1)
    min_head_start_share: float = Field(default=0.25, ge=0, le=1)


class NotifySettings(_Section):
    webhook_enabled: bool = False
    webhook_url: str = ""
    webhook_headers: dict[str, str] = {}
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    hl7_enabled: bool = False
    hl7_host: str = ""
    hl7_port: Port = 2575
    hl7_timeout_seconds: float = Field(default=10.0, gt=0)
    hl7_sending_application: str = "DICOMNODE"
    hl7_sending_facility: str = ""
    hl7_receiving_application: str = ""
    hl7_receiving_facility: str = ""
    max_attempts: int = Field(default=10, ge=1)

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("webhook_url must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _endpoints_when_enabled(self) -> NotifySettings:
        if self.webhook_enabled and not self.webhook_url:
            raise ValueError("webhook_enabled = true needs a webhook_url")
        if self.hl7_enabled and not self.hl7_host:
            raise ValueError("hl7_enabled = true needs an hl7_host")
        return self


class Settings(_Section):
    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    web: WebSettings = WebSettings()
    assembly: AssemblySettings = AssemblySettings()
    worker: WorkerSettings = WorkerSettings()
    inference: InferenceSettings = InferenceSettings()
    models: ModelsSettings = ModelsSettings()
    worklist: WorklistSettings = WorklistSettings()
    notify: NotifySettings = NotifySettings()
    destinations: list[Destination] = []
    peers: list[Peer] = []
    tls: TLSSettings = TLSSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    logging: LoggingSettings = LoggingSettings()

    # The file these settings came from; relative paths resolve against its folder's parent
    # when the file lives in conf/, else against its own folder.
    source: ConfigPath | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _peers_to_know(self) -> Settings:
        if self.node.require_known_peers and not self.peers:
            raise ValueError(
                "[node] require_known_peers is true but no [[peers]] are listed: every "
                "association would be rejected"
            )
        return self

    @property
    def base_dir(self) -> Path:
        if self.source is None:
            return Path.cwd()
        folder = self.source.resolve().parent
        return folder.parent if folder.name == "conf" else folder

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def storage_path(self) -> Path:
        return self.resolve(self.storage.path)

    @property
    def database_url(self) -> str:
        url = self.database.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.resolve(Path(url[len(prefix) :])))
        return url

    @property
    def model_folders(self) -> list[Path]:
        return [self.resolve(folder) for folder in self.models.folders]


def changed_settings(old: Settings, new: Settings, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (a section, or ``section.key``) differ between ``old`` and ``new``."""
    changed = []
    for name in names:
        section, _, key = name.partition(".")
        before, after = getattr(old, section), getattr(new, section)
        if key:
            before, after = getattr(before, key), getattr(after, key)
        if before != after:
            changed.append(name)
    return changed


def restart_changes(
    running: Settings, previous: Settings, new: Settings, names: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """For a reload, of the restart-only ``names``: those ``new`` sets apart from what the
    process ``running`` runs (they wait for a restart), and those ``previous`` set apart but
    ``new`` sets back to the running value (no restart is pending for them any more)."""
    pending = changed_settings(running, new, names)
    undone = [name for name in changed_settings(running, previous, names) if name not in pending]
    return pending, undone


def _missing_file_hint(path: Path | str) -> str:
    """How to name the configuration file, when ``path`` is not there."""
    named = os.environ.get("DICOMNODE_CONFIG")
    if named and Path(named).absolute() == Path(path).absolute():
        # The commands' default when no --config is given: "set DICOMNODE_CONFIG" would send
        # the admin to a variable that is set already, to the wrong path.
        return (
            "(the environment variable DICOMNODE_CONFIG names this path: correct or unset it, "
            "or give --config PATH)"
        )
    # Most often a command run from another folder than the one conf/ is in; but the path
    # may be one given with --config and misspelt: the loader cannot tell, so the hint fits
    # both.
    return "(check the path, or give --config PATH or set DICOMNODE_CONFIG)"


def load_settings(path: Path | str) -> Settings:
    """Load and validate the node's TOML configuration file."""
    try:
        settings = load_toml(path, Settings)
    except ConfigError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):
            raise
        raise ConfigError(path, f"{exc.reason} {_missing_file_hint(path)}") from exc.__cause__
    settings.source = Path(path).resolve()
    names = [d.name for d in settings.destinations]
    for index, name in enumerate(names):
        if name in names[:index]:
            line = key_line(Path(path).read_text(encoding="utf-8"), ("destinations", index, "name"))
            raise ConfigError(
                path,
                f"destination names must be unique: {name!r} is used twice",
                key="destinations.name",
                line=line,
            )
    return settings
