"""A large Multi-frame Grayscale Word Secondary Capture file, written frame by frame.

For ingest tests and benchmarks: the pixel data is never whole in memory, so an instance of a
gigabyte costs this process one frame.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


def write_multiframe_word_sc(
    path: Path, side: int, frames: int, frame: bytes, patient_id: str, patient_name: str = ""
) -> Path:
    """Write ``frames`` copies of ``frame`` (``side`` x ``side`` 16-bit stored values) as one
    instance with new study, series and SOP instance UIDs to ``path``; returns ``path``."""
    if len(frame) != side * side * 2:
        raise ValueError(f"a frame of {side} x {side} x 16 bit has {side * side * 2} bytes")
    ds = Dataset()
    ds.SOPClassUID = MULTIFRAME_WORD_SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    if patient_name:
        ds.PatientName = patient_name
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_WORD_SC
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    with open(path, "ab") as handle:
        # (7FE0,0010) OW in explicit VR little endian: tag, VR, reserved, 32-bit length.
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(frame) * frames))
        for _ in range(frames):
            handle.write(frame)
    return path
