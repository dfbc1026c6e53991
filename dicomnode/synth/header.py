"""The DICOM header every synthetic phantom shares (CT slices and chest radiographs).

File meta, SOP common, patient, general study, general series and general equipment modules,
and the dates and times of the general image module, all derived from the phantom's seed: the
study date and time, the patient's birth date and sex are the same for every image of a seed.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

MANUFACTURER = "dicomnode synth"


def phantom_header(
    seed: int,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    patient_name: str,
    patient_id: str,
    study_instance_uid: str,
    accession_number: str,
    study_description: str,
    modality: str,
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    model_name: str,
) -> pydicom.Dataset:
    """A dataset (Explicit VR Little Endian file meta) with the modules every phantom shares.

    The caller adds the image's own modules: frame of reference, general image (Instance
    Number, Image Type, orientation), image pixel and the modality's image module.
    """
    rng = np.random.default_rng([seed, 7])
    study_date = (dt.date(2024, 1, 1) + dt.timedelta(days=seed % 700)).strftime("%Y%m%d")
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))
    study_time = f"{8 + seed % 10:02d}{seed % 60:02d}{(seed // 60) % 60:02d}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    # SOP common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = study_time
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "F" if rng.random() < 0.5 else "M"
    # General study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.StudyID = f"S{seed % 100000:05d}"
    ds.StudyDescription = study_description
    # General series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = study_date
    ds.SeriesTime = study_time
    ds.BodyPartExamined = "CHEST"
    # General equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model_name
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "dicomnode"
    ds.StationName = "SYNTH"
    # General image: its dates and times, no burnt-in text, not lossy
    ds.ContentDate = study_date
    ds.ContentTime = study_time
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = study_time
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds
