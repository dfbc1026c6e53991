"""The walking skeleton, end to end with real peers: dcmtk storescu -> dicomnode -> dcmtk
storescp, on SQLite and on PostgreSQL."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pydicom
from conftest import RunningNode, StoreSCP, dcmtk, wait_for

from dicomnode.synth.cxr import make_cxr

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document


def _phantom(folder: Path, seed: int, pneumothorax: bool, accession: str) -> tuple[Path, str]:
    ds, _ = make_cxr(seed, pneumothorax=pneumothorax, accession_number=accession)
    path = folder / f"{accession}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


def test_echo(node: RunningNode) -> None:
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_pneumothorax_study_goes_to_top_and_results_reach_pacs(
    node: RunningNode, pacs: StoreSCP, tmp_path: Path
) -> None:
    normal, normal_uid = _phantom(
        tmp_path, seed=910_001, pneumothorax=False, accession="ACC-NORMAL"
    )
    critical, critical_uid = _phantom(
        tmp_path, seed=910_002, pneumothorax=True, accession="ACC-PTX"
    )

    sent = node.storescu(normal)
    assert sent.returncode == 0, sent.stderr
    sent = node.storescu(critical)
    assert sent.returncode == 0, sent.stderr

    # Both studies are durable on disk once acknowledged.
    assert list(node.storage.glob(f"{normal_uid}/*/*.dcm"))
    assert list(node.storage.glob(f"{critical_uid}/*/*.dcm"))

    def analysed() -> list[dict] | None:
        rows = node.worklist()
        done = [r for r in rows if r["analysis_status"] == "analysed"]
        return rows if len(done) == 2 else None

    rows = wait_for(analysed, timeout=90, what="both studies analysed")
    assert [r["study_instance_uid"] for r in rows] == [critical_uid, normal_uid]
    top = rows[0]
    assert top["priority"] == "critical"
    assert top["accession_number"] == "ACC-PTX"
    pneumothorax = [f for f in top["findings"] if f["code"] == "36118008"]
    assert pneumothorax and pneumothorax[0]["present"]
    assert pneumothorax[0]["probability"] > rows[1]["findings"][0]["probability"]
    assert rows[1]["priority"] == "routine"
    for row in rows:
        assert {
            "study_instance_uid",
            "accession_number",
            "patient_id",
            "modality",
            "priority",
            "score",
            "findings",
            "received_at",
            "status",
        } <= row.keys()

    # The HTML page lists the studies in the same order.
    page = httpx.get(f"{node.web}/worklist", headers=node.headers, timeout=10).text
    assert page.index(critical_uid) < page.index(normal_uid)
    assert "not for clinical use" in page.lower()

    # The PACS received (at least) an SR and an SC overlay per study, in the source studies,
    # and a Key Object Selection flagging the critical image (IHE AI Results).
    wanted = {
        normal_uid: {SR_STORAGE, SC_STORAGE},
        critical_uid: {SR_STORAGE, SC_STORAGE, KOS_STORAGE},
    }

    def delivered() -> list[pydicom.Dataset] | None:
        try:
            objects = [pydicom.dcmread(f) for f in pacs.received()]
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            return None  # storescp is still writing one: look again

        by_study: dict[str, set[str]] = {}
        for ds in objects:
            by_study.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPClassUID))
        done = set(by_study) == set(wanted) and all(
            wanted[uid] <= classes for uid, classes in by_study.items()
        )
        return objects if done else None

    objects = wait_for(delivered, timeout=60, what="SR, SC and KOS at the PACS")
    source_series = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
        for p in (normal, critical)
    }
    assert not source_series & {str(ds.SeriesInstanceUID) for ds in objects}
    sc = next(
        ds for ds in objects if ds.SOPClassUID == SC_STORAGE and ds.StudyInstanceUID == critical_uid
    )
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PatientID == pydicom.dcmread(critical, stop_before_pixels=True).PatientID


def test_cli_worklist_prints_table(node: RunningNode, tmp_path: Path) -> None:
    path, _ = _phantom(tmp_path, seed=910_003, pneumothorax=True, accession="ACC-CLI")
    assert node.storescu(path).returncode == 0
    wait_for(
        lambda: any(r["analysis_status"] == "analysed" for r in node.worklist()),
        timeout=90,
        what="analysis",
    )
    import sys

    table = subprocess.run(
        [sys.executable, "-m", "dicomnode", "worklist", "--config", str(node.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    assert "ACC-CLI" in table.stdout
    assert "not for clinical use" in table.stdout.lower()
