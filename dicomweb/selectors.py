"""QIDO-RS searches (PS3.18 10.6): query parameters -> a Study Root query on the index -> rows.

Matching is the C-FIND matching (gateway/qr.py, gateway/matching.py), all in SQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Q
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicomweb.base import DicomWebError
from gateway import qr
from gateway.matching import QueryValueError

STUDY, SERIES, IMAGE = qr.STUDY, qr.SERIES, qr.IMAGE
LEVELS = (STUDY, SERIES, IMAGE)
# Attributes answered by the service itself, not read from the index.
SYNTHESIZED = ("SpecificCharacterSet", "InstanceAvailability", "RetrieveURL")
# PS3.18 Tables 10.6.3-3, -4 and -5: what each level returns without includefield.
DEFAULTS = {
    STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    SERIES: (
        "StudyInstanceUID",
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
    ),
    IMAGE: (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}
CONTROL = {"includefield", "limit", "offset", "fuzzymatching"}
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
# Values that may be lists in QIDO: commas (PS3.18 8.3.4.1) become DICOM's backslash.
_LIST_VRS = {"UI", "CS"}


@dataclass
class Search:
    """A parsed QIDO-RS request: the index query, the page, and warnings for the Warning header."""

    query: qr.Query
    limit: int
    offset: int
    capped: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def level(self) -> str:
        return self.query.level


def _level_of(keyword: str) -> str | None:
    """The Study Root level of an indexed or computed attribute (patient attributes are study attributes)."""
    if keyword in qr.ATTRIBUTES:
        level = qr.ATTRIBUTES[keyword].level
    elif keyword in qr.COMPUTED:
        level = qr.COMPUTED[keyword][0]
    else:
        return None
    return STUDY if level == qr.PATIENT else level


def _keyword(attribute_id: str) -> str:
    """PS3.18 8.3.4.1 {attributeID}: a keyword or an 8-digit hex tag; raises DicomWebError for anything else."""
    attribute_id = attribute_id.strip()
    if _TAG.match(attribute_id):
        keyword = keyword_for_tag(int(attribute_id, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(attribute_id) is not None:
        return attribute_id
    # Echoed (and logged) only if shaped like a keyword: a value typed where a name belongs stays out of the log.
    shown = repr(attribute_id) if _NAME.fullmatch(attribute_id) else "(neither a keyword nor a tag)"
    raise DicomWebError(400, f"unknown attribute {shown}")


# Far beyond any index, and what every database takes as a LIMIT or OFFSET (PostgreSQL's is a bigint).
MAX_PAGE_NUMBER = 2**31 - 1


def _int_param(params: Mapping[str, Sequence[str]], name: str, default: int) -> int:
    values = params.get(name) or []
    if not values or values[-1] == "":
        return default
    try:
        number = int(values[-1])
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_PAGE_NUMBER:
        raise DicomWebError(400, f"{name} must be an integer from 0 to {MAX_PAGE_NUMBER}")
    return number


def _value(keyword: str, values: Sequence[str]) -> str:
    vr = dictionary_VR(keyword)
    if vr in _LIST_VRS:
        values = [part for value in values for part in value.split(",")]
    return "\\".join(values)


def _in_scope(keyword: str, level: str) -> bool:
    key_level = _level_of(keyword)
    return key_level is not None and LEVELS.index(key_level) <= LEVELS.index(level)


def _include_fields(params: Mapping[str, Sequence[str]], level: str, search: Search) -> list[str]:
    """Keywords named by includefield (PS3.18 8.3.4.3); 'all' is every attribute the index has at or above level."""
    names = [name.strip() for value in params.get("includefield", []) for name in value.split(",") if name.strip()]
    if "all" in names:
        every = [*qr.ATTRIBUTES, *qr.COMPUTED]
        return [keyword for keyword in every if _in_scope(keyword, level) and not keyword.startswith("NumberOfPatient")]
    included = []
    for name in names:
        keyword = _keyword(name)
        if _in_scope(keyword, level):
            included.append(keyword)
        elif keyword not in SYNTHESIZED:
            search.warnings.append(f"includefield {keyword} is not available at {level.lower()} level and is omitted")
    return included


def _defaults(level: str, fixed: Sequence[str]) -> list[str]:
    """Defaults of the level, and of the levels above it not fixed by the path (PS3.18 10.6.3.3.1/2)."""
    keywords: list[str] = []
    for key_level in LEVELS[: LEVELS.index(level) + 1]:
        if key_level == level or key_level not in fixed:
            keywords.extend(DEFAULTS[key_level])
    return keywords


def _matching_keys(params: Mapping[str, Sequence[str]], level: str, search: Search) -> dict[str, list[str]]:
    """{keyword: values} of the matching parameters; what cannot be matched is ignored with a warning."""
    matching: dict[str, list[str]] = {}
    for name, values in params.items():
        if name in CONTROL:
            continue
        if "." in name:
            search.warnings.append(f"sequence matching on {name[:64]} is not supported and was ignored")
            continue
        keyword = _keyword(name)
        if keyword in SYNTHESIZED:
            continue
        if not _in_scope(keyword, level):
            search.warnings.append(f"{keyword} is not supported for matching at {level.lower()} level and was ignored")
            continue
        matching[keyword] = [*matching.get(keyword, []), *values]
    return matching


def _condition(level: str, keyword: str, values: Sequence[str]) -> Q:
    try:
        return qr.key_condition(level, keyword, _value(keyword, values), ignore_case=settings.QIDO_PN_CASE_INSENSITIVE)
    except QueryValueError as exc:
        raise DicomWebError(400, f"{keyword}: {exc}") from None


def parse_search(
    level: str, params: Mapping[str, Sequence[str]], *, study_uid: str = "", series_uid: str = ""
) -> Search:
    """The Search for a QIDO-RS request at `level` ('STUDY', 'SERIES', 'IMAGE'); raises DicomWebError(400).

    The study and series of the URL are matched on their own, so a query parameter can only narrow them.
    """
    query = qr.Query(root=qr.STUDY_ROOT, level=level)
    asked = _int_param(params, "limit", settings.QIDO_LIMIT + 1)  # no limit: as many as we give
    limit = min(asked, settings.QIDO_LIMIT)
    search = Search(query, limit, _int_param(params, "offset", 0), capped=asked > limit)
    if (params.get("fuzzymatching") or ["false"])[-1].lower() == "true":
        search.warnings.append(
            "The fuzzymatching parameter is not supported. Only literal matching has been performed."
        )
    fixed = {STUDY: ("StudyInstanceUID", study_uid), SERIES: ("SeriesInstanceUID", series_uid)}
    for keyword, uid in fixed.values():
        if uid:
            query.condition &= _condition(level, keyword, [uid])
    matching = _matching_keys(params, level, search)
    for keyword, values in matching.items():
        query.condition &= _condition(level, keyword, values)
    fixed_levels = [key_level for key_level, (_name, uid) in fixed.items() if uid]
    wanted = [*_defaults(level, fixed_levels), *matching, *_include_fields(params, level, search)]
    query.returned = list(dict.fromkeys(keyword for keyword in wanted if _level_of(keyword) is not None))
    return search


def run_search(search: Search) -> tuple[list[dict], bool]:
    """The page of matching rows, and whether more matches exist beyond our cap (not the client's own limit)."""
    rows = qr.find_rows(search.query, search.limit + 1, search.offset)
    more = len(rows) > search.limit
    return rows[: search.limit], more and search.capped
