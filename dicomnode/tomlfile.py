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


def _header_lines(lines: list[str], table: list[str]) -> list[int]:
    pattern = re.compile(r"^\s*\[\[?\s*" + re.escape(".".join(table)) + r"\s*\]\]?\s*(#.*)?$")
    return [i for i, line in enumerate(lines) if pattern.match(line)]


def key_line(text: str, loc: tuple[str | int, ...]) -> int | None:
    """Best-effort line of the TOML key a pydantic error location points at.

    ``("destinations", 1, "port")`` is the ``port`` key under the second ``[[destinations]]``.
    """
    parts = list(loc)
    while parts and isinstance(parts[-1], int):
        parts.pop()  # an item of an inline array: point at the array's key
    if not parts:
        return None
    leaf = str(parts[-1])
    table_parts = parts[:-1]
    lines = text.splitlines()
    start = -1
    # The deepest table header that exists, taking the n-th one of an array of tables.
    for depth in range(len(table_parts), 0, -1):
        prefix = table_parts[:depth]
        names = [str(p) for p in prefix if isinstance(p, str)]
        occurrence = prefix[-1] if isinstance(prefix[-1], int) else 0
        if isinstance(prefix[-1], int):
            names = [str(p) for p in prefix[:-1] if isinstance(p, str)]
        hits = _header_lines(lines, names) if names else []
        if hits:
            start = hits[min(occurrence, len(hits) - 1)]
            break
    key = re.compile(r"^\s*" + re.escape(leaf) + r"\s*=")
    for i in range(start + 1, len(lines)):
        if i > start + 1 and lines[i].lstrip().startswith("["):
            break  # the next table: the key is not set in this one
        if key.match(lines[i]):
            return i + 1
    return start + 1 if start >= 0 else None


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
        raise ConfigError(path, first["msg"], key=key, line=key_line(text, loc)) from exc
