"""Modality Worklist C-FIND: an identifier turned into a queryset of open scheduled steps, and rows into answers.

PS3.4 K.6 (Modality Worklist Information Model) with the matching of PS3.4
C.2.2.2 done in SQL (gateway/matching.py): each answer is one Scheduled
Procedure Step with its requested procedure, order and patient (K.6.1.2.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import F, Q, QuerySet
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from gateway.matching import NOTHING, QueryValueError, is_universal, match, query_values, storable
from worklist.models import Order, ScheduledStep

SPS = "ScheduledProcedureStepSequence"
PATIENT, ORDER = "order__patient__", "order__"
# Keys with no stored value: the SCP supports them as return keys and answers zero length.
EMPTY = None


class QueryError(ValueError):
    """An identifier this SCP cannot answer: the message is safe to log and to return as Error Comment."""


@dataclass(frozen=True)
class Key:
    """A Table K.6-1 key: its VR, where it lives (ORM path from ScheduledStep), and whether it can be matched."""

    vr: str
    path: str | None
    matchable: bool = True


# PS3.4 Table K.6-1, attributes outside the Scheduled Procedure Step Sequence.
TOP_KEYS: dict[str, Key] = {
    # Patient Identification, Demographic and Medical
    "PatientName": Key("PN", PATIENT + "patient_name"),
    "PatientID": Key("LO", PATIENT + "patient_id"),
    "IssuerOfPatientID": Key("LO", PATIENT + "issuer_of_patient_id"),
    "PatientBirthDate": Key("DA", PATIENT + "patient_birth_date"),
    "PatientSex": Key("CS", PATIENT + "patient_sex"),
    "PatientWeight": Key("DS", PATIENT + "patient_weight", matchable=False),
    "ConfidentialityConstraintOnPatientDataDescription": Key("LO", PATIENT + "confidentiality_constraint"),
    "PatientState": Key("LO", PATIENT + "patient_state"),
    "PregnancyStatus": Key("US", PATIENT + "pregnancy_status", matchable=False),
    "MedicalAlerts": Key("LO", PATIENT + "medical_alerts"),
    "Allergies": Key("LO", PATIENT + "allergies"),
    "SpecialNeeds": Key("LO", PATIENT + "special_needs"),
    # Requested Procedure
    "RequestedProcedureID": Key("SH", ORDER + "requested_procedure_id"),
    "RequestedProcedureDescription": Key("LO", ORDER + "requested_procedure_description"),
    "StudyInstanceUID": Key("UI", ORDER + "study_instance_uid"),
    "RequestedProcedurePriority": Key("SH", ORDER + "requested_procedure_priority"),
    "ReasonForTheRequestedProcedure": Key("LO", ORDER + "reason_for_requested_procedure"),
    "ReferencedStudySequence": Key("SQ", EMPTY, matchable=False),
    "PatientTransportArrangements": Key("LO", EMPTY, matchable=False),
    # Imaging Service Request
    "AccessionNumber": Key("SH", ORDER + "accession_number"),
    "RequestingPhysician": Key("PN", ORDER + "requesting_physician"),
    "ReferringPhysicianName": Key("PN", ORDER + "referring_physician_name"),
    "PlacerOrderNumberImagingServiceRequest": Key("LO", ORDER + "placer_order_number"),
    "FillerOrderNumberImagingServiceRequest": Key("LO", ORDER + "filler_order_number"),
    # Visit Identification, Status and Relationship
    "AdmissionID": Key("LO", ORDER + "admission_id"),
    "CurrentPatientLocation": Key("LO", ORDER + "current_patient_location"),
    "ReferencedPatientSequence": Key("SQ", EMPTY, matchable=False),
}

# PS3.4 Table K.6-1, the items of the Scheduled Procedure Step Sequence.
STEP_KEYS: dict[str, Key] = {
    "ScheduledStationAETitle": Key("AE", "station_ae_title"),
    "ScheduledProcedureStepStartDate": Key("DA", "start_date"),
    "ScheduledProcedureStepStartTime": Key("TM", "start_time"),
    "Modality": Key("CS", "modality"),
    "ScheduledPerformingPhysicianName": Key("PN", "performing_physician_name"),
    "ScheduledProcedureStepDescription": Key("LO", "description"),
    "ScheduledStationName": Key("SH", "station_name"),
    "ScheduledProcedureStepLocation": Key("SH", "location"),
    "PreMedication": Key("LO", "pre_medication"),
    "ScheduledProcedureStepID": Key("SH", "step_id"),
    "RequestedContrastAgent": Key("LO", "contrast_agent"),
    "ScheduledProcedureStepStatus": Key("CS", "status"),
}

# Code sequences, stored as JSON: return keys only.
CODE_SEQUENCES = {
    "RequestedProcedureCodeSequence": ORDER + "requested_procedure_code",  # one {"value", "scheme", "meaning"}
    "ScheduledProtocolCodeSequence": "protocol_codes",  # a list of them
}
CODE_ITEM = {"CodeValue": "value", "CodingSchemeDesignator": "scheme", "CodeMeaning": "meaning"}
FRAME_KEYWORDS = {"SpecificCharacterSet"}
START_KEYS = ("ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime")


@dataclass
class WorklistQuery:
    """A parsed MWL identifier: what must match, and what each answer holds."""

    condition: Q = field(default_factory=Q)
    returned: list[str] = field(default_factory=list)
    # None: the SCU did not ask for the Scheduled Procedure Step Sequence.
    step_returned: list[str] | None = None
    code_items: dict[str, list[str]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)


def _elements(dataset: Dataset) -> list[tuple[str, object]]:
    """(keyword, value) of each element; a data set pydicom cannot decode is the peer's error."""
    try:
        return [(element.keyword, element.value) for element in dataset]
    except Exception as exc:
        raise QueryError(f"identifier cannot be decoded: {type(exc).__name__}") from None


def _pn(path: str, value: str, *, ignore_case: bool) -> Q:
    """PN matching by component group (alphabetic=ideographic=phonetic), PS3.5 6.2.1.

    A value without '=' may match any one group, so "山田^太郎" finds
    "Yamada^Tarou=山田^太郎"; with '=', each group given must match its own
    group and an empty group matches anything ("=山田^太郎").
    """
    if not storable(value):
        return NOTHING
    lookup = f"{path}__{'dicom_iwildcard' if ignore_case else 'dicom_wildcard'}"
    groups = [group.rstrip("^") for group in value.split("=")[:3]]
    if not any(groups):
        return Q()
    if len(groups) == 1:
        alone = groups[0]
        condition = match(path, "PN", alone, ignore_case=ignore_case) | Q(**{lookup: f"{alone}=*"})
        if alone.isascii():
            # Ideographic and phonetic groups are written in their own scripts: an ASCII
            # key can only be alphabetic, and skipping '*=' patterns keeps the scan cheap.
            return condition
        for pattern in (f"*={alone}", f"*={alone}=*"):
            condition |= Q(**{lookup: pattern})
        return condition
    pattern = "=".join(group or "*" for group in groups)
    return Q(**{lookup: pattern}) | Q(**{lookup: f"{pattern}=*"})


def _condition(keyword: str, key: Key, value: object, *, ignore_case_pn: bool) -> Q:
    if is_universal(value) or not key.matchable or key.path is None:
        return Q()
    if key.vr == "PN":
        condition = Q()
        for single in query_values(value):
            condition |= _pn(key.path, single.rstrip("="), ignore_case=ignore_case_pn)
        return condition
    try:
        return match(key.path, key.vr, value, ignore_case=ignore_case_pn)
    except QueryValueError:  # the value itself may be a birth date: keep it out of logs
        raise QueryError(f"{keyword}: not a valid {key.vr} value or range") from None


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return value.strip() if isinstance(value, str) else ""  # a backslash list is not a range


def _combined_start(item: Dataset) -> Q | None:
    """PS3.4 C.2.2.2.5: start date and start time both given as ranges match as one date-time range.

    "20240101-20240102" with "2200-0600" is the night shift, not an empty time window.
    """
    date, time = _text(item, "ScheduledProcedureStepStartDate"), _text(item, "ScheduledProcedureStepStartTime")
    if date.count("-") != 1 or time.count("-") != 1:
        return None
    try:  # validates both ranges as the separate matching would
        match("start_date", "DA", date), match("start_time", "TM", time)
    except QueryValueError:
        raise QueryError("Scheduled Procedure Step Start Date/Time: not a valid range") from None
    date_low, date_high = (part.strip() for part in date.split("-"))
    time_low, time_high = (part.strip() for part in time.split("-"))
    condition = ~Q(start_date="")
    if date_low and time_low:
        condition &= Q(start_date__gt=date_low) | Q(start_date=date_low, start_time__gte=time_low)
    elif date_low:
        condition &= Q(start_date__gte=date_low)
    if date_high and time_high:
        # "0600" as an upper bound includes 06:00:59.9: anything it is a prefix of.
        same_day = Q(start_time__lte=time_high) | Q(start_time__startswith=time_high)
        condition &= Q(start_date__lt=date_high) | (Q(start_date=date_high) & same_day)
    elif date_high:
        condition &= Q(start_date__lte=date_high)
    return condition


def _items(keyword: str, value: object) -> list[Dataset]:
    """A sequence key's items; a value of another VR is the peer's error, unless it is empty."""
    if value is None or value == "" or value == b"":
        return []
    if not isinstance(value, Sequence):
        raise QueryError(f"{keyword} is not a sequence")
    return list(value)


def _parse_step_item(query: WorklistQuery, sequence: object, *, ignore_case_pn: bool) -> None:
    """PS3.4 C.2.2.2.6 sequence matching: the one item's keys match the step; an empty sequence returns them all."""
    items = _items(SPS, sequence)
    if len(items) > 1:
        raise QueryError("Scheduled Procedure Step Sequence holds more than one item")
    if not items:
        query.step_returned = [*STEP_KEYS, "ScheduledProtocolCodeSequence"]
        query.code_items["ScheduledProtocolCodeSequence"] = list(CODE_ITEM)
        return
    item = items[0]
    query.step_returned = []
    combined = _combined_start(item)
    if combined is not None:
        query.condition &= combined
    for keyword, value in _elements(item):
        if keyword in CODE_SEQUENCES:
            query.step_returned.append(keyword)
            query.code_items[keyword] = _code_keys(keyword, value)
        elif keyword in STEP_KEYS:
            query.step_returned.append(keyword)
            if combined is None or keyword not in START_KEYS:
                query.condition &= _condition(keyword, STEP_KEYS[keyword], value, ignore_case_pn=ignore_case_pn)
        elif keyword:
            query.unsupported.append(f"{SPS}/{keyword}")


def _code_keys(keyword: str, sequence: object) -> list[str]:
    items = _items(keyword, sequence)
    if not items:
        return list(CODE_ITEM)
    asked = [element.keyword for element in items[0] if element.keyword in CODE_ITEM]
    return asked or list(CODE_ITEM)


def parse_query(identifier: Dataset, *, ignore_case_pn: bool = False) -> WorklistQuery:
    """The WorklistQuery for an MWL C-FIND identifier; raises QueryError."""
    query = WorklistQuery()
    for keyword, value in _elements(identifier):
        if keyword in FRAME_KEYWORDS:
            continue
        if keyword == SPS:
            _parse_step_item(query, value, ignore_case_pn=ignore_case_pn)
        elif keyword in CODE_SEQUENCES:
            query.returned.append(keyword)
            query.code_items[keyword] = _code_keys(keyword, value)
        elif keyword in TOP_KEYS:
            query.returned.append(keyword)
            query.condition &= _condition(keyword, TOP_KEYS[keyword], value, ignore_case_pn=ignore_case_pn)
        else:
            query.unsupported.append(keyword or "private or unknown")
    if not query.returned and query.step_returned is None:  # every answer would be an empty data set
        raise QueryError("the identifier holds no Modality Worklist key")
    return query


def open_steps() -> QuerySet:
    """Steps the worklist offers: not completed, discontinued or cancelled, nor part of a closed order."""
    closed_orders = (Order.Status.COMPLETED, Order.Status.DISCONTINUED, Order.Status.CANCELED)
    return ScheduledStep.objects.exclude(status__in=ScheduledStep.CLOSED).exclude(order__status__in=closed_orders)


def _path(keyword: str) -> str | None:
    if keyword in CODE_SEQUENCES:
        return CODE_SEQUENCES[keyword]
    return (TOP_KEYS.get(keyword) or STEP_KEYS[keyword]).path


def find_steps(query: WorklistQuery, limit: int) -> list[dict]:
    """Up to `limit` matching steps, each a dict of the values the answers need, soonest first."""
    columns = {}
    for keyword in [*query.returned, *(query.step_returned or [])]:
        path = _path(keyword)
        if path is not None:
            columns[keyword] = F(path)
    rows = open_steps().filter(query.condition).order_by("start_date", "start_time", "pk").values("pk", **columns)
    return list(rows[:limit])


# --- Answers ---------------------------------------------------------------------


def _codes(value: object, keywords: list[str]) -> list[Dataset]:
    codes = [value] if isinstance(value, dict) else list(value or [])
    items = []
    for code in codes:
        if not isinstance(code, dict) or not code.get("value"):
            continue
        item = Dataset()
        for keyword in keywords:
            setattr(item, keyword, code.get(CODE_ITEM[keyword]) or None)
        items.append(item)
    return items


def _put(dataset: Dataset, query: WorklistQuery, keyword: str, row: dict) -> None:
    if keyword in CODE_SEQUENCES:
        setattr(dataset, keyword, _codes(row.get(keyword), query.code_items[keyword]))
        return
    key = TOP_KEYS.get(keyword) or STEP_KEYS[keyword]
    if key.vr == "SQ":
        setattr(dataset, keyword, [])  # type 2, nothing stored: an empty sequence
        return
    value = row.get(keyword)
    setattr(dataset, keyword, None if value is None or value == "" else value)


def response_identifier(query: WorklistQuery, row: dict) -> Dataset:
    """One C-FIND pending answer: the keys the SCU asked for, for one scheduled step (PS3.4 K.6.1.2.2)."""
    answer = Dataset()
    for keyword in query.returned:
        _put(answer, query, keyword, row)
    if query.step_returned is not None:
        item = Dataset()
        for keyword in query.step_returned:
            _put(item, query, keyword, row)
        answer.ScheduledProcedureStepSequence = [item]
    return answer


# --- Character set of the answers ---------------------------------------------------

UTF8 = "ISO_IR 192"
DEFAULT_REPERTOIRE = {"", "ISO_IR 6", "ISO 2022 IR 6"}
TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}


def query_character_set(identifier: Dataset) -> list[str]:
    """The query's Specific Character Set terms ([] for the default repertoire)."""
    value = identifier.get("SpecificCharacterSet") or ""
    if isinstance(value, str):
        terms = [value]
    elif isinstance(value, MultiValue | list):
        terms = [str(term) for term in value]
    else:  # not text (a peer's wrong VR): as if absent
        terms = []
    terms = [term.strip() for term in terms]
    return [] if all(term in DEFAULT_REPERTOIRE for term in terms) else terms


def _codecs(terms: list[str]) -> list[str] | None:
    codecs = []
    for term in terms or [""]:
        codec = "ascii" if term in DEFAULT_REPERTOIRE else python_encoding.get(term)
        if codec is None:
            return None
        codecs.append(codec)
    return codecs


def _fits(text: str, codecs: list[str]) -> bool:
    """Every character can be written in one of the code extensions (ISO 2022 switches per run)."""
    for char in set(text):
        if not any(_encodes(char, codec) for codec in codecs):
            return False
    return True


def _encodes(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except UnicodeError:
        return False
    return True


def _texts(dataset: Dataset):
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _texts(item)
        elif element.VR in TEXT_VRS and element.value is not None:
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            yield from (str(value) for value in values)


def set_character_set(answer: Dataset, terms: list[str]) -> Dataset:
    """Answer in the query's character set when every value fits in it, otherwise in UTF-8.

    PS3.4 C.4.1.1.3.2 (K.4.1.1.3): an answer may use another character set than
    the query if its Specific Character Set says so. The SCU's own set is what
    it surely decodes; UTF-8 is the fallback that loses nothing, where forcing
    the SCU's set would turn names into '?'.
    """
    codecs = _codecs(terms)
    if codecs is not None and all(_fits(text, codecs) for text in _texts(answer)):
        if terms:
            answer.SpecificCharacterSet = terms[0] if len(terms) == 1 else terms
        return answer
    answer.SpecificCharacterSet = UTF8
    return answer
