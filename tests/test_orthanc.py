"""Every result kind, exported by C-STORE to a real Orthanc, arrives and parses there."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import free_port
from dciodvfy import chest_xray, ct_series

from dicomnode.config import Destination
from dicomnode.export.scu import send_file
from dicomnode.findings import (
    Algorithm,
    CodedConcept,
    DerivedImage,
    Finding,
    ImageFindings,
    Segment,
    Segmentation,
)
from dicomnode.results import (
    build_derived,
    build_gsps,
    build_kos,
    build_overlay,
    build_seg,
    build_sr,
)

ORTHANC = Path("/usr/sbin/Orthanc")
ALGORITHM = Algorithm(name="orthanc-export-demo", version="1.0.0")
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
NODULE = CodedConcept("27925004", "SCT", "Nodule")
LUNG = CodedConcept("39607008", "SCT", "Lung structure")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Destination, str]]:
    """A private Orthanc (Debian package) on free ports; its Destination and REST base URL."""
    if not ORTHANC.exists():
        if os.environ.get("CI"):  # scripts/test.sh installs it: on CI its absence is a failure
            pytest.fail(f"{ORTHANC} not installed (apt-get install orthanc)")
        pytest.skip(f"{ORTHANC} not installed (apt-get install orthanc)")
    folder = tmp_path_factory.mktemp("orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "dicomnode-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "Plugins": [],
        "StorageCompression": False,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": False,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    process = subprocess.Popen(
        [str(ORTHANC), str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=folder
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited with {process.returncode}: {_tail(folder)}")
            try:
                if httpx.get(f"{base}/system", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer on {base} within 30 s: {_tail(folder)}")
            time.sleep(0.2)
        destination = Destination(
            name="orthanc", ae_title="ORTHANC", host="127.0.0.1", port=dicom_port
        )
        yield destination, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _tail(folder: Path) -> str:
    return (folder / "orthanc.log").read_text(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def radiograph() -> pydicom.Dataset:
    return chest_xray(31, size=128)


@pytest.fixture(scope="module")
def results(radiograph: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """One object of every kind the node writes, for one chest X-ray and one CT."""
    slices = ct_series(5)
    rows, columns = int(radiograph.Rows), int(radiograph.Columns)
    heat = np.zeros((rows, columns), dtype=np.float32)
    heat[20:60, 20:60] = 0.9
    evaluation = ImageFindings(
        radiograph,
        [
            Finding(PNEUMOTHORAX, 0.91, 0.5, critical=True, peak=(40.0, 40.0), heatmap=heat),
            Finding(NODULE, 0.8, 0.5, critical=False, box=(70.0, 70.0, 90.0, 95.0)),
        ],
    )
    lung = np.zeros((1, rows, columns), dtype=np.float32)
    lung[0, 15:110, 10:60] = 0.95
    ct_lung = np.zeros((len(slices), int(slices[0].Rows), int(slices[0].Columns)), np.float32)
    ct_lung[:, 10:38, 4:18] = 0.9
    made = {
        "sr": build_sr([evaluation], ALGORITHM),
        "overlay": build_overlay(evaluation, ALGORITHM, {"Lung": lung[0] >= 0.5}),
        "seg": build_seg(Segmentation([radiograph], [Segment(LUNG, lung)]), ALGORITHM),
        "seg-ct-fractional": build_seg(
            Segmentation(slices, [Segment(LUNG, ct_lung)]), ALGORITHM, fractional=True
        ),
        "gsps": build_gsps(evaluation, ALGORITHM),
        "derived": build_derived(
            DerivedImage(radiograph, radiograph.pixel_array * 0.9, "bone suppression"), ALGORITHM
        ),
    }
    same_study = [ds for ds in made.values() if ds.StudyInstanceUID == radiograph.StudyInstanceUID]
    made["kos"] = build_kos([radiograph], ALGORITHM, same_study)
    return made


EXPECTED_SOP_CLASSES = {
    "sr": "1.2.840.10008.5.1.4.1.1.88.34",
    "overlay": "1.2.840.10008.5.1.4.1.1.7",
    "seg": "1.2.840.10008.5.1.4.1.1.66.4",
    "seg-ct-fractional": "1.2.840.10008.5.1.4.1.1.66.4",
    "gsps": "1.2.840.10008.5.1.4.1.1.11.1",
    "derived": "1.2.840.10008.5.1.4.1.1.1.1",
    "kos": "1.2.840.10008.5.1.4.1.1.88.59",
}


def test_every_result_kind_arrives_in_orthanc_and_parses(
    orthanc: tuple[Destination, str], results: dict[str, pydicom.Dataset], tmp_path: Path
) -> None:
    destination, base = orthanc
    for kind, dataset in results.items():
        path = tmp_path / f"{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        send_file(path, destination, "DICOMNODE")
    with httpx.Client(base_url=base, timeout=10) as client:
        ids = client.get("/instances").json()
        assert len(ids) == len(results)
        stored = {}
        for orthanc_id in ids:
            tags = client.get(f"/instances/{orthanc_id}/tags", params={"simplify": ""}).json()
            stored[tags["SOPInstanceUID"]] = (orthanc_id, tags)
        for kind, dataset in results.items():
            assert dataset.SOPInstanceUID in stored, f"{kind} did not arrive in Orthanc"
            orthanc_id, tags = stored[dataset.SOPInstanceUID]
            assert tags["SOPClassUID"] == EXPECTED_SOP_CLASSES[kind] == dataset.SOPClassUID, kind
            assert tags["StudyInstanceUID"] == dataset.StudyInstanceUID
            assert tags["SeriesInstanceUID"] == dataset.SeriesInstanceUID
            assert tags["PatientID"] == dataset.PatientID
            # The stored file reads back whole: same object, pixel data where it has some.
            back = pydicom.dcmread(
                pydicom.filebase.DicomBytesIO(client.get(f"/instances/{orthanc_id}/file").content)
            )
            assert back.SOPInstanceUID == dataset.SOPInstanceUID
            if "PixelData" in dataset:
                assert back.PixelData == dataset.PixelData, kind
        seg_ct = stored[results["seg-ct-fractional"].SOPInstanceUID][1]
        assert int(seg_ct["NumberOfFrames"]) == 5
        assert seg_ct["SegmentationType"] == "FRACTIONAL"
        # One study holds the radiograph's results, one the CT's; nothing was refused.
        assert len(client.get("/studies").json()) == 2
        series = client.get("/series").json()
        assert len(series) == len(results)


def test_rerun_replaces_rather_than_duplicates(
    orthanc: tuple[Destination, str], radiograph: pydicom.Dataset, tmp_path: Path
) -> None:
    destination, base = orthanc
    evaluation = ImageFindings(radiograph, [Finding(PNEUMOTHORAX, 0.91, 0.5, critical=True)])
    with httpx.Client(base_url=base, timeout=10) as client:
        first = build_sr([evaluation], ALGORITHM)
        first.save_as(tmp_path / "first.dcm", enforce_file_format=True)
        send_file(tmp_path / "first.dcm", destination, "DICOMNODE")
        before = set(client.get("/instances").json())
        # A re-run of the same model on the same study, with a changed probability.
        evaluation.findings[0].probability = 0.88
        second = build_sr([evaluation], ALGORITHM)
        second.save_as(tmp_path / "second.dcm", enforce_file_format=True)
        send_file(tmp_path / "second.dcm", destination, "DICOMNODE")
        assert set(client.get("/instances").json()) == before
        # A new model version is a new series beside the old one.
        newer = build_sr([evaluation], Algorithm(ALGORITHM.name, "2.0.0"))
        newer.save_as(tmp_path / "newer.dcm", enforce_file_format=True)
        send_file(tmp_path / "newer.dcm", destination, "DICOMNODE")
        assert len(client.get("/instances").json()) == len(before) + 1
