"""Data set attributes -> index rows (patient, study, series, instance).

Called by store.save() inside its transaction. Rows are found or created
with get_or_create, which on PostgreSQL waits on a concurrent insert of the
same UID and then reads the winner's row, and on SQLite runs under the
IMMEDIATE write lock: two associations sending the same study at once
create it once.
"""

from __future__ import annotations

import functools
from datetime import datetime

from django.db import IntegrityError, connection, models, transaction
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.models import AuditEvent, Instance, Patient, Series, Study

# Read from each file's header; nothing else is parsed (never the pixel data).
KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "SeriesDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "ContentTime",
    "AccessionNumber",
    "Modality",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "BodyPartExamined",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
)
HEADER_TAGS = tuple(tag_for_keyword(keyword) for keyword in KEYWORDS)


# Values read straight from a raw element's bytes when they need no decoding: these VRs hold text
# whose ASCII bytes decode the same under every character set (PS3.5 6.1), unless an escape starts ISO 2022.
_PLAIN_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "PN", "SH", "TM", "UI"})


@functools.lru_cache(maxsize=256)
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    return tag, dictionary_VR(tag)


def _raw(dataset: Dataset, keyword: str) -> tuple[bytes, str, RawDataElement] | None:
    """(value bytes, VR, element) while the element is still as read from the file; None otherwise."""
    tag, vr = _tag_and_vr(keyword)
    element = dataset.get_item(tag)
    if not isinstance(element, RawDataElement) or not isinstance(element.value, bytes):
        return None
    return element.value, element.VR or vr, element


def text(dataset: Dataset, keyword: str, limit: int) -> str:
    """An attribute as the index stores it: a DICOM string, multi-values joined by '\\', cut to fit.

    Plain ASCII text is taken from the raw bytes (what pydicom would make of them, without its
    per-element conversion, which costs more than the rest of indexing an instance).
    """
    raw = _raw(dataset, keyword)
    if raw is not None and raw[1] in _PLAIN_TEXT_VRS and raw[0].isascii() and b"\x1b" not in raw[0]:
        return raw[0].decode("ascii").strip("\0 ")[:limit]
    try:
        value = dataset.get(keyword)
    except Exception:  # a malformed value must not stop indexing the rest
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(part) for part in value)
    return str(value).strip("\0 ")[:limit]


def number(dataset: Dataset, keyword: str) -> int | None:
    """An IS/US attribute as an int, or None when absent or not a number (the first of several)."""
    raw = _raw(dataset, keyword)
    if raw is not None:
        value, vr, element = raw
        if vr == "US" and len(value) >= 2:
            return int.from_bytes(value[:2], "little" if element.is_little_endian else "big")
        if vr == "IS" and value.isascii():
            first = value.split(b"\\", 1)[0].strip(b"\0 ")
            if first.isdigit():
                return int(first)
    try:
        value = dataset.get(keyword)
        if isinstance(value, MultiValue | list | tuple):
            value = value[0] if value else None
        return None if value in (None, "") else int(value)
    except Exception:
        return None


def patient_fields(dataset: Dataset) -> dict:
    return {
        "patient_name": text(dataset, "PatientName", 324),
        "patient_birth_date": text(dataset, "PatientBirthDate", 8),
        "patient_sex": text(dataset, "PatientSex", 16),
    }


def study_fields(dataset: Dataset) -> dict:
    return {
        "study_date": text(dataset, "StudyDate", 8),
        "study_time": text(dataset, "StudyTime", 16),
        "accession_number": text(dataset, "AccessionNumber", 16),
        "study_id": text(dataset, "StudyID", 16),
        "study_description": text(dataset, "StudyDescription", 64),
        "referring_physician_name": text(dataset, "ReferringPhysicianName", 324),
        "specific_character_set": text(dataset, "SpecificCharacterSet", 128),
    }


def series_fields(dataset: Dataset) -> dict:
    return {
        "modality": text(dataset, "Modality", 16),
        "series_number": number(dataset, "SeriesNumber"),
        "series_description": text(dataset, "SeriesDescription", 64),
        "body_part_examined": text(dataset, "BodyPartExamined", 16),
        "series_date": text(dataset, "SeriesDate", 8),
        "series_time": text(dataset, "SeriesTime", 16),
        "performed_procedure_step_start_date": text(dataset, "PerformedProcedureStepStartDate", 8),
        "performed_procedure_step_start_time": text(dataset, "PerformedProcedureStepStartTime", 16),
    }


def instance_fields(dataset: Dataset) -> dict:
    return {
        "sop_class_uid": text(dataset, "SOPClassUID", 64),
        "instance_number": number(dataset, "InstanceNumber"),
        "number_of_frames": number(dataset, "NumberOfFrames"),
        "rows": number(dataset, "Rows"),
        "columns": number(dataset, "Columns"),
        "bits_allocated": number(dataset, "BitsAllocated"),
        "content_date": text(dataset, "ContentDate", 8),
        "content_time": text(dataset, "ContentTime", 16),
    }


def lock_instance(sop_instance_uid: str) -> Instance | None:
    """The indexed instance with this UID, locked until the transaction ends."""
    return Instance.objects.select_for_update().filter(sop_instance_uid=sop_instance_uid).first()


def series_for(dataset: Dataset, *, study_uid: str, series_uid: str, calling_ae: str, received_at: datetime) -> Series:
    """Find or create the series, its study and patient. An existing row keeps its first values."""
    series = Series.objects.filter(series_instance_uid=series_uid).first()
    if series is not None:
        return series
    study = Study.objects.filter(study_instance_uid=study_uid).first()
    if study is None:
        patient, _ = Patient.objects.get_or_create(
            patient_id=text(dataset, "PatientID", 64),
            issuer_of_patient_id=text(dataset, "IssuerOfPatientID", 64),
            defaults=patient_fields(dataset),
        )
        study, _ = Study.objects.get_or_create(
            study_instance_uid=study_uid,
            defaults={
                **study_fields(dataset),
                "patient": patient,
                "calling_ae": calling_ae,
                "received_at": received_at,
            },
        )
    series, _ = Series.objects.get_or_create(
        series_instance_uid=series_uid,
        defaults={**series_fields(dataset), "study": study, "received_at": received_at},
    )
    return series


def create_instance(dataset: Dataset, *, series: Series, sop_instance_uid: str, **file_fields) -> Instance | None:
    """Insert the instance row; None when a concurrent association inserted the same UID first."""
    try:
        with transaction.atomic():  # a savepoint: the outer transaction survives the conflict
            return Instance.objects.create(
                sop_instance_uid=sop_instance_uid, series=series, **instance_fields(dataset), **file_fields
            )
    except IntegrityError:
        return None


@functools.lru_cache(maxsize=4)
def _insert_under_series_sql(vendor: str) -> tuple[str, tuple]:
    """The statement for a database vendor (its quoting), and its parameters' (field name, converter) in order.

    Text and integer values go as they are; other fields (dates) through Django's conversion.
    """
    fields = tuple(
        field for field in Instance._meta.concrete_fields if not field.primary_key and field.name != "series"
    )
    plain = (models.CharField, models.IntegerField, models.TextField)
    converters = tuple((field.name, None if isinstance(field, plain) else field.get_db_prep_save) for field in fields)
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    sql = (
        f"INSERT INTO {quote(Instance._meta.db_table)} ({quote('series_id')}, {columns}) "
        f"SELECT s.id, {placeholders} FROM {quote(Series._meta.db_table)} s WHERE s.series_instance_uid = %s "
        f"ON CONFLICT ({quote('sop_instance_uid')}) DO NOTHING RETURNING id, series_id"
    )
    return sql, converters


def insert_under_series(dataset: Dataset, *, series_uid: str, sop_instance_uid: str, **file_fields) -> Instance | None:
    """The common case in one statement: a new instance of a series already indexed.

    INSERT ... SELECT takes the series id from its unique index and ON CONFLICT
    DO NOTHING skips a taken SOP Instance UID, so no lookup, savepoint or
    row lock precedes it (they cost ~1.5 ms per C-STORE; bench/store_phases.py).
    None when nothing was inserted: the series is new or the UID exists; the
    caller then takes the general path (lock_instance, series_for, create_instance).
    """
    sql, converters = _insert_under_series_sql(connection.vendor)
    values = {"sop_instance_uid": sop_instance_uid, **instance_fields(dataset), **file_fields}
    params = [values[name] if prep is None else prep(values[name], connection) for name, prep in converters]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, series_uid])
        row = cursor.fetchone()
    if row is None:
        return None
    instance = Instance(id=row[0], series_id=row[1], **values)
    instance._state.adding, instance._state.db = False, connection.alias
    return instance


def replace_instance(instance: Instance, dataset: Dataset, *, series: Series, **file_fields) -> Instance:
    """Point an indexed instance at newly received bytes (the "replace" duplicate policy)."""
    for field, value in {**instance_fields(dataset), **file_fields, "series": series}.items():
        setattr(instance, field, value)
    instance.save()
    return instance


def record_duplicate(*, action: str, actor: str, sop_instance_uid: str, detail: str, at: datetime) -> AuditEvent:
    """Audit a duplicate with different bytes. `detail` holds UIDs and checksums only, never patient data."""
    return AuditEvent.objects.create(at=at, action=action, actor=actor[:128], target=sop_instance_uid, detail=detail)
