"""``dicomnode check-config`` reports every problem: main file, cards, ONNX files, paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_problem_is_reported_with_file_line_and_key(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    # A card whose ONNX file is missing, and a card that is not valid TOML.
    shutil.copy(REPO / "models" / "cxr_pneumothorax_demo.toml", cards / "orphan.toml")
    (cards / "broken.toml").write_text("[model\nname = 1\n")
    # A card whose ONNX file was cut short (a copy interrupted, a full disk).
    shutil.copy(REPO / "models" / "cxr_view_demo.toml", cards / "truncated.toml")
    onnx = (REPO / "models" / "cxr_view_demo.onnx").read_bytes()
    (cards / "cxr_view_demo.onnx").write_bytes(onnx[: len(onnx) // 3])
    # An ensemble card (no ONNX of its own) whose member cards are not there.
    shutil.copy(REPO / "models" / "cxr_tb_ensemble_demo.toml", cards / "ensemble.toml")
    (tmp_path / "blocker").write_text("a file, not a folder")
    config = tmp_path / "dicomnode.toml"
    config.write_text(
        f'[storage]\npath = "{tmp_path / "blocker" / "storage"}"\n\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n\n'
        f'[models]\nfolders = ["{cards}"]\n'
    )
    result = _check(config)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("configuration")]
    assert len(errors) == 5, result.stderr
    assert re.search(
        rf"{re.escape(str(config))}:2: \[storage\.path\] .*not a folder", result.stderr
    )
    assert re.search(
        r"orphan\.toml:\d+: \[model\.onnx\] ONNX file .* does not exist", result.stderr
    )
    assert re.search(r"broken\.toml:\d+: .*not valid TOML", result.stderr)
    assert re.search(
        r"truncated\.toml:\d+: \[model\.onnx\] cxr-view-demo: cannot load .*cxr_view_demo\.onnx",
        result.stderr,
    )
    assert re.search(
        r"ensemble\.toml:\d+: \[ensemble\.members\] ensemble members without a loadable card",
        result.stderr,
    )


def test_shipped_configuration_passes() -> None:
    result = _check(REPO / "conf" / "dicomnode.toml")
    assert result.returncode == 0, result.stderr
    shipped = len(list((REPO / "models").glob("*.toml")))
    assert f"OK ({shipped} model card(s)" in result.stdout
    # The demo's defaults run out of the box, but say who may store.
    assert "warning: [[peers]] lists no one: any calling AE title" in result.stderr


def test_peers_known_by_title_alone_are_warned_of_and_listed_hosts_are_not(
    tmp_path: Path,
) -> None:
    config = tmp_path / "dicomnode.toml"
    base = (
        f'[storage]\npath = "{tmp_path / "storage"}"\n\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n\n'
        f'[models]\nfolders = ["{REPO / "models"}"]\n\n'
    )
    config.write_text(base + '[[peers]]\nae_title = "CT01"\n')
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert "warning: [[peers]] CT01 has no host" in result.stderr
    config.write_text(base + '[[peers]]\nae_title = "CT01"\nhost = "192.0.2.7"\n')
    result = _check(config)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_worker_metrics_on_every_address_are_warned_of(tmp_path: Path) -> None:
    """A stand-alone worker's /metrics has no log-in: on 0.0.0.0 check-config says so; on
    an address of its own, or with no metrics port, it does not."""
    config = tmp_path / "dicomnode.toml"
    base = (
        f'[storage]\npath = "{tmp_path / "storage"}"\n\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n\n'
        f'[models]\nfolders = ["{REPO / "models"}"]\n\n'
        '[[peers]]\nae_title = "CT01"\nhost = "192.0.2.7"\n\n'
    )
    config.write_text(base + '[worker]\nmetrics_port = 9101\nmetrics_host = "0.0.0.0"\n')
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert "warning: [worker] metrics_host = '0.0.0.0': a stand-alone worker's /metrics" in (
        result.stderr
    )
    quiet = ('metrics_port = 9101\nmetrics_host = "10.0.0.5"\n', 'metrics_host = "0.0.0.0"\n')
    for worker in quiet:
        config.write_text(base + "[worker]\n" + worker)
        result = _check(config)
        assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_what_keeps_the_node_from_running_is_refused_by_check_config_and_serve(
    tmp_path: Path,
) -> None:
    """TLS files that cannot be loaded, the web page on the DICOM port, and no model card at
    all pass no more (the TLS ones ended serve in five tracebacks); serve refuses the file
    with check-config's messages before it starts anything."""
    config = tmp_path / "dicomnode.toml"
    config.write_text(
        f"[node]\nport = 11999\n\n[web]\nport = 11999\n\n"
        f'[storage]\npath = "{tmp_path / "storage"}"\n\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n\n'
        f'[models]\nfolders = ["{tmp_path / "no-such-folder"}"]\n\n'
        f'[tls]\nenabled = true\nca = "{tmp_path / "no-ca.pem"}"\n'
    )
    result = _check(config)
    assert result.returncode == 2
    assert re.search(r":\d+: \[tls\.enabled\] cannot load cert .*node\.pem", result.stderr)
    assert re.search(r":5: \[web\.port\] .*cannot share port 11999", result.stderr)
    assert re.search(
        r"\[models\.folders\] no model cards found in .*\(does not exist\)", result.stderr
    )

    serve = subprocess.run(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 2
    assert "Traceback" not in serve.stderr
    assert "configuration error:" in serve.stderr and "cannot share port 11999" in serve.stderr
    assert not (tmp_path / "db.sqlite").exists()  # refused before it touched anything


def test_a_destination_needs_a_host(tmp_path: Path) -> None:
    config = tmp_path / "dicomnode.toml"
    config.write_text('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = ""\nport = 104\n')
    result = _check(config)
    assert result.returncode == 2
    assert re.search(r":4: \[destinations\.0\.host\] .*at least 1 character", result.stderr)


def _check_option(path: Path) -> subprocess.CompletedProcess:
    """``check-config --config FILE``, as every other command takes the file."""
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_problem_of_the_main_file_is_listed_with_its_line(tmp_path: Path) -> None:
    """Not only the first: an admin fixes the file in one pass. A misspelt table is named at
    its header, a quoted number is a type error (not converted), an AE title error says the
    rule in words, a database URL that SQLAlchemy cannot parse is refused here (not by a
    ValueError at start) without echoing its password."""
    config = tmp_path / "dicomnode.toml"
    config.write_text(
        "[node]\n"  # 1
        'ae_title = "ABCDEFGHIJKLMNOPQRSTUVW"\n'  # 2
        "port = 70000\n"  # 3
        "\n"  # 4
        "[worker]\n"  # 5
        "threads = 0\n"  # 6
        "\n"  # 7
        "[workers]\n"  # 8
        "count = 2\n"  # 9
        "\n"  # 10
        "[web]\n"  # 11
        'port = "11999"\n'  # 12
        "\n"  # 13
        "[database]\n"  # 14
        'url = "postgresql+psycopg://u:s3cret-Pw@h:abc/x"\n'  # 15
    )
    result = _check_option(config)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("configuration")]
    where = f"configuration error: {config}"
    assert errors == [
        f"{where}:2: [node.ae_title] an AE title is 1-16 characters of printable ASCII "
        "without backslash ('ABCDEFGHIJKLMNOPQRSTUVW' has 23 characters)",
        f"{where}:3: [node.port] Input should be less than or equal to 65535",
        f"{where}:6: [worker.threads] Input should be greater than or equal to 1",
        f"{where}:8: [workers] unknown table (did you mean [worker]?)",
        f"{where}:12: [web.port] expected an integer, got the string '11999' "
        "(write it without quotes)",
        f"{where}:15: [database.url] Value error, url is not a valid database URL: its port "
        "is not a number (dialect+driver://user:password@host:port/database)",
    ], result.stderr
    assert "s3cret-Pw" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_watermark_above_the_storage_file_system_is_warned_of(tmp_path: Path) -> None:
    """min_free_bytes above the whole file system refuses every C-STORE: check-config says
    so (a warning: the storage may be mounted later), and not for a watermark that fits."""
    import shutil as disk

    total = disk.disk_usage(tmp_path).total
    config = tmp_path / "dicomnode.toml"
    base = (
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n\n'
        f'[models]\nfolders = ["{REPO / "models"}"]\n\n'
        f'[storage]\npath = "{tmp_path / "storage"}"\n'
    )
    config.write_text(base + f"min_free_bytes = {total + 1}\n")
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert re.search(
        rf"warning: \[storage\] min_free_bytes = {total + 1} is more than the whole file "
        rf"system of {re.escape(str(tmp_path / 'storage'))} \({total} bytes",
        result.stderr,
    ), result.stderr
    config.write_text(base + f"min_free_bytes = {total // 2}\n")
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert "min_free_bytes" not in result.stderr, result.stderr


def test_a_postgresql_server_that_takes_no_connection_is_warned_of(tmp_path: Path) -> None:
    """A PostgreSQL URL whose server refuses the connection: check-config says so in one
    warning without the password (before it said OK, and the admin learnt it from serve's
    start failing); the configuration is still valid (exit 0). A reachable one: no warning."""
    from conftest import POSTGRES_URL, free_port, require_postgres

    require_postgres()
    config = tmp_path / "dicomnode.toml"
    base = f'[models]\nfolders = ["{REPO / "models"}"]\n\n[storage]\npath = "{tmp_path / "s"}"\n\n'
    down = f"postgresql+psycopg://dicomnode:s3cret-Pw@127.0.0.1:{free_port()}/dicomnode"
    config.write_text(base + f'[database]\nurl = "{down}"\n')
    result = _check(config)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "database unreachable" in line]
    assert line.startswith("warning: database unreachable: 127.0.0.1:"), line
    assert "serve and workers wait for it" in line
    assert "s3cret-Pw" not in result.stderr

    config.write_text(base + f'[database]\nurl = "{POSTGRES_URL}"\n')
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert "database" not in result.stderr, result.stderr
