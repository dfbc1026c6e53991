"""setup_logging keeps patient data and secrets out of the default log: Python warnings (which
pydicom and highdicom fill with the values they doubt, a patient's name among them) and
pydicom's own warning log lines are shown only with debug on, and httpx does not narrate its
requests (URLs with a webhook's token) at INFO.

Each case runs in a fresh interpreter, as serve, worker and listener processes do: pytest
itself records warnings, so only a process of its own shows what reaches stderr."""

from __future__ import annotations

import subprocess
import sys
import textwrap

NAME = "SMITH JOHN"
BIRTH_DATE = "1931-05-17x"


def _run(level: str, body: str) -> subprocess.CompletedProcess[str]:
    probe = f"from dicomnode.logs import setup_logging\nsetup_logging({level!r})\n" + (
        textwrap.dedent(body)
    )
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )


WARN = f"""
import warnings
warnings.warn('The string "{NAME}" is unlikely to represent the intended person name')
print("done")
"""

HIGHDICOM = f"""
import numpy as np
import highdicom as hd
from pydicom.uid import generate_uid
from pydicom.valuerep import PersonName

hd.valuerep.check_person_name({NAME!r})
image = hd.sc.SCImage(
    pixel_array=np.zeros((8, 8), dtype=np.uint8),
    photometric_interpretation="MONOCHROME2",
    bits_allocated=8,
    coordinate_system="PATIENT",
    study_instance_uid=generate_uid(),
    series_instance_uid=generate_uid(),
    sop_instance_uid=generate_uid(),
    series_number=1,
    instance_number=1,
    manufacturer="dicomnode",
    patient_id="PRIV-1",
    patient_name={NAME!r},
    patient_orientation=("L", "P"),
)
# pydicom validates as it is told to: warn_and_log logs and warns the value it refused.
from pydicom import config
from pydicom.dataset import Dataset
config.settings.writing_validation_mode = config.WARN
Dataset().PatientBirthDate = {BIRTH_DATE!r}
print("done", image.PatientName)
"""


def test_a_warning_quoting_a_patient_name_stays_out_of_the_default_log() -> None:
    result = _run("INFO", WARN)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"
    assert NAME not in result.stderr
    assert result.stderr == ""


def test_with_debug_on_warnings_are_logged() -> None:
    result = _run("DEBUG", WARN)
    assert result.returncode == 0, result.stderr[-2000:]
    # Through logging (the node's line format), not Python's bare warning print-out.
    assert "WARNING py.warnings: " in result.stderr
    assert NAME in result.stderr


def test_highdicom_and_pydicom_warnings_about_a_value_do_not_leak() -> None:
    result = _run("INFO", HIGHDICOM)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done" in result.stdout
    for secret in (NAME, "SMITH", "JOHN", BIRTH_DATE):
        assert secret not in result.stderr, result.stderr[-2000:]
    # ...and they are what the debug log shows.
    debug = _run("DEBUG", HIGHDICOM)
    assert debug.returncode == 0, debug.stderr[-2000:]
    assert NAME in debug.stderr and BIRTH_DATE in debug.stderr


def test_warnings_level_log_lines_still_appear() -> None:
    """Quieting the warning sources leaves the node's own warnings (and other libraries')
    where they were."""
    result = _run(
        "INFO",
        """
        import logging
        logging.getLogger("dicomnode.worker").warning("job 1 failed")
        logging.getLogger("dicomnode.worker").info("job 2 done")
        """,
    )
    assert "WARNING dicomnode.worker: job 1 failed" in result.stderr
    assert "INFO dicomnode.worker: job 2 done" in result.stderr


def test_httpx_does_not_log_request_urls_at_info() -> None:
    result = _run(
        "INFO",
        """
        import httpx
        transport = httpx.MockTransport(lambda request: httpx.Response(401))
        with httpx.Client(transport=transport) as client:
            client.post("http://hooks.example/critical?token=SECRET-TOKEN-1", json={})
        print("done")
        """,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SECRET-TOKEN-1" not in result.stderr
    assert "/critical" not in result.stderr
