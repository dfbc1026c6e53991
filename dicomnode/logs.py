"""Logging set-up: plain or JSON lines; no patient data unless debug is on."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import datetime

CHATTY_LIBRARIES = ("pynetdicom", "highdicom", "alembic", "httpx", "httpcore")
# Loggers whose warnings quote the data values they doubt (a patient's name, ID or birth
# date): Python's warnings once routed into logging (pydicom's and highdicom's
# ``warnings.warn`` of a name without "^", of a date that is not one) and pydicom's own
# logger, which logs each such warning as well. Shown only with debug on.
QUOTING_LOGGERS = ("py.warnings", "pydicom")
# pynetdicom's own lines for an outgoing association that could not connect: ERRORs that
# name no destination, two per failed try, while the export code logs a WARNING naming
# the destination and the retry. Shown (as DEBUG) only with debug on; pynetdicom's other
# ERRORs, a TLS failure's among them, stay as they are.
CONNECT_FAILURE_LOGGER = "pynetdicom.transport"
CONNECT_FAILURE_MESSAGES = (
    "Association request failed: unable to connect to remote",
    "TCP Initialisation Error: ",
)
# pydicom logs each decoding plugin that fails on a frame as an ERROR with a traceback, then
# tries the next and raises one error naming every plugin's failure, which the node reports
# as the image's reason (pipeline/decode.py).
DECODER_LOGGER = "pydicom.pixels.decoders.base"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The journal stamps each line with its own time.
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
# sd-daemon(3): a line written to the journal's stream may begin with its syslog priority.
JOURNAL_PRIORITIES = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
JOURNAL_DEBUG_PRIORITY = 7


def stderr_is_journal() -> bool:
    """Whether standard error is systemd's journal stream: ``JOURNAL_STREAM`` names its
    device and inode (systemd.exec(5)). Compared with stderr's own, as systemd advises: a
    child of the service whose stderr was sent elsewhere inherits the variable."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def journal_priority(level: int) -> str:
    """The sd-daemon prefix of a line at ``level``: ``<3>`` error and critical, ``<4>``
    warning, ``<6>`` info, ``<7>`` debug."""
    for threshold, priority in JOURNAL_PRIORITIES:
        if level >= threshold:
            return f"<{priority}>"
    return f"<{JOURNAL_DEBUG_PRIORITY}>"


class _QuietQuotingLoggers(logging.Filter):
    """Drops what ``QUOTING_LOGGERS`` (and their children) log below ERROR. A filter on the
    handler, not a logger level: pydicom sets its logger's level when it is imported, which
    may be after ``setup_logging``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return not any(
            record.name == name or record.name.startswith(name + ".") for name in QUOTING_LOGGERS
        )


class _DemoteConnectFailures(logging.Filter):
    """On ``CONNECT_FAILURE_LOGGER``: makes its connect-failure lines DEBUG records and drops
    them unless that logger shows DEBUG (a logger filter runs after the level check)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not isinstance(record.msg, str):
            return True
        if not record.msg.startswith(CONNECT_FAILURE_MESSAGES):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_CONNECT_FAILURES = _DemoteConnectFailures()


class _DemotePluginFailures(logging.Filter):
    """On ``DECODER_LOGGER``: a decoding plugin's failure (an ERROR with a traceback, one per
    plugin and per decode: a corrupt image's preview asked for again logged them again)
    becomes a DEBUG record, dropped unless debugging; the node's own line says
    why the image cannot be read, with every plugin's reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or record.exc_info is None:
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        # pydicom sets its loggers' level as it is imported: debug on is the root's level.
        return logging.getLogger().isEnabledFor(logging.DEBUG)


_PLUGIN_FAILURES = _DemotePluginFailures()


class _JournalPriority(logging.Formatter):
    """Prefixes each line of ``inner``'s text (a traceback's too) with the record's
    priority, so that ``journalctl -p err`` finds errors."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = journal_priority(record.levelno)
        return "\n".join(prefix + line for line in self.inner.format(record).splitlines())


class _Iso8601(logging.Formatter):
    """Times as ISO 8601 in local time with its UTC offset, to the millisecond
    ("2026-12-07T19:08:39.007+01:00"): unambiguous across time zones and daylight saving,
    and sortable (logging's default has no zone and a comma before the milliseconds)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso8601(record.created)


def iso8601(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch) as ISO 8601 local time with its offset."""
    moment = datetime.fromtimestamp(timestamp).astimezone()
    return moment.isoformat(timespec="milliseconds")


class _JsonFormatter(_Iso8601):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Configure the root logger once for the process: to stderr, each line with its
    sd-daemon priority and without a time of its own when stderr is the journal."""
    handler = logging.StreamHandler(sys.stderr)
    if level != "DEBUG":
        handler.addFilter(_QuietQuotingLoggers())
    journal = stderr_is_journal()
    formatter: logging.Formatter = (
        _JsonFormatter() if json_lines else _Iso8601(JOURNAL_FORMAT if journal else PLAIN_FORMAT)
    )
    handler.setFormatter(_JournalPriority(formatter) if journal else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that narrate their work at INFO (pynetdicom every PDU, highdicom every module
    # it copies into a result object, alembic its plug-ins at every start, httpx every request
    # with its URL, a webhook's token in the query included) say only what goes wrong unless
    # debugging; the node logs what they did in its own lines.
    chatter = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(chatter)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    connect_failures = logging.getLogger(CONNECT_FAILURE_LOGGER)
    if _CONNECT_FAILURES not in connect_failures.filters:
        connect_failures.addFilter(_CONNECT_FAILURES)
    plugin_failures = logging.getLogger(DECODER_LOGGER)
    if _PLUGIN_FAILURES not in plugin_failures.filters:
        plugin_failures.addFilter(_PLUGIN_FAILURES)
    # Python's warnings go to the log (py.warnings, level WARNING), not straight to stderr
    # (the journal), where the handler's filter keeps them out unless debugging.
    logging.captureWarnings(True)


def patient_values(
    name: str = "", identifiers: Iterable[object] = (), birth_date: str = ""
) -> set[str]:
    """What identifies a patient in a text: the name and each of its parts of three letters
    or more, the identifiers given (IDs, accession numbers), the birth date as DICOM writes it
    (YYYYMMDD) and as ISO 8601."""
    values = {name, *(part for part in name.replace("=", "^").split("^") if len(part) >= 3)}
    values.update(str(value) for value in identifiers if value)
    if birth_date:
        values.add(birth_date)
        if len(birth_date) == 8 and birth_date.isdigit():
            values.add(f"{birth_date[:4]}-{birth_date[4:6]}-{birth_date[6:]}")
    return values


def without_patient_data(text: str, values: Iterable[str]) -> str:
    """``text`` with every value of three characters or more (``patient_values``) replaced by
    "<patient data>": an error may quote a value it refused, and logs carry no patient data."""
    for value in sorted((v.strip() for v in values), key=len, reverse=True):
        if len(value) >= 3:
            text = text.replace(value, "<patient data>")
    return text
