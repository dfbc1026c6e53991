"""README.md's "Where things are" table names every module of the package, and no module that
is gone: a new module (e.g. export/outages.py) is easy to leave out of it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dicomnode"


def _table() -> list[tuple[list[str], list[str]]]:
    """The table's rows: the paths its first column names, and the names its second does."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 4 or not cells[1].strip().startswith("`"):
            continue
        rows.append((re.findall(r"`([^`]+)`", cells[1]), re.findall(r"`([^`]+)`", cells[2])))
    return rows


def _named() -> set[Path]:
    """The files the table names, and the folders its second column names (e.g. db's
    ``migrations/``: everything in them), as paths in the repository."""
    named = set()
    for paths, names in _table():
        named.update(REPO / path for path in paths if not path.endswith("/"))
        for folder in (REPO / path for path in paths if path.endswith("/")):
            named.update(folder / name for name in names if re.fullmatch(r"[\w.]+(\.py|/)", name))
    return named


def test_every_module_is_named_in_where_things_are() -> None:
    named = _named()
    missing = [
        str(module.relative_to(REPO))
        for module in sorted(PACKAGE.rglob("*.py"))
        if module.name != "__init__.py" and not ({module, *module.parents} & named)
    ]
    assert missing == [], f'README.md "Where things are" does not name: {missing}'


def test_every_module_named_in_where_things_are_exists() -> None:
    gone = sorted(
        str(path.relative_to(REPO))
        for path in _named()
        if path.is_relative_to(PACKAGE) and not path.exists()
    )
    assert gone == [], f'README.md "Where things are" names what is not there: {gone}'
