"""Test data for Query/Retrieve: real DICOM files in the storage root and their index rows.

Written directly (not through the store) so the Q/R tests stand alone; the
layout is the store's: <STORAGE_DIR>/<study>/<series>/<sop>.dcm.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from django.conf import settings
from django.utils import timezone
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.models import Instance, Patient, Series, Study


def _dataset(source: str, **attributes) -> Dataset:
    dataset = dcmread(get_testdata_file(source))
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def add_instance(
    *,
    patient_id: str = "PID1",
    patient_name: str = "DOE^JANE",
    birth_date: str = "19700101",
    sex: str = "F",
    study_uid: str | None = None,
    study_date: str = "20240115",
    study_time: str = "101500",
    accession: str = "ACC1",
    study_description: str = "",
    charset: str = "",
    series_uid: str | None = None,
    modality: str = "CT",
    series_number: int = 1,
    instance_number: int = 1,
    source: str = "CT_small.dcm",
) -> Instance:
    """Write one instance file and index it, creating its patient, study and series rows as needed."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    attributes = dict(
        PatientID=patient_id,
        PatientName=patient_name,
        PatientBirthDate=birth_date,
        PatientSex=sex,
        StudyInstanceUID=study_uid,
        StudyDate=study_date,
        StudyTime=study_time,
        AccessionNumber=accession,
        SeriesInstanceUID=series_uid,
        Modality=modality,
        SeriesNumber=series_number,
        InstanceNumber=instance_number,
        SOPInstanceUID=generate_uid(),
    )
    if charset:
        attributes["SpecificCharacterSet"] = charset
    dataset = _dataset(source, **attributes)
    relative = f"{study_uid}/{series_uid}/{dataset.SOPInstanceUID}.dcm"
    path = Path(settings.STORAGE_DIR) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    content = path.read_bytes()
    now = timezone.now()
    patient, _ = Patient.objects.get_or_create(
        patient_id=patient_id,
        issuer_of_patient_id="",
        defaults={"patient_name": patient_name, "patient_birth_date": birth_date, "patient_sex": sex},
    )
    study, _ = Study.objects.get_or_create(
        study_instance_uid=study_uid,
        defaults={
            "patient": patient,
            "study_date": study_date,
            "study_time": study_time,
            "accession_number": accession,
            "study_description": study_description,
            "specific_character_set": charset,
            "received_at": now,
        },
    )
    series, _ = Series.objects.get_or_create(
        series_instance_uid=series_uid,
        defaults={"study": study, "modality": modality, "series_number": series_number, "received_at": now},
    )
    return Instance.objects.create(
        sop_instance_uid=dataset.SOPInstanceUID,
        series=series,
        sop_class_uid=dataset.SOPClassUID,
        instance_number=instance_number,
        transfer_syntax_uid=dataset.file_meta.TransferSyntaxUID,
        rows=dataset.get("Rows"),
        columns=dataset.get("Columns"),
        bits_allocated=dataset.get("BitsAllocated"),
        path=relative,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        received_at=now,
    )


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set, without preamble and meta information: what goes over the wire."""
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]
