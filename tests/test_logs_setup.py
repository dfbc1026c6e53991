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


def _run_on_journal(
    tmp_path, level: str, body: str, journal_stream: str | None = None, json_lines: bool = False
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``_run``'s probe with stderr a file that ``JOURNAL_STREAM`` names (device:inode, as
    systemd sets it for a unit whose stderr is the journal), or ``journal_stream``; the
    process and what it wrote to stderr."""
    import os

    probe = "from dicomnode.logs import setup_logging\n"
    probe += f"setup_logging({level!r}, json_lines={json_lines!r})\n" + textwrap.dedent(body)
    stderr = tmp_path / "journal.txt"
    with stderr.open("w") as output:
        status = os.fstat(output.fileno())
        stream = journal_stream or f"{status.st_dev}:{status.st_ino}"
        result = subprocess.run(
            [sys.executable, "-c", probe],
            stdout=subprocess.PIPE,
            stderr=output,
            text=True,
            timeout=120,
            env={**os.environ, "JOURNAL_STREAM": stream},
        )
    return result, stderr.read_text()


EACH_LEVEL = """
import logging
worker = logging.getLogger("dicomnode.worker")
worker.debug("polling")
worker.info("job 2 done")
worker.warning("job 1 failed")
worker.error("export to PACS failed")
worker.critical("giving up")
try:
    1 / 0
except ZeroDivisionError:
    worker.exception("job 3 crashed")
"""


def test_on_the_journal_each_line_carries_its_priority_and_no_time(tmp_path) -> None:
    """sd-daemon(3) prefixes: ``journalctl -p err`` then shows the errors; the journal
    stamps the time, so the line has none of its own."""
    result, journal = _run_on_journal(tmp_path, "DEBUG", EACH_LEVEL)
    assert result.returncode == 0, journal[-2000:]
    lines = journal.splitlines()
    assert lines[:6] == [
        "<7>DEBUG dicomnode.worker: polling",
        "<6>INFO dicomnode.worker: job 2 done",
        "<4>WARNING dicomnode.worker: job 1 failed",
        "<3>ERROR dicomnode.worker: export to PACS failed",
        "<3>CRITICAL dicomnode.worker: giving up",
        "<3>ERROR dicomnode.worker: job 3 crashed",
    ]
    # The traceback's lines are the error's too, not info lines of their own.
    assert lines[6] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ZeroDivisionError: division by zero"
    assert all(line.startswith("<3>") for line in lines[6:])


def test_json_lines_on_the_journal_carry_the_priority(tmp_path) -> None:
    import json

    body = 'import logging\nlogging.getLogger("dicomnode").warning("disk %d%% full", 91)\n'
    result, journal = _run_on_journal(tmp_path, "INFO", body, json_lines=True)
    assert result.returncode == 0, journal[-2000:]
    line = journal.splitlines()[-1]
    assert line.startswith("<4>{")
    assert json.loads(line.removeprefix("<4>"))["message"] == "disk 91% full"


def test_a_journal_stream_that_is_not_stderr_leaves_the_lines_as_they_were(tmp_path) -> None:
    """A process started by the service with its stderr sent elsewhere inherits
    ``JOURNAL_STREAM``; its lines stay plain, with their time."""
    result, journal = _run_on_journal(tmp_path, "INFO", EACH_LEVEL, journal_stream="1:2")
    assert result.returncode == 0, journal[-2000:]
    assert "<" not in journal.splitlines()[0]
    assert " INFO dicomnode.worker: job 2 done" in journal
    assert journal.splitlines()[0][:4].isdigit()  # the asctime


CONNECT_TO_NOTHING = """
import logging
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from dicomnode.ports import free_port

ae = AE(ae_title="DICOMNODE")
ae.add_requested_context(Verification)
assoc = ae.associate("127.0.0.1", free_port(), ae_title="PACS")
print("established" if assoc.is_established else "refused")
logging.getLogger("pynetdicom.assoc").error("Received an invalid C-STORE response")
"""
CONNECT_ERRORS = (
    "Association request failed: unable to connect to remote",
    "TCP Initialisation Error: [Errno 111] Connection refused",
)


def test_pynetdicoms_connect_errors_show_only_with_debug_on() -> None:
    """They name no destination, two per failed try; the export code's WARNING names it."""
    result = _run("INFO", CONNECT_TO_NOTHING)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "refused"
    for message in CONNECT_ERRORS:
        assert message not in result.stderr, result.stderr
    # pynetdicom's other errors are still shown.
    assert "ERROR pynetdicom.assoc: Received an invalid C-STORE response" in result.stderr
    debug = _run("DEBUG", CONNECT_TO_NOTHING)
    assert debug.returncode == 0, debug.stderr[-2000:]
    for message in CONNECT_ERRORS:
        assert f"DEBUG pynetdicom.transport: {message}" in debug.stderr, debug.stderr[-3000:]


# pydicom's non-conformant 12-bit JPEG: libjpeg and Pillow each fail on it.
UNDECODABLE_JPEG = """
import pydicom
from pydicom.data import get_testdata_file
from dicomnode.pipeline.decode import DecodeError, first_frame

ds = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
for _ in range(2):
    try:
        first_frame(ds)
    except DecodeError as error:
        print("reason:", error)
"""


def test_a_decoding_plugins_failure_is_not_an_error_line_unless_debugging() -> None:
    """pydicom logs each plugin that fails to decode a frame as an ERROR with a traceback (a
    corrupt image's preview, asked for again, logged two each time); the node's DecodeError
    names every plugin's reason, so those lines show only with debug on."""
    quiet = _run("INFO", UNDECODABLE_JPEG)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.count("reason:") == 2 and "libjpeg" in quiet.stdout, quiet.stdout
    assert quiet.stderr == "", quiet.stderr
    debug = _run("DEBUG", UNDECODABLE_JPEG)
    assert "Traceback" in debug.stderr and "DEBUG pydicom.pixels.decoders.base" in debug.stderr
