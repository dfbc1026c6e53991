"""Logging set-up: plain or JSON lines; no patient data unless debug is on."""

from __future__ import annotations

import json
import logging
import sys

CHATTY_LIBRARIES = ("pynetdicom", "highdicom", "alembic")


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
    handler.setFormatter(
        _JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that narrate their work at INFO (pynetdicom every PDU, highdicom every module
    # it copies into a result object, alembic its plug-ins at every start) say only what goes
    # wrong unless debugging; the node logs what they did in its own lines.
    chatter = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(chatter)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
