"""Load a TOML file into a pydantic model; errors name the file, line, key and reason."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

# pydantic's error types for a value of the wrong TOML type (the settings are strict), and
# what TOML value was wanted.
_TYPE_ERRORS: dict[str, tuple[str, Callable[[str], object]]] = {
    "int_type": ("an integer", int),
    "float_type": ("a number", float),
    "bool_type": ("true or false", lambda text: {"true": True, "false": False}[text]),
}


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

    @property
    def problems(self) -> list[ConfigError]:
        """Each problem this error stands for (one here; several for :class:`ConfigErrors`)."""
        return [self]


class ConfigErrors(ConfigError):
    """Every problem found in one file. It reads as the first one (callers that show one
    line still name a real problem); :attr:`problems` has them all, in file order."""

    def __init__(self, problems: list[ConfigError]):
        first = problems[0]
        more = len(problems) - 1
        reason = first.reason
        if more:
            reason += f" (and {more} more problem{'s' if more > 1 else ''}: see check-config)"
        super().__init__(first.path, reason, key=first.key, line=first.line)
        self._problems = list(problems)

    @property
    def problems(self) -> list[ConfigError]:
        return self._problems


def _header_lines(lines: list[str], table: list[str]) -> list[int]:
    pattern = re.compile(r"^\s*\[\[?\s*" + re.escape(".".join(table)) + r"\s*\]\]?\s*(#.*)?$")
    return [i for i, line in enumerate(lines) if pattern.match(line)]


def _table_line(lines: list[str], loc: list[str | int]) -> int | None:
    """The header line of the table ``loc`` names (``[workers]``, the n-th ``[[peers]]``, or
    the first sub-table under it such as ``[workers.gpu]``): where a whole table is wrong."""
    occurrence = 0
    if loc and isinstance(loc[-1], int):
        occurrence = loc[-1]
        loc = loc[:-1]
    if not loc or not all(isinstance(part, str) for part in loc):
        return None
    names = [str(part) for part in loc]
    hits = _header_lines(lines, names)
    if hits:
        return hits[min(occurrence, len(hits) - 1)] + 1
    nested = re.compile(r"^\s*\[\[?\s*" + re.escape(".".join(names)) + r"\.")
    return next((i + 1 for i, line in enumerate(lines) if nested.match(line)), None)


def key_line(text: str, loc: tuple[str | int, ...]) -> int | None:
    """Best-effort line of the TOML key a pydantic error location points at.

    ``("destinations", 1, "port")`` is the ``port`` key under the second ``[[destinations]]``;
    ``("workers",)`` is a ``[workers]`` table header when no ``workers = ...`` key exists.
    """
    lines = text.splitlines()
    parts = list(loc)
    while parts and isinstance(parts[-1], int):
        parts.pop()  # an item of an inline array: point at the array's key
    if not parts:
        return None
    leaf = str(parts[-1])
    table_parts = parts[:-1]
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
    # Not a key: the location may be a table of its own (a misspelt [workers], a
    # [[peers]] entry that fails as a whole).
    table = _table_line(lines, list(loc))
    if table is not None:
        return table
    return start + 1 if start >= 0 else None


def _reason(error: Any) -> str:
    """pydantic's message, or for a quoted number or boolean what was wanted instead."""
    wanted = _TYPE_ERRORS.get(error["type"])
    value = error.get("input")
    if wanted is None or not isinstance(value, str):
        return error["msg"]
    name, parse = wanted
    reason = f"expected {name}, got the string {value!r}"
    try:
        parse(value)
    except (ValueError, KeyError):
        return reason
    return reason + " (write it without quotes)"


def validation_problems(path: Path, text: str, exc: ValidationError) -> list[ConfigError]:
    """One :class:`ConfigError` for each of pydantic's errors, in the order of the file."""
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in loc)
        problems.append(ConfigError(path, _reason(error), key=key, line=key_line(text, loc)))
    problems.sort(key=lambda problem: problem.line or 0)
    return problems


def load_toml(path: Path | str, model: type[M]) -> M:
    """Parse ``path`` and validate it as ``model``, raising :class:`ConfigError`
    (:class:`ConfigErrors` with every problem when the values do not validate)."""
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
        raise ConfigErrors(validation_problems(path, text, exc)) from exc
