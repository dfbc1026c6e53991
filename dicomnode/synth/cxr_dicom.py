"""DICOM datasets around phantom pixels: DX For Presentation or CR Image, any view, 8..16 bits.

Transfer syntaxes: Explicit VR Little Endian; JPEG Baseline (8-bit samples only, encoded with
Pillow, lossy); JPEG 2000 lossless (pydicom's encoder on pylibjpeg-openjpeg).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from dicomnode.synth.header import phantom_header

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SOP_CLASSES = {"DX": DX_FOR_PRESENTATION, "CR": CR_IMAGE}
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg2000": JPEG2000Lossless,
}
# Detector pixel pitch in mm: the shorter image side spans 43 cm.
DETECTOR_MM = 430.0

_UID_NAMESPACE = "dicomnode/synth/cxr/v1"
# View: (ViewPosition, SNOMED CT code, code meaning, PatientOrientation, description).
_VIEWS = {
    "PA": ("PA", "399348003", "postero-anterior", ["L", "F"], "PA"),
    "AP": ("AP", "399182009", "antero-posterior", ["L", "F"], "AP"),
    # Left lateral: the patient faces image left, so columns run towards the back.
    "LATERAL": ("LL", "399173006", "left lateral", ["P", "F"], "LATERAL"),
}


def uid(*parts: str) -> str:
    """A deterministic UID from ``parts``."""
    # JSON keeps part boundaries so that ("1", "23") and ("12", "3") differ.
    return str(generate_uid(entropy_srcs=[json.dumps([_UID_NAMESPACE, *parts])]))


def pixel_pitch(shape: tuple[int, int]) -> float:
    """Imager pixel spacing in mm for an image of ``shape``."""
    return round(DETECTOR_MM / min(shape), 6)


def check_encoding(bits: int, transfer_syntax: str) -> None:
    """Raise ValueError for a bit depth or transfer syntax the phantoms cannot be written in."""
    if not 8 <= bits <= 16:
        raise ValueError(f"bits (Bits Stored) must be 8..16, got {bits}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer syntax must be one of {', '.join(TRANSFER_SYNTAXES)}, "
            f"not {transfer_syntax!r}"
        )
    if transfer_syntax == "jpeg-baseline" and bits != 8:
        raise ValueError(
            "JPEG Baseline (1.2.840.10008.1.2.4.50) holds 8-bit samples only: use bits=8 "
            f"(got bits={bits}), or jpeg2000 / explicit for deeper images"
        )


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def chest_dataset(
    seed: int,
    pixels: np.ndarray,
    centre: float,
    width: float,
    *,
    bits: int,
    photometric: str,
    modality: str,
    view: str,
    patient_id: str,
    accession_number: str,
    study_instance_uid: str,
) -> pydicom.Dataset:
    """A chest radiograph dataset around ``pixels`` (MONOCHROME2 stored values of ``bits``).

    With the defaults of the original phantom (DX, PA, 12 bits) the attributes are unchanged.
    """
    rows, columns = pixels.shape
    max_value = 2**bits - 1
    sop_instance_uid = uid(str(seed), study_instance_uid, "image")
    series_instance_uid = uid(str(seed), study_instance_uid, "series")
    frame_of_reference = uid(str(seed), study_instance_uid, "frame-of-reference")
    if photometric == "MONOCHROME1":
        pixels = (max_value - pixels.astype(np.int64)).astype(pixels.dtype)
        centre = max_value - centre
    elif photometric != "MONOCHROME2":
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be DX or CR, not {modality!r}")
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {', '.join(_VIEWS)}, not {view!r}")
    sop_class = SOP_CLASSES[modality]
    view_position, view_code, view_meaning, orientation, description = _VIEWS[view]

    ds = phantom_header(
        seed,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance_uid,
        patient_name=f"PHANTOM^CXR^{seed}",
        patient_id=patient_id,
        study_instance_uid=study_instance_uid,
        accession_number=accession_number,
        study_description=f"XR CHEST {description}",
        modality=modality,
        series_instance_uid=series_instance_uid,
        series_number=1,
        series_description=f"CHEST {description}",
        model_name="cxr phantom",
    )
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        # Frame of reference (DX only; the CR Image IOD has no such module).
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
    # General image, image pixel, DX or CR image
    ds.InstanceNumber = 1
    ds.PatientOrientation = orientation
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if modality == "DX":
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher values mean less X-ray intensity (denser), as MONOCHROME2 displays bright.
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.WindowCenter = round(centre, 1)
    ds.WindowWidth = round(width, 1)
    ds.WindowCenterWidthExplanation = "SYNTHETIC"
    ds.VOILUTFunction = "LINEAR"
    pitch = pixel_pitch((rows, columns))
    if modality == "DX":
        # DX anatomy imaged, positioning, detector
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
        ds.ViewPosition = view_position
        ds.ViewCodeSequence = Sequence([_code(view_code, "SCT", view_meaning)])
        ds.PatientPosition = ""
        ds.PositionerType = "NONE"
        ds.DetectorType = "DIRECT"
        ds.ImagerPixelSpacing = [pitch, pitch]
        ds.DistanceSourceToDetector = 1800
        ds.DistanceSourceToPatient = 1650
        ds.EstimatedRadiographicMagnificationFactor = round(1800 / 1650, 6)
        ds.AcquisitionContextSequence = Sequence()
    else:
        # CR series and CR image: view, plate and exposure.
        ds.ViewPosition = view_position
        ds.ImagerPixelSpacing = [pitch, pitch]
        ds.PlateID = f"PLATE{seed % 1000:03d}"
        ds.KVP = 110 if view != "LATERAL" else 120
        ds.DistanceSourceToDetector = 1800
        ds.ExposureTime = 10
        ds.XRayTubeCurrent = 250
    dtype = "<u2" if ds.BitsAllocated == 16 else "u1"
    ds.PixelData = pixels.astype(dtype).tobytes()
    return ds


def encode(ds: pydicom.Dataset, transfer_syntax: str) -> pydicom.Dataset:
    """Re-encode the pixel data of ``ds`` in place in ``transfer_syntax``; returns ``ds``."""
    if transfer_syntax == "explicit":
        return ds
    check_encoding(int(ds.BitsStored), transfer_syntax)
    pixels = ds.pixel_array
    if transfer_syntax == "jpeg-baseline":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
        frame = buffer.getvalue()
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = round(pixels.nbytes / len(frame), 2)
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        return ds
    ds.compress(TRANSFER_SYNTAXES[transfer_syntax], pixels)
    return ds
