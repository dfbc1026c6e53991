"""Load a TOML file into a pydantic model; errors name the file, line, key and reason."""

from __future__ import annotations

import difflib
import re
import tomllib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

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


def _bare(annotation: Any) -> Any:
    """``annotation`` without ``Annotated[...]`` and ``| None``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
            if len(kinds) != 1:
                return annotation
            annotation = kinds[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """The keys a file may set in ``model``'s table (a field's alias where it has one), and
    the field's type."""
    return {field.alias or name: field.annotation for name, field in model.model_fields.items()}


def _table_model(model: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model of the table ``loc`` names under ``model`` (``("destinations", 0)`` is
    :class:`Destination`), or None where ``loc`` leads to no model."""
    annotation: Any = model
    for part in loc:
        annotation = _bare(annotation)
        if isinstance(part, int):
            if get_origin(annotation) is not list:
                return None
            annotation = get_args(annotation)[0]
        elif _is_model(annotation):
            if part not in _keys(annotation):
                return None
            annotation = _keys(annotation)[part]
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    annotation = _bare(annotation)
    return annotation if _is_model(annotation) else None


def _unknown_key(error: Any, model: type[BaseModel] | None) -> str:
    """For a key the table does not have: an unknown setting or table, and the known key
    it was probably meant to be."""
    loc = tuple(error["loc"])
    value = error.get("input")
    tables = isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    what = "unknown table" if tables or isinstance(value, dict) else "unknown setting"
    table = _table_model(model, loc[:-1]) if model is not None and loc else None
    if table is None or not isinstance(loc[-1], str):
        return what
    # Case aside: "AE_Title" is ae_title misspelt too.
    known = {key.lower(): key for key in _keys(table)}
    close = difflib.get_close_matches(loc[-1].lower(), known, n=1)
    if not close:
        return what
    meant = known[close[0]]
    return f"{what} (did you mean {_written(meant, _keys(table)[meant], loc[:-1])}?)"


def _written(key: str, annotation: Any, table: tuple[str | int, ...]) -> str:
    """``key`` as a file writes it, by its field's type (not the typo's value): a table
    ``[worklist.max_wait_minutes]``, an array of tables ``[[peers]]``, a setting ``log_level``."""
    annotation = _bare(annotation)
    header = ".".join([*(part for part in table if isinstance(part, str)), key])
    if _is_model(annotation):
        return f"[{header}]"
    if get_origin(annotation) is list and _is_model(_bare(get_args(annotation)[0])):
        return f"[[{header}]]"
    return key


def _reason(error: Any, model: type[BaseModel] | None = None) -> str:
    """pydantic's message; for a key the model does not have, that it is unknown and what
    it may have been meant to be; for a quoted number or boolean what was wanted instead."""
    if error["type"] == "extra_forbidden":
        return _unknown_key(error, model)
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


def validation_problems(
    path: Path, text: str, exc: ValidationError, model: type[BaseModel] | None = None
) -> list[ConfigError]:
    """One :class:`ConfigError` for each of pydantic's errors, in the order of the file
    (``model``, the one validated, names the keys a misspelt one may have been meant as)."""
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in loc)
        problems.append(ConfigError(path, _reason(error, model), key=key, line=key_line(text, loc)))
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
        raise ConfigErrors(validation_problems(path, text, exc, model)) from exc
