"""The configuration reference cannot drift from the schema or the commented default file."""

from __future__ import annotations

import tomllib

from conftest import REPO

from dicomnode.config import Settings
from dicomnode.configdoc import file_comments, reference, schema_keys

DOC = REPO / "docs" / "configuration.md"
FIX = "regenerate with: dicomnode config-reference --out docs/configuration.md"


def test_committed_reference_matches_the_schema() -> None:
    assert DOC.read_text(encoding="utf-8") == reference(), FIX


def test_every_key_is_explained_in_the_commented_default_file() -> None:
    comments = file_comments()
    undocumented = [key for key in schema_keys() if not comments.get(key)]
    assert not undocumented, f"explain these in conf/dicomnode.toml: {undocumented}"


def test_commented_default_file_is_valid_and_lists_defaults() -> None:
    raw = tomllib.loads((REPO / "conf" / "dicomnode.toml").read_text(encoding="utf-8"))
    Settings.model_validate(raw)
    assert "destinations" not in raw and "peers" not in raw


def test_reference_lists_every_table_and_key() -> None:
    text = reference()
    for key in schema_keys():
        assert f"| `{key.rsplit('.', 1)[-1]}` |" in text
    for table in ("[node]", "[storage]", "[logging]", "[[destinations]]", "[[peers]]"):
        assert f"`{table}`" in text
