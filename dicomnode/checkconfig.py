"""Full configuration check: the main file, every model card, every path and ONNX file (each
loaded: a truncated or corrupt one is refused as a missing one is)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dicomnode.config import Settings, load_settings
from dicomnode.db.session import sqlite_file
from dicomnode.ingest.spool import existing_parent
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline.sessions import onnx_problem
from dicomnode.tls import destination_context
from dicomnode.tomlfile import ConfigError, ConfigErrors, key_line


def _line(settings: Settings, loc: tuple[str | int, ...]) -> int | None:
    if settings.source is None:
        return None
    return key_line(settings.source.read_text(encoding="utf-8"), loc)


def _writable_dir(path: Path) -> str:
    """Why ``path`` cannot be a writable folder (made on first use), or '' when it can."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"no existing parent folder for {path}"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    if probe != path:
        # Writable by its mode is not enough: /proc or /sys say so to root, then refuse every
        # folder (the listeners died on the first C-STORE). Made and removed at once: the
        # only way to know short of making the folders, which check-config leaves to serve.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dicomnode-check-", dir=probe))
        except OSError as exc:
            return f"cannot create {path}: {exc.strerror or exc}"
    return ""


def _problem(settings: Settings, reason: str, *key: str | int) -> ConfigError:
    """A problem with the main file's setting ``key`` (its table, the item of a list of
    tables, and name), at its line."""
    return ConfigError(
        settings.source or Path("<settings>"),
        reason,
        key=".".join(str(part) for part in key),
        line=_line(settings, key),
    )


def check_paths(settings: Settings) -> list[ConfigError]:
    """Problems with the storage folder, the SQLite file's folder and the model folders."""
    problems = []
    reason = _writable_dir(settings.storage_path)
    if reason:
        problems.append(_problem(settings, reason, "storage", "path"))
    database = sqlite_file(settings.database_url)
    if database is not None:
        reason = _writable_dir(database.parent)
        if reason:
            problems.append(_problem(settings, reason, "database", "url"))
    for folder in settings.model_folders:
        if folder.exists() and not folder.is_dir():
            reason = f"model folder {folder} is not a folder"
            problems.append(_problem(settings, reason, "models", "folders"))
    return problems


def check_network(settings: Settings) -> list[ConfigError]:
    """Problems that would stop the listeners, the web page or exports from starting: a TLS
    certificate, key or CA that cannot be loaded (the listener's, a destination's), the web
    page on the DICOM port."""
    problems = []
    if settings.tls.enabled:
        from dicomnode.ingest.scp import tls_context

        try:
            tls_context(settings)
        except ValueError as exc:
            problems.append(_problem(settings, str(exc).removeprefix("[tls] "), "tls", "enabled"))
    for index, destination in enumerate(settings.destinations):
        if not destination.tls:
            continue
        try:
            destination_context(destination, settings.base_dir)
        except ValueError as exc:
            # The message names the key ("cannot load tls_ca ..."): point at that key's line.
            key = "tls_ca" if "cannot load tls_ca" in str(exc) else "tls_cert"
            reason = str(exc).removeprefix("[[destinations]] ")
            problems.append(_problem(settings, reason, "destinations", index, key))
    if settings.web.port == settings.node.port:
        reason = f"the web page and the DICOM listener cannot share port {settings.web.port}"
        problems.append(_problem(settings, reason, "web", "port"))
    return problems


def exposure_warnings(settings: Settings) -> list[str]:
    """What leaves the node open wider than a site would want: no peer list (any caller
    stores), peers known by AE title alone (a title anyone can send), a stand-alone worker's
    metrics on every address (no log-in in front of them). Warnings, not errors: the
    defaults run a demo out of the box."""
    warnings: list[str] = []
    if not settings.peers:
        warnings.append(
            f"[[peers]] lists no one: any calling AE title from any host that reaches "
            f"{settings.node.host}:{settings.node.port} may store; list the modalities and "
            "PACS (with their host) and set [node] require_known_peers = true"
        )
    anywhere = [peer.ae_title for peer in settings.peers if not peer.host]
    if anywhere:
        warnings.append(
            f"[[peers]] {', '.join(anywhere)} {'has' if len(anywhere) == 1 else 'have'} no "
            "host: any host calling with that AE title may store; give each its host (or use "
            "TLS client certificates)"
        )
    worker = settings.worker
    if worker.metrics_port and worker.metrics_host in ("0.0.0.0", "::", ""):
        warnings.append(
            f"[worker] metrics_host = {worker.metrics_host!r}: a stand-alone worker's /metrics "
            f"answers anyone who reaches port {worker.metrics_port} (no log-in); bind it to "
            "the monitoring network's address or a firewalled one"
        )
    return warnings


def check_settings(settings: Settings) -> list[ConfigError]:
    """Every problem of the main file's settings that keeps the node from running (paths,
    TLS, ports); model cards are checked apart (:func:`check_cards`)."""
    return check_paths(settings) + check_network(settings)


def storage_warnings(settings: Settings) -> list[str]:
    """A free-space watermark the storage file system can never meet: every C-STORE would
    be refused (0xA700). A warning, as the folder may not be mounted yet where this runs."""
    try:
        total = shutil.disk_usage(existing_parent(settings.storage_path)).total
    except OSError:
        return []
    watermark = settings.storage.min_free_bytes
    if watermark <= total:
        return []
    return [
        f"[storage] min_free_bytes = {watermark} is more than the whole file system of "
        f"{settings.storage_path} ({total} bytes, {total / 2**30:.1f} GiB): every instance "
        "would be refused as out of resources; lower it"
    ]


def database_warnings(settings: Settings, timeout_seconds: int = 5) -> list[str]:
    """check-config's look at a PostgreSQL server: whether it takes a connection within
    ``timeout_seconds`` (a warning, not an error: it may be down only now, or out of this
    host's reach on purpose). SQLite's folder is checked with the other paths."""
    if not settings.database_url.startswith("postgresql"):
        return []
    from sqlalchemy import create_engine, text

    from dicomnode.db.errors import unreachable

    engine = create_engine(settings.database_url, connect_args={"connect_timeout": timeout_seconds})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return [f"{unreachable(settings.database_url, exc)}; serve and workers wait for it"]
    finally:
        engine.dispose()
    return []


def config_warnings(settings: Settings) -> list[str]:
    """Everything check-config and serve warn of: the listener's exposure, the storage."""
    return exposure_warnings(settings) + storage_warnings(settings)


def check_cards(settings: Settings) -> tuple[list[ModelCard], list[ConfigError]]:
    """Every card in the model folders (later folders replace earlier by name), and problems."""
    by_name: dict[str, ModelCard] = {}
    problems: list[ConfigError] = []
    for folder in settings.model_folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            try:
                card = load_card(path)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            problem = onnx_problem(card) if card.model.onnx else ""
            if problem:
                problems.append(
                    ConfigError(
                        path,
                        problem,
                        key="model.onnx",
                        line=key_line(path.read_text(encoding="utf-8"), ("model", "onnx")),
                    )
                )
                continue
            by_name[card.model.name] = card
    for card in list(by_name.values()):
        missing = [m for m in (card.ensemble.members if card.ensemble else []) if m not in by_name]
        if missing:
            assert card.card_path is not None
            problems.append(
                ConfigError(
                    card.card_path,
                    f"ensemble members without a loadable card: {', '.join(missing)}",
                    key="ensemble.members",
                    line=key_line(
                        card.card_path.read_text(encoding="utf-8"), ("ensemble", "members")
                    ),
                )
            )
            del by_name[card.model.name]
    if not by_name and not problems:
        searched = ", ".join(
            f"{folder}{'' if folder.is_dir() else ' (does not exist)'}"
            for folder in settings.model_folders
        )
        problems.append(
            _problem(settings, f"no model cards found in {searched}", "models", "folders")
        )
    return list(by_name.values()), problems


def check_all(path: Path | str) -> tuple[Settings | None, list[ModelCard], list[ConfigError]]:
    """Load and check everything; the settings are None when the main file itself is invalid."""
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        return None, [], exc.problems
    cards, problems = check_cards(settings)
    return settings, cards, check_settings(settings) + problems


def load_checked(path: Path | str) -> tuple[Settings, list[ModelCard]]:
    """Settings and cards, or every problem raised as one :class:`ConfigError`."""
    settings, cards, problems = check_all(path)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigErrors(problems)
    assert settings is not None
    return settings, cards
