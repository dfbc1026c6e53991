"""Default logs carry no patient data: a full store, analysis, export and worklist round trip
(plus a refused, malformed copy and a failed export attempt) with a phantom whose name, ID
and birth date are known, then the node's whole log output is scanned for them."""

from __future__ import annotations

import re

import httpx
from conftest import StoreSCP, start_node, stop_node, wait_for, write_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.synth.cxr import make_cxr

NAME, PATIENT_ID, BIRTH_DATE = "Privacyprobe^Zelda", "PRIV-77311", "19310517"


def _probe() -> Dataset:
    ds, _ = make_cxr(940_001, pneumothorax=True, size=128, patient_id=PATIENT_ID)
    ds.PatientName = NAME
    ds.PatientBirthDate = BIRTH_DATE
    return ds


def test_node_logs_carry_no_patient_name_id_or_birth_date(tmp_path, pacs: StoreSCP) -> None:
    config, port, web_port = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}", destinations=[pacs]
    )
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
        uid = str(ds.StudyInstanceUID)
        wait_for(lambda: len(pacs.received()) >= 2, timeout=90, what="SR and overlay exported")
        rows = node.worklist()
        assert any(r["patient_id"] == PATIENT_ID for r in rows)  # the API shows it, logs do not
        study = httpx.get(f"{node.web}/api/studies/{uid}", headers=node.headers, timeout=10)
        assert study.status_code == 200
    finally:
        stop_node(node)
    log = node.log.read_text()
    # The log did get written, refusal reason included.
    assert "cannot understand: Pixel Data has" in log and "refused=1" in log
    for secret in (NAME, "Privacyprobe", "Zelda", PATIENT_ID, BIRTH_DATE, "1931-05-17"):
        assert secret not in log, f"{secret!r} found in the node log"
    # Libraries' narration stays out of the default log (highdicom logged ~60 INFO lines per
    # study, one per module it copied into a result object): every INFO line is the node's.
    speakers = set(re.findall(r"^\S+ \S+ INFO ([\w.]+): ", log, re.MULTILINE))
    assert "dicomnode.worker" in speakers
    assert {s for s in speakers if not s.startswith(("dicomnode", "uvicorn"))} == set()
