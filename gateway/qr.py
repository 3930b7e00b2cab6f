"""Query/Retrieve selectors: an identifier turned into a queryset of the index, and rows into responses.

PS3.4 C.6.1 (Patient Root) and C.6.2 (Study Root), hierarchical queries: the
unique key of every level above the query level must be given (C.4.1.2.1).
All matching is SQL (gateway/matching.py); counts are subqueries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Aggregate, CharField, Count, Exists, F, IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.matching import QueryValueError, is_single_value, is_universal, match
from gateway.models import Instance, Patient, Series, Study

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
PATIENT_ROOT, STUDY_ROOT = "patient", "study"
ROOT_LEVELS = {PATIENT_ROOT: (PATIENT, STUDY, SERIES, IMAGE), STUDY_ROOT: (STUDY, SERIES, IMAGE)}
MODELS = {PATIENT: Patient, STUDY: Study, SERIES: Series, IMAGE: Instance}
# ORM path from each level's model to its parent's.
PARENT = {STUDY: "patient", SERIES: "study", IMAGE: "series"}
UNIQUE_KEYS = {PATIENT: "PatientID", STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID", IMAGE: "SOPInstanceUID"}
# Never matching or return keys: they frame the query.
FRAME_KEYWORDS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}


class QueryError(ValueError):
    """An identifier this SCP cannot answer: the message is safe to log and to return as Error Comment."""


@dataclass(frozen=True)
class Attribute:
    """A key the index stores: its level and the field on that level's model."""

    keyword: str
    vr: str
    level: str
    field: str


ATTRIBUTES = {
    attribute.keyword: attribute
    for attribute in (
        # PS3.4 C.6.1.1.2 patient level
        Attribute("PatientID", "LO", PATIENT, "patient_id"),
        Attribute("PatientName", "PN", PATIENT, "patient_name"),
        Attribute("IssuerOfPatientID", "LO", PATIENT, "issuer_of_patient_id"),
        Attribute("PatientBirthDate", "DA", PATIENT, "patient_birth_date"),
        Attribute("PatientSex", "CS", PATIENT, "patient_sex"),
        # C.6.1.1.3 study level
        Attribute("StudyInstanceUID", "UI", STUDY, "study_instance_uid"),
        Attribute("StudyDate", "DA", STUDY, "study_date"),
        Attribute("StudyTime", "TM", STUDY, "study_time"),
        Attribute("AccessionNumber", "SH", STUDY, "accession_number"),
        Attribute("StudyID", "SH", STUDY, "study_id"),
        Attribute("StudyDescription", "LO", STUDY, "study_description"),
        Attribute("ReferringPhysicianName", "PN", STUDY, "referring_physician_name"),
        # C.6.1.1.4 series level
        Attribute("SeriesInstanceUID", "UI", SERIES, "series_instance_uid"),
        Attribute("Modality", "CS", SERIES, "modality"),
        Attribute("SeriesNumber", "IS", SERIES, "series_number"),
        Attribute("SeriesDescription", "LO", SERIES, "series_description"),
        Attribute("BodyPartExamined", "CS", SERIES, "body_part_examined"),
        Attribute("SeriesDate", "DA", SERIES, "series_date"),
        Attribute("SeriesTime", "TM", SERIES, "series_time"),
        Attribute("PerformedProcedureStepStartDate", "DA", SERIES, "performed_procedure_step_start_date"),
        Attribute("PerformedProcedureStepStartTime", "TM", SERIES, "performed_procedure_step_start_time"),
        # C.6.1.1.5 composite object instance level
        Attribute("SOPInstanceUID", "UI", IMAGE, "sop_instance_uid"),
        Attribute("SOPClassUID", "UI", IMAGE, "sop_class_uid"),
        Attribute("InstanceNumber", "IS", IMAGE, "instance_number"),
        Attribute("NumberOfFrames", "IS", IMAGE, "number_of_frames"),
        Attribute("Rows", "US", IMAGE, "rows"),
        Attribute("Columns", "US", IMAGE, "columns"),
        Attribute("BitsAllocated", "US", IMAGE, "bits_allocated"),
        Attribute("ContentDate", "DA", IMAGE, "content_date"),
        Attribute("ContentTime", "TM", IMAGE, "content_time"),
    )
}


class Modalities(Aggregate):
    """The distinct modalities of a group, comma-separated (CS values never hold a comma)."""

    function = "GROUP_CONCAT"
    template = "%(function)s(DISTINCT %(expressions)s)"
    output_field = CharField()

    def as_postgresql(self, compiler, connection, **extra_context):
        return self.as_sql(
            compiler, connection, function="STRING_AGG", template="%(function)s(DISTINCT %(expressions)s, ',')"
        )


def _count(model, parent_field: str, ref: str) -> Coalesce:
    rows = model.objects.filter(**{parent_field: OuterRef(ref)}).order_by().values(parent_field)
    return Coalesce(Subquery(rows.annotate(n=Count("pk")).values("n")), 0, output_field=IntegerField())


def _modalities(ref: str) -> Subquery:
    rows = Series.objects.filter(study=OuterRef(ref)).exclude(modality="").order_by().values("study")
    return Subquery(rows.annotate(m=Modalities("modality")).values("m"))


# PS3.4 C.3.4 additional attributes, computed; return keys only (ModalitiesInStudy also matches).
COMPUTED = {
    "NumberOfPatientRelatedStudies": (PATIENT, lambda ref: _count(Study, "patient", ref)),
    "NumberOfPatientRelatedSeries": (PATIENT, lambda ref: _count(Series, "study__patient", ref)),
    "NumberOfPatientRelatedInstances": (PATIENT, lambda ref: _count(Instance, "series__study__patient", ref)),
    "NumberOfStudyRelatedSeries": (STUDY, lambda ref: _count(Series, "study", ref)),
    "NumberOfStudyRelatedInstances": (STUDY, lambda ref: _count(Instance, "series__study", ref)),
    "ModalitiesInStudy": (STUDY, _modalities),
    "NumberOfSeriesRelatedInstances": (SERIES, lambda ref: _count(Instance, "series", ref)),
}


def path_to(query_level: str, key_level: str) -> str:
    """ORM prefix from the query level's model to the row of `key_level` ("" for itself)."""
    order = ROOT_LEVELS[PATIENT_ROOT]
    steps = [PARENT[level] for level in reversed(order[order.index(key_level) + 1 : order.index(query_level) + 1])]
    return "".join(f"{step}__" for step in steps)


@dataclass
class Query:
    """A parsed C-FIND identifier: where to look, what must match, and what to return."""

    root: str
    level: str
    condition: Q = field(default_factory=Q)
    returned: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    wants_availability: bool = False

    @property
    def model(self):
        return MODELS[self.level]


def _level_of(root: str, keyword: str) -> str | None:
    level = (
        ATTRIBUTES[keyword].level if keyword in ATTRIBUTES else COMPUTED[keyword][0] if keyword in COMPUTED else None
    )
    if root == STUDY_ROOT and level == PATIENT:
        return STUDY  # PS3.4 C.6.2.1: patient attributes are study attributes in Study Root
    return level


def _query_level(root: str, identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in ROOT_LEVELS[root]:
        raise QueryError(f"Query/Retrieve Level {level[:16]!r} is not one of {', '.join(ROOT_LEVELS[root])}")
    return level


def _elements(identifier: Dataset) -> list[tuple[str, str, object]]:
    """(keyword, VR, value) of each element; a data set pydicom cannot decode is the peer's error."""
    try:
        return [(element.keyword, element.VR, element.value) for element in identifier]
    except Exception as exc:
        raise QueryError(f"identifier cannot be decoded: {type(exc).__name__}") from None


def _check_unique_keys(root: str, level: str, identifier: Dataset, *, through: bool) -> None:
    """PS3.4 C.4.1.2.1 / C.4.2.2.1: unique keys above the level (and at it, for retrieval) hold a value."""
    levels = ROOT_LEVELS[root]
    needed = levels[: levels.index(level) + (1 if through else 0)]
    for needed_level in needed:
        keyword = UNIQUE_KEYS[needed_level]
        attribute = ATTRIBUTES[keyword]
        value = identifier[keyword].value if keyword in identifier else None
        if is_universal(value):
            raise QueryError(f"{keyword} is required at {level} level")
        if not is_single_value(value, attribute.vr) and attribute.vr != "UI":
            raise QueryError(f"{keyword} must be a single value at {level} level")


def key_condition(level: str, keyword: str, value: object, *, ignore_case: bool) -> Q:
    """A Q object matching one key at `level` (Study Root path): shared by C-FIND and QIDO-RS."""
    if keyword == "ModalitiesInStudy":
        if is_universal(value):
            return Q()
        # PS3.4 C.6.1.1.3: a study matches when any of its series has a matching modality.
        series = Series.objects.filter(study=OuterRef(f"{path_to(level, STUDY)}pk"))
        return Q(Exists(series.filter(match("modality", "CS", value))))
    if keyword in COMPUTED:
        return Q()
    attribute = ATTRIBUTES[keyword]
    path = path_to(level, attribute.level) + attribute.field
    return match(path, attribute.vr, value, ignore_case=ignore_case)


def parse_query(root: str, identifier: Dataset, *, ignore_case_pn: bool = False) -> Query:
    """The Query for a C-FIND identifier in Patient Root or Study Root; raises QueryError."""
    level = _query_level(root, identifier)
    _check_unique_keys(root, level, identifier, through=False)
    query = Query(root=root, level=level)
    levels = ROOT_LEVELS[root]
    for keyword, vr, value in _elements(identifier):
        if keyword in FRAME_KEYWORDS:
            query.wants_availability |= keyword == "InstanceAvailability"
            continue
        key_level = _level_of(root, keyword)
        usable = key_level is not None and levels.index(key_level) <= levels.index(level)
        if keyword in COMPUTED:
            usable = key_level == level
        if vr == "SQ" or not usable:
            if keyword:
                query.unsupported.append(keyword)
            continue
        try:
            query.condition &= key_condition(level, keyword, value, ignore_case=ignore_case_pn)
        except QueryValueError as exc:
            raise QueryError(f"{keyword}: {exc}") from None
        query.returned.append(keyword)
    return query


def _charset(level: str):
    if level == PATIENT:
        latest = Study.objects.filter(patient=OuterRef("pk")).order_by("-received_at")
        return Subquery(latest.values("specific_character_set")[:1])
    return F(f"{path_to(level, STUDY)}specific_character_set")


def find_rows(query: Query, limit: int, offset: int = 0) -> list[dict]:
    """Up to `limit` matching rows after the first `offset`, each a dict keyed by the returned keywords."""
    columns = {"SpecificCharacterSet": _charset(query.level)}
    for keyword in query.returned:
        if keyword in COMPUTED:
            columns[keyword] = COMPUTED[keyword][1](f"{path_to(query.level, COMPUTED[keyword][0])}pk")
        else:
            attribute = ATTRIBUTES[keyword]
            columns[keyword] = F(path_to(query.level, attribute.level) + attribute.field)
    rows = query.model.objects.filter(query.condition).order_by("pk").values(**columns)
    return list(rows[offset : offset + limit])


def _dicom_value(keyword: str, value: object) -> object:
    if value is None or value == "":
        return None
    if keyword == "ModalitiesInStudy":
        return sorted(str(value).split(","))
    return value


def response_identifier(query: Query, row: dict, retrieve_ae_title: str) -> Dataset:
    """A C-FIND pending response: the requested keys, the level, our AE title and the stored character set."""
    response = Dataset()
    charset = row.get("SpecificCharacterSet") or ""
    if charset:
        response.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    response.QueryRetrieveLevel = query.level
    response.RetrieveAETitle = retrieve_ae_title
    if query.wants_availability:
        response.InstanceAvailability = "ONLINE"
    for keyword in query.returned:
        setattr(response, keyword, _dicom_value(keyword, row[keyword]))
    return response


def retrieve_instances(root: str, identifier: Dataset) -> QuerySet:
    """Instances a C-MOVE / C-GET identifier names by its unique keys (PS3.4 C.4.2.2.1); raises QueryError."""
    level = _query_level(root, identifier)
    _check_unique_keys(root, level, identifier, through=True)
    levels = ROOT_LEVELS[root]
    condition = Q()
    for key_level in levels[: levels.index(level) + 1]:
        keyword = UNIQUE_KEYS[key_level]
        attribute = ATTRIBUTES[keyword]
        value = identifier[keyword].value
        if isinstance(value, MultiValue) and attribute.vr != "UI":
            raise QueryError(f"{keyword} must be a single value")
        try:
            condition &= match(path_to(IMAGE, attribute.level) + attribute.field, attribute.vr, value)
        except QueryValueError as exc:
            raise QueryError(f"{keyword}: {exc}") from None
    return Instance.objects.filter(condition).order_by("series__study_id", "series_id", "instance_number", "pk")
