"""A start that fails leaves nothing behind: ``dicomnode serve`` refused for its
configuration or its database removes the Prometheus folder it made in the temporary
folder (under systemd's Restart=on-failure, one failed start every 5 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

from dicomnode.ports import free_port


def _serve(config: Path, temporary: Path) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items()}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)  # serve makes its own
    environment["TMPDIR"] = str(temporary)
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=config.parent,
        env=environment,
    )


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        pytest.param(
            lambda text, folder: text.replace("[web]\n", "[web]\nbogus = 1\n"),
            2,
            "[web.bogus] Extra inputs are not permitted",
            id="invalid-file",
        ),
        pytest.param(
            lambda text, folder: text.replace(
                f'path = "{folder / "storage"}"', f'path = "{folder / "a-file" / "storage"}"'
            ),
            2,
            "[storage.path]",
            id="check-refused",
        ),
        pytest.param(
            lambda text, folder: text.replace(
                f"sqlite:///{folder / 'db.sqlite'}",
                f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x",
            ),
            1,
            "database unreachable",
            id="database-down",
        ),
    ],
)
def test_a_failed_start_leaves_no_metrics_folder(tmp_path: Path, change, status, message) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config, _, _ = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    config.write_text(change(config.read_text(), tmp_path))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = _serve(config, temporary)
    assert result.returncode == status, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert list(temporary.glob("dicomnode-*")) == []
