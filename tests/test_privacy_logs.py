"""Default logs carry no patient data: a full store, analysis, export and worklist round trip
(plus a refused, malformed copy and a failed export attempt) with a phantom whose name, ID
and birth date are known, then the node's whole log output is scanned for them. A second
phantom's name has a single component ("SMITH JOHN" style, no "^"): highdicom and pydicom
warn about such a name, quoting it, and those warnings stay out of the log too."""

from __future__ import annotations

import re

import httpx
import pydicom
from conftest import StoreSCP, start_node, stop_node, wait_for, write_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.synth.cxr import make_cxr

NAME, PATIENT_ID, BIRTH_DATE = "Privacyprobe^Zelda", "PRIV-77311", "19310517"
ONE_PART_NAME, ONE_PART_ID = "PRIVACYPROBE YOLANDA", "PRIV-77312"


def _probe(seed: int = 940_001, name: str = NAME, patient_id: str = PATIENT_ID) -> Dataset:
    ds, _ = make_cxr(seed, pneumothorax=True, size=128, patient_id=patient_id)
    ds.PatientName = name
    ds.PatientBirthDate = BIRTH_DATE
    return ds


def exported_studies(pacs: StoreSCP) -> set[str]:
    """The Study Instance UIDs of the objects ``pacs`` has received (a file storescp is
    still writing may not read yet: it counts at the next look)."""
    studies = set()
    for path in pacs.received():
        try:
            ds = pydicom.dcmread(path, specific_tags=["StudyInstanceUID"])
        except Exception:
            continue
        studies.add(str(ds.get("StudyInstanceUID", "")))
    return studies


def test_node_logs_carry_no_patient_name_id_or_birth_date(tmp_path, pacs: StoreSCP) -> None:
    config, port, web_port = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}", destinations=[pacs], listeners=1
    )
    # One listener (the three sends come one after another; each listener more costs the
    # node's start ~1 s of CPU) and the studies analysed 0.1 s after their association.
    config.write_text(config.read_text().replace("quiet_seconds = 0.5", "quiet_seconds = 0.1"))
    node = start_node(tmp_path, config, port, web_port)
    try:
        ds = _probe()
        good = tmp_path / "probe.dcm"
        ds.save_as(good, enforce_file_format=True)
        assert node.storescu(good).returncode == 0
        # The same patient again, pixel data short of Rows x Columns: refused and logged.
        bad = _probe()
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        bad.Rows = 4096
        bad_path = tmp_path / "bad.dcm"
        bad.save_as(bad_path, enforce_file_format=True)
        node.storescu(bad_path)
        one_part = tmp_path / "one_part.dcm"
        second = _probe(940_002, ONE_PART_NAME, ONE_PART_ID)
        second.save_as(one_part, enforce_file_format=True)
        assert node.storescu(one_part).returncode == 0
        uid = str(ds.StudyInstanceUID)
        # Both studies' result objects written and exported (the second's name is quoted
        # by the libraries' warnings as they are written), not only the first's.
        studies = {uid, str(second.StudyInstanceUID)}
        wait_for(
            lambda: studies <= exported_studies(pacs), timeout=120, what="both studies exported"
        )
        rows = node.worklist()
        assert any(r["patient_id"] == PATIENT_ID for r in rows)  # the API shows it, logs do not
        study = httpx.get(f"{node.web}/api/studies/{uid}", headers=node.headers, timeout=10)
        assert study.status_code == 200
    finally:
        stop_node(node)
    log = node.log.read_text()
    # The log did get written, refusal reason included.
    assert "cannot understand: Pixel Data has" in log and "refused=1" in log
    secrets = (NAME, "Privacyprobe", "PRIVACYPROBE", "Zelda", "YOLANDA", PATIENT_ID, ONE_PART_ID)
    for secret in (*secrets, BIRTH_DATE, "1931-05-17"):
        assert secret not in log, f"{secret!r} found in the node log"
    # Libraries' narration stays out of the default log (highdicom logged ~60 INFO lines per
    # study, one per module it copied into a result object): every INFO line is the node's.
    speakers = set(re.findall(r"^\S+ INFO ([\w.]+): ", log, re.MULTILINE))
    assert "dicomnode.worker" in speakers
    assert {s for s in speakers if not s.startswith(("dicomnode", "uvicorn"))} == set()
