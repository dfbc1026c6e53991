"""Test helpers for result objects: dciodvfy (dicom3tools) validation and source chest X-rays."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


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


def chest_xray(seed: int = 0, *, size: int = 256, study_instance_uid: str | None = None) -> Dataset:
    """A DX chest X-ray: the synthetic phantom when dicomnode.synth has it, else a plain one."""
    try:
        from dicomnode.synth.cxr import make_cxr
    except ImportError:
        return plain_dx(seed, rows=size, columns=size, study_instance_uid=study_instance_uid)
    return make_cxr(seed, pneumothorax=True, size=size, study_instance_uid=study_instance_uid)[0]


def plain_dx(
    seed: int = 0,
    *,
    rows: int = 256,
    columns: int = 256,
    study_instance_uid: str | None = None,
) -> Dataset:
    """A dciodvfy-valid DX For Presentation image with a smooth pattern of any size."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Test^Patient"
    ds.PatientID = f"P{seed:06d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = f"A{seed:06d}"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "test"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate, ds.ContentTime = "20240101", "120000"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.DetectorType = "DIRECT"
    ds.ImageLaterality = "U"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
    ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
    ds.PositionerType = "NONE"
    ds.AcquisitionContextSequence = []
    row, column = np.mgrid[0:rows, 0:columns]
    pattern = 1500 + 800 * np.sin(column / 17.0) * np.cos(row / 23.0)
    pixels = pattern + rng.normal(0, 50, (rows, columns))
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    return ds


def ct_series(
    slices: int = 6,
    *,
    rows: int = 48,
    columns: int = 40,
    thickness: float = 2.5,
    seed: int = 0,
    study_instance_uid: str | None = None,
) -> list[Dataset]:
    """A dciodvfy-valid axial CT series, slices in order of table position (head first).

    A body-like ellipse of soft tissue with two air-filled "lungs" and a small nodule in the
    middle slices; stored values with a -1024 rescale intercept and a lung window.
    """
    rng = np.random.default_rng(seed)
    study_uid = study_instance_uid or generate_uid()
    series_uid, frame_of_reference = generate_uid(), generate_uid()
    row, column = np.mgrid[0:rows, 0:columns]
    y, x = (row - rows / 2) / (rows / 2), (column - columns / 2) / (columns / 2)
    body = x**2 / 0.9**2 + y**2 / 0.75**2 <= 1
    lungs = ((x + 0.42) ** 2 / 0.3**2 + y**2 / 0.5**2 <= 1) | (
        (x - 0.42) ** 2 / 0.3**2 + y**2 / 0.5**2 <= 1
    )
    spacing = 350.0 / columns
    series = []
    for index in range(slices):
        hounsfield = np.full((rows, columns), -1000.0)
        hounsfield[body] = 40.0
        hounsfield[lungs] = -850.0
        if abs(index - (slices - 1) / 2) < 1.5:
            nodule = (x + 0.42) ** 2 + (y + 0.1) ** 2 <= 0.1**2
            hounsfield[nodule] = 20.0
        hounsfield += rng.normal(0, 10, (rows, columns))
        ds = plain_dx(seed, rows=rows, columns=columns, study_instance_uid=study_uid)
        for keyword in (
            "PresentationIntentType",
            "PixelIntensityRelationship",
            "PixelIntensityRelationshipSign",
            "PresentationLUTShape",
            "ImagerPixelSpacing",
            "DetectorType",
            "ImageLaterality",
            "ViewPosition",
            "AnatomicRegionSequence",
            "ViewCodeSequence",
            "PositionerType",
            "AcquisitionContextSequence",
            "PatientOrientation",
            "LossyImageCompression",
            "RescaleType",
        ):
            delattr(ds, keyword)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CT_IMAGE
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.KVP = 120
        ds.SliceThickness = thickness
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-175.0, -150.0, -index * thickness]
        ds.SliceLocation = -index * thickness
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = np.clip(hounsfield + 1024, 0, 4095).astype(np.uint16).tobytes()
        series.append(ds)
    return series


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
