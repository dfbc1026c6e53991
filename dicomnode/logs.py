"""Logging set-up: plain or JSON lines; no patient data unless debug is on."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

CHATTY_LIBRARIES = ("pynetdicom", "highdicom", "alembic", "httpx", "httpcore")
# Loggers whose warnings quote the data values they doubt (a patient's name, ID or birth
# date): Python's warnings once routed into logging (pydicom's and highdicom's
# ``warnings.warn`` of a name without "^", of a date that is not one) and pydicom's own
# logger, which logs each such warning as well. Shown only with debug on.
QUOTING_LOGGERS = ("py.warnings", "pydicom")


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


class _JsonFormatter(logging.Formatter):
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
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(sys.stderr)
    if level != "DEBUG":
        handler.addFilter(_QuietQuotingLoggers())
    handler.setFormatter(
        _JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
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
