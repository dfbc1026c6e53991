"""The configuration file: the shipped one validates; broken ones are reported with
file, line, key and reason by ``dicomnode check-config``; relative paths resolve against
the installation root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from dicomnode.config import load_settings
from dicomnode.tomlfile import ConfigError

DESTINATION = (
    '[[destinations]]\nname = "{name}"\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'
)


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "check-config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_configuration_validates() -> None:
    result = check_config(Path("conf/dicomnode.toml"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [
        pytest.param(
            'log_level = "INFO"\n[node\nport = 104\n', 2, "", "not valid TOML", id="toml-syntax"
        ),
        pytest.param(
            '[web]\nport = 8080\n\n[node]\nae_title = "NODE"\nport = 70000\n',
            6,
            "node.port",
            "less than or equal to 65535",
            id="port-out-of-range",
        ),
        pytest.param(
            "[node]\nport = 104\ncolour = 1\n",
            3,
            "node.colour",
            "[node.colour] unknown setting\n",
            id="unknown-key",
        ),
        pytest.param(
            '[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n',
            2,
            "node.ae_title",
            "an AE title is 1-16 characters of printable ASCII without backslash "
            "('ABCDEFGHIJKLMNOPQ' has 17 characters)",
            id="ae-title-17-chars",
        ),
        pytest.param(
            '[storage]\npath = "var"\n\n[database]\nurl = "mysql://db/dicomnode"\n',
            5,
            "database.url",
            "sqlite:///",
            id="database-scheme",
        ),
        pytest.param(
            DESTINATION.format(name="pacs", ae="PACS", port=104)
            + "\n"
            + DESTINATION.format(name="archive", ae="ARCHIVE", port=70000),
            11,
            "destinations.1.port",
            "less than or equal to 65535",
            id="second-destination-port",
        ),
        pytest.param(
            DESTINATION.format(name="pacs", ae="PACS", port=104)
            + "\n"
            + DESTINATION.format(name="pacs", ae="ARCHIVE", port=105),
            8,
            "destinations",
            "unique",
            id="duplicate-destination-names",
        ),
    ],
)
def test_broken_file_names_file_line_key_and_reason(
    tmp_path: Path, text: str, line: int, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    result = check_config(path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{path}:{line}:" in result.stderr, result.stderr
    if key:
        assert f"[{key}" in result.stderr, result.stderr
    assert reason in result.stderr, result.stderr


def test_missing_file_is_named(tmp_path: Path) -> None:
    # A path given and missing: the hint fits it too (it said only "give --config PATH").
    missing = tmp_path / "absent.toml"
    result = check_config(missing)
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert result.stderr == (
        f"configuration error: {missing}: cannot read file: No such file or directory "
        "(check the path, or give --config PATH or set DICOMNODE_CONFIG)\n"
    )
    # A file that is there but cannot be read: the hint would not help.
    unreadable = check_config(tmp_path)
    assert (
        unreadable.stderr == f"configuration error: {tmp_path}: cannot read file: Is a directory\n"
    )


def test_card_without_its_onnx_file_fails_check(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "lonely.toml").write_text(
        '[model]\nname = "lonely"\nversion = "1"\ntask = "classification"\nonnx = "none.onnx"\n'
        '[input]\nshape = [1, 8, 8]\n[[outputs]]\nname = "probability"\nkind = "probabilities"\n'
    )
    config = write(tmp_path, f'[models]\nfolders = ["{cards}"]\n')
    result = check_config(config)
    assert result.returncode == 2
    assert "lonely.toml" in result.stderr
    assert "none.onnx" in result.stderr


def test_relative_paths_resolve_against_install_root(tmp_path: Path) -> None:
    root = tmp_path / "install"
    (root / "conf").mkdir(parents=True)
    config = root / "conf" / "dicomnode.toml"
    config.write_text(
        '[storage]\npath = "var/storage"\n[database]\nurl = "sqlite:///var/dicomnode.db"\n'
        '[models]\nfolders = ["models", "/opt/models"]\n'
    )
    settings = load_settings(config)
    assert settings.storage_path == root.resolve() / "var" / "storage"
    assert settings.database_url == f"sqlite:///{root.resolve() / 'var' / 'dicomnode.db'}"
    assert settings.model_folders == [root.resolve() / "models", Path("/opt/models")]


def test_outside_conf_paths_resolve_against_the_file_folder(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[storage]\npath = "spool"\n[database]\nurl = "sqlite:///node.db"\n')
    settings = load_settings(config)
    assert settings.storage_path == tmp_path.resolve() / "spool"
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'node.db'}"


def test_absolute_and_server_urls_are_kept(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[storage]\npath = "{tmp_path / "abs"}"\n'
        '[database]\nurl = "postgresql+psycopg://dicomnode@db:5432/dicomnode"\n'
    )
    settings = load_settings(config)
    assert settings.storage_path == tmp_path / "abs"
    assert settings.database_url == "postgresql+psycopg://dicomnode@db:5432/dicomnode"


def test_load_settings_raises_config_error_with_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[worker]\ncount = 1\nmax_attempts = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.key == "worker.max_attempts"
    assert caught.value.line == 3
    assert caught.value.path == path


def test_require_known_peers_admits_only_peers_and_refuses_a_file_without_any(
    tmp_path: Path,
) -> None:
    """The flag keeps the node closed: with it, a file (or a reload) that lists no peers is
    refused instead of admitting every caller, and the listener admits no unknown caller."""
    from dicomnode.ingest.admission import peer_allowed

    closed = "[node]\nrequire_known_peers = true\n"
    with pytest.raises(ConfigError, match="no \\[\\[peers\\]\\] are listed"):
        load_settings(write(tmp_path, closed))
    settings = load_settings(write(tmp_path, closed + '\n[[peers]]\nae_title = "CT01"\n'))
    assert settings.node.require_known_peers
    assert peer_allowed(settings.peers, "CT01", "192.0.2.1", require_known=True)
    assert not peer_allowed(settings.peers, "STRANGER", "192.0.2.1", require_known=True)
    assert not peer_allowed([], "STRANGER", "192.0.2.1", require_known=True)
    assert peer_allowed([], "STRANGER", "192.0.2.1", require_known=False)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        pytest.param(
            '[node]\nport = "11999"\n',
            "node.port",
            "expected an integer, got the string '11999' (write it without quotes)",
            id="quoted-int",
        ),
        pytest.param(
            '[node]\nport = "eleven"\n',
            "node.port",
            "expected an integer, got the string 'eleven'",
            id="word-for-int",
        ),
        pytest.param(
            '[tls]\nenabled = "true"\n',
            "tls.enabled",
            "expected true or false, got the string 'true' (write it without quotes)",
            id="quoted-bool",
        ),
        pytest.param(
            '[assembly]\nquiet_seconds = "0.5"\n',
            "assembly.quiet_seconds",
            "expected a number, got the string '0.5' (write it without quotes)",
            id="quoted-float",
        ),
        pytest.param(
            "[worker]\ncount = 1.0\n",
            "worker.count",
            "Input should be a valid integer",
            id="float-for-int",
        ),
    ],
)
def test_values_of_the_wrong_toml_type_are_refused_not_converted(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert caught.value.key == key
    assert caught.value.line == 2
    assert caught.value.reason == reason


def test_numbers_and_paths_keep_their_toml_forms(tmp_path: Path) -> None:
    """Strict, not stricter: an integer is a valid number of seconds, paths are strings."""
    settings = load_settings(
        write(
            tmp_path,
            '[assembly]\nquiet_seconds = 2\n[storage]\npath = "spool"\n'
            '[models]\nfolders = ["cards"]\n[tls]\nca = "ca.pem"\n',
        )
    )
    assert settings.assembly.quiet_seconds == 2.0
    assert settings.storage.path == Path("spool")
    assert settings.models.folders == [Path("cards")]
    assert settings.tls.ca == Path("ca.pem")


@pytest.mark.parametrize(
    ("title", "found"),
    [
        ("ABCDEFGHIJKLMNOPQ", "'ABCDEFGHIJKLMNOPQ' has 17 characters"),
        ("", "it is empty"),
        ("   ", "it is all spaces"),
        ("CT\\\\01", "'CT\\\\01' contains '\\\\'"),
        ("NODÉ", "'NODÉ' contains 'É'"),
    ],
)
def test_an_ae_title_error_says_the_rule_in_words(tmp_path: Path, title: str, found: str) -> None:
    text = f'[[destinations]]\nname = "pacs"\nhost = "h"\nport = 104\nae_title = "{title}"\n'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert caught.value.key == "destinations.0.ae_title"
    assert caught.value.line == 5
    assert caught.value.reason == (
        f"an AE title is 1-16 characters of printable ASCII without backslash ({found})"
    )


def test_valid_ae_titles_are_kept(tmp_path: Path) -> None:
    for title in ("A", "  PADDED", "ABCDEFGHIJKLMNOP", "CT_01-~!"):
        settings = load_settings(write(tmp_path, f'[node]\nae_title = "{title}"\n'))
        assert settings.node.ae_title == title


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("postgresql+psycopg://u:s3cret-Pw@h:abc/x", "its port is not a number"),
        ("postgresql+psycopg://u@h:abc/x", "its port is not a number"),
        ("postgresql+psycopg://u:s3cret-Pw@h:70000/x", "port 70000 is not 1-65535"),
        # An '@' in the password not percent-encoded: the rest of it read as the host.
        ("postgresql+psycopg://u:s3cret-Pw@rest@h:5432/x", "more than one '@' before the host"),
    ],
)
def test_a_database_url_sqlalchemy_cannot_use_is_refused_without_its_password(
    tmp_path: Path, url: str, what: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f'[storage]\npath = "var"\n[database]\nurl = "{url}"\n'))
    assert caught.value.key == "database.url"
    assert caught.value.line == 4
    assert f"url is not a valid database URL: {what}" in caught.value.reason
    assert "s3cret-Pw" not in str(caught.value)


def test_a_misspelt_table_is_named_at_its_header(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[worker]\ncount = 1\n\n[workers]\ncount = 2\n\n[[peer]]\nae_title = 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert [(p.key, p.line) for p in caught.value.problems] == [("workers", 4), ("peer", 7)]


def test_a_misspelt_key_or_table_is_named_with_the_one_meant(tmp_path: Path) -> None:
    """A typo is reported as an unknown setting or table with the closest known key of its
    table (case aside, a key's alias where it has one), not as pydantic's "extra inputs"."""
    path = write(
        tmp_path,
        'lgo_level = "INFO"\n'  # 1
        "[node]\n"  # 2
        "max_asociations = 16\n"  # 3
        "colour = 1\n"  # 4
        'AE_Title = "NODE"\n'  # 5
        "[nod]\n"  # 6
        "port = 104\n"  # 7
        "[logging]\n"  # 8
        "jsn = true\n"  # 9
        "[worklist.max_wait_minutes]\n"  # 10
        "stta = 10\n"  # 11
        "[[peer]]\n"  # 12
        'ae_title = "A"\n'  # 13
        + DESTINATION.format(name="pacs", ae="PACS", port=104)  # 14-18
        + "timout_seconds = 5\n",  # 19
    )
    result = check_config(path)
    assert result.returncode == 2
    where = f"configuration error: {path}"
    assert result.stderr.splitlines() == [
        f"{where}:1: [lgo_level] unknown setting (did you mean log_level?)",
        f"{where}:3: [node.max_asociations] unknown setting (did you mean max_associations?)",
        f"{where}:4: [node.colour] unknown setting",
        f"{where}:5: [node.AE_Title] unknown setting (did you mean ae_title?)",
        f"{where}:6: [nod] unknown table (did you mean [node]?)",
        f"{where}:9: [logging.jsn] unknown setting (did you mean json?)",
        f"{where}:11: [worklist.max_wait_minutes.stta] unknown setting (did you mean stat?)",
        f"{where}:12: [peer] unknown table (did you mean [[peers]]?)",
        f"{where}:19: [destinations.0.timout_seconds] unknown setting "
        "(did you mean timeout_seconds?)",
    ]


def test_the_key_meant_is_written_as_its_own_kind(tmp_path: Path) -> None:
    """The suggestion is written as the key meant is (a table ``[k]``, an array of tables
    ``[[k]]``, a setting ``k``), not as the typo was: ``[log_leve]`` suggested [log_level]."""
    path = write(
        tmp_path,
        "nod = 1\n"  # 1
        "[log_leve]\n"  # 2
        "[peer]\n"  # 3
        'ae_title = "A"\n'  # 4
        "[worklist.max_wait_minute]\n"  # 5
        "stat = 10\n",  # 6
    )
    result = check_config(path)
    assert result.returncode == 2
    where = f"configuration error: {path}"
    assert result.stderr.splitlines() == [
        f"{where}:1: [nod] unknown setting (did you mean [node]?)",
        f"{where}:2: [log_leve] unknown table (did you mean log_level?)",
        f"{where}:3: [peer] unknown table (did you mean [[peers]]?)",
        f"{where}:5: [worklist.max_wait_minute] unknown table "
        "(did you mean [worklist.max_wait_minutes]?)",
    ]
