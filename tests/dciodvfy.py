"""Test helper: validate a Dataset with dciodvfy (dicom3tools) and return its error lines."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pydicom
import pytest

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


def dciodvfy_errors(dataset: pydicom.Dataset) -> list[str]:
    """Write ``dataset`` to a temporary file, run dciodvfy on it and return its error lines."""
    if not Path(DCIODVFY).is_file():
        pytest.skip(
            f"dciodvfy not found at {DCIODVFY}: install the Debian package dicom3tools "
            "to validate DICOM IODs"
        )
    with tempfile.TemporaryDirectory(prefix="dciodvfy-") as folder:
        path = Path(folder) / "instance.dcm"
        dataset.save_as(path, enforce_file_format=True)
        completed = subprocess.run(
            [DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False
        )
    lines = (completed.stdout + completed.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
