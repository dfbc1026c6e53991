"""Load a TOML file into a pydantic model; errors name the file, line, key and reason."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration problem a person can fix: where it is and what is wrong."""

    def __init__(self, path: Path | str, reason: str, key: str = "", line: int | None = None):
        self.path = Path(path)
        self.reason = reason
        self.key = key
        self.line = line
        where = f"{self.path}:{line}" if line else str(self.path)
        what = f" [{key}]" if key else ""
        super().__init__(f"{where}:{what} {reason}")


def _key_line(text: str, loc: tuple[str | int, ...]) -> int | None:
    """Best-effort line of the TOML key a pydantic error location points at."""
    names = [part for part in loc if isinstance(part, str)]
    if not names:
        return None
    lines = text.splitlines()
    # Look for the table header of the parent keys first, then the leaf key after it.
    start = 0
    for depth in range(len(names) - 1, 0, -1):
        header = re.compile(r"^\s*\[\[?\s*" + re.escape(".".join(names[:depth])) + r"\s*\]\]?\s*$")
        index = next((i for i, line in enumerate(lines) if header.match(line)), None)
        if index is not None:
            start = index
            break
    leaf = re.compile(r"^\s*" + re.escape(names[-1]) + r"\s*=")
    for i in range(start, len(lines)):
        if leaf.match(lines[i]):
            return i + 1
    return start + 1 if start else None


def load_toml(path: Path | str, model: type[M]) -> M:
    """Parse ``path`` and validate it as ``model``, raising :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, f"cannot read file: {exc.strerror or exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            path, f"not valid TOML: {exc}", line=int(match.group(1)) if match else None
        ) from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        key = ".".join(str(part) for part in loc)
        raise ConfigError(path, first["msg"], key=key, line=_key_line(text, loc)) from exc
