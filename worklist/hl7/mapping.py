"""HL7 v2 message -> plain dicts for patient, order and steps (docs/hl7-mapping.md is the table).

Follows IHE RAD TF-2 (RAD-2/3/4, RAD-12, RAD-13) and TF-2x Appendix B: ORM^O01
carries the DICOM keys in OBR-18/19/20 and ZDS-1, OMI^O23 in IPC. Values come
back as DICOM strings (PN with ^, DA, TM). In the dicts None means "not in the
message" (leave the stored value alone) and "" means HL7's null `""` (clear it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hl7
from hl7.containers import Message

from worklist.errors import (
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_EVENT,
    UNSUPPORTED_MESSAGE_TYPE,
    VALUE_TOO_LONG,
    Rejected,
    WorklistError,
)
from worklist.hl7.charset import declared_charset, decode
from worklist.hl7.fields import Fields, cnn, coded, date_time, identifier, short_text, uid, xcn, xpn
from worklist.hl7.text import lo

# Structure a message may have (segment, field, repetition, component and subcomponent separators).
MAX_SEPARATORS = 20_000
ORDER_EVENTS = {("ORM", "O01"), ("OMI", "O23")}
DEMOGRAPHICS_EVENTS = {"A01", "A04", "A05", "A08", "A28", "A31"}
MERGE_EVENTS = {"A40"}
ORDER_CONTROLS = {"NW", "XO", "CA", "DC", "SC"}
# HL7 Table 0001 -> DICOM Patient's Sex (PS3.3 C.7.1.1): unknown is an empty value.
SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}
# TQ.6 / TQ1-9 priority (HL7 Table 0027) -> Requested Procedure Priority (PS3.3 C.4.11).
PRIORITY = {"S": "STAT", "A": "HIGH", "T": "HIGH", "P": "HIGH", "C": "MEDIUM", "R": "ROUTINE"}


@dataclass
class Header:
    """MSH as the ACK needs it; raw component text, never unescaped."""

    control_id: str = ""
    code: str = ""
    event: str = ""
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"
    version: str = "2.5"
    charset: str = ""
    encoding: str = "utf-8"

    @property
    def message_type(self) -> str:
        return f"{self.code}^{self.event}" if self.event else self.code


@dataclass
class OrderRequest:
    control: str
    order_status: str
    order: dict
    steps: list[dict]


@dataclass
class OrderMessage:
    patient: dict
    orders: list[OrderRequest]


@dataclass
class PatientUpdate:
    patient: dict


@dataclass
class PatientMergeRequest:
    patient: dict
    merged_patient_id: str
    merged_issuer: str


Content = OrderMessage | PatientUpdate | PatientMergeRequest


@dataclass
class Parsed:
    header: Header
    text: str
    message: Message = field(repr=False)


# --- reading the message ------------------------------------------------------


def lenient_header(raw: bytes) -> Header:
    """Whatever MSH fields can be read from a message we may not be able to parse, for the AR."""
    first = raw.replace(b"\n", b"\r").split(b"\r", 1)[0].decode("latin-1").lstrip()
    header = Header()
    if not first.startswith("MSH") or len(first) < 8:
        return header
    fields = first.split(first[3], 19)  # up to MSH-18; the rest of a huge line stays one string
    get = lambda n: fields[n - 1].strip() if len(fields) >= n else ""  # noqa: E731  MSH-1 is the separator itself
    header.sending_application, header.sending_facility = get(3), get(4)
    header.receiving_application, header.receiving_facility = get(5), get(6)
    message_type = get(9).split(fields[1][:1] or "^") if fields[1] else [get(9)]
    header.code = message_type[0][:3]
    header.event = message_type[1][:3] if len(message_type) > 1 else ""
    header.control_id = get(10)[:64]
    header.processing_id = get(11)[:3] or "P"
    header.version = get(12).split(fields[1][:1] or "^")[0][:8] or "2.5"
    repetition = fields[1][1:2] or "~"
    header.charset = get(18).split(repetition)[0].strip()
    return header


def read(raw: bytes) -> Parsed:
    """Decode per MSH-18 and parse with python-hl7; Rejected (AR) when that fails."""
    header = lenient_header(raw)
    if not header.control_id and raw.lstrip().startswith(b"MSH"):
        raise Rejected("MSH-10 message control ID missing", REQUIRED_FIELD_MISSING)
    if not raw.lstrip().startswith(b"MSH"):
        raise Rejected("not an HL7 v2 message: no MSH segment")
    charset = declared_charset(header.charset)
    header.encoding = charset
    text = decode(raw, charset)
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip()
    _check_structure(text)
    try:
        message = hl7.parse(text)
        if not message.segments("MSH"):
            raise ValueError("no MSH")
    except Exception as exc:  # python-hl7 raises several types on garbage
        raise Rejected(f"unreadable HL7: {type(exc).__name__}") from exc
    message.isthmus_encoding = charset  # for \X..\ escapes, which are bytes in this character set
    return Parsed(header=header, text=text, message=message)


def _check_structure(text: str) -> None:
    """Rejected before parsing when segments, fields and components exceed MAX_SEPARATORS.

    python-hl7 keeps a few hundred bytes per field: 1 MiB of "|" would cost
    about 450 MB and 6 s of CPU. Real orders and ADT have a few hundred.
    """
    escape = text[6:7]
    separators = set(text[3:8]) - {escape} | {"\r"}
    count = sum(text.count(separator) for separator in separators)
    if count > MAX_SEPARATORS:
        raise Rejected(f"more than {MAX_SEPARATORS} segments, fields and components", VALUE_TOO_LONG)


def content_of(parsed: Parsed) -> Content:
    """The patient/order dicts of a message read(); Rejected for a type we do not handle, WorklistError (AE)."""
    header, message = parsed.header, parsed.message
    if (header.code, header.event) in ORDER_EVENTS:
        return _order_message(message)
    if header.code == "ADT" and header.event in DEMOGRAPHICS_EVENTS:
        return PatientUpdate(patient=_patient(_segment(message, "PID")))
    if header.code == "ADT" and header.event in MERGE_EVENTS:
        return _merge(message)
    if header.code in {"ORM", "OMI", "ADT"}:
        raise Rejected(f"event {header.message_type} not handled", UNSUPPORTED_EVENT)
    raise Rejected(f"message type {header.message_type or '(none)'} not handled", UNSUPPORTED_MESSAGE_TYPE)


def _segment(message: Message, name: str, required: bool = True) -> Fields | None:
    try:
        segment = message.segment(name)
    except KeyError:
        if required:
            raise WorklistError(f"{name} segment missing", code=REQUIRED_FIELD_MISSING, location=name) from None
        return None
    return Fields(message, segment, _encoding_of(message))


def _encoding_of(message: Message) -> str:
    return getattr(message, "isthmus_encoding", "") or "utf-8"


# --- patients -----------------------------------------------------------------------


def _patient_identifier(fields: Fields, number: int, repetition: int = 1) -> tuple[str, str]:
    """CX: 1 ID, 4 assigning authority (HD: namespace, or else universal ID)."""
    location = f"{fields.name}-{number}"
    patient_id = identifier(fields.get(number, 1, repetition=repetition), 64, location) or ""
    issuer = fields.text(number, 4, 1, repetition) or fields.text(number, 4, 2, repetition)
    return patient_id, lo(issuer, 64)


def _patient(fields: Fields) -> dict:
    patient_id, issuer = _patient_identifier(fields, 3)
    if not patient_id:
        raise WorklistError("PID-3 patient ID missing", code=REQUIRED_FIELD_MISSING, location="PID-3")
    other_ids = []
    for repetition in range(2, fields.repetitions(3) + 1):
        other_id, other_issuer = _patient_identifier(fields, 3, repetition)
        if other_id:
            other_ids.append({"id": other_id, "issuer": other_issuer})
    birth_date, _ = date_time(fields.get(7, 1), "PID-7")
    sex = fields.get(8)
    if sex is not None and sex.upper() not in SEX and sex != "":
        raise WorklistError("PID-8 sex not in HL7 table 0001", code=TABLE_VALUE_NOT_FOUND, location="PID-8")
    return {
        "patient_id": patient_id,
        "issuer_of_patient_id": issuer,
        "patient_name": xpn(fields, 5),
        "patient_birth_date": birth_date,
        "patient_sex": None if sex is None else SEX.get(sex.upper(), ""),
        "other_patient_ids": other_ids or None,
    }


def _merge(message: Message) -> PatientMergeRequest:
    patient = _patient(_segment(message, "PID"))
    merged_id, merged_issuer = _patient_identifier(_segment(message, "MRG"), 1)
    if not merged_id:
        raise WorklistError("MRG-1 prior patient ID missing", code=REQUIRED_FIELD_MISSING, location="MRG-1")
    return PatientMergeRequest(patient=patient, merged_patient_id=merged_id, merged_issuer=merged_issuer)


# --- orders ---------------------------------------------------------------------------


def _order_message(message: Message) -> OrderMessage:
    patient = _patient(_segment(message, "PID"))
    visit = _visit(_segment(message, "PV1", required=False))
    groups: list[dict[str, list[Fields]]] = []
    encoding = _encoding_of(message)
    for segment in message:
        name = str(segment[0])
        if name == "ORC":
            groups.append({"ORC": [Fields(message, segment, encoding)]})
        elif name in {"OBR", "TQ1", "IPC", "ZDS"} and groups:
            groups[-1].setdefault(name, []).append(Fields(message, segment, encoding))
    if not groups:
        raise WorklistError("ORC segment missing", code=REQUIRED_FIELD_MISSING, location="ORC")
    return OrderMessage(patient=patient, orders=[_order(group, visit) for group in groups])


def _visit(pv1: Fields | None) -> dict:
    if pv1 is None:
        return {}
    return {
        "referring_physician_name": xcn(pv1, 8),
        "current_patient_location": short_text(pv1.get(3), 64),
        "admission_id": short_text(pv1.get(19), 64),
    }


def _order(group: dict[str, list[Fields]], visit: dict) -> OrderRequest:
    orc = group["ORC"][0]
    control = (orc.get(1) or "").upper()
    if control not in ORDER_CONTROLS:
        raise WorklistError(f"ORC-1 order control {control or '(empty)'} not handled", code=TABLE_VALUE_NOT_FOUND,
                            location="ORC-1")  # fmt: skip
    obr = group.get("OBR", [None])[0]
    tq1 = group.get("TQ1", [None])[0]
    ipcs = group.get("IPC", [])
    order = {
        "placer_order_number": short_text(orc.get(2), 64),
        "filler_order_number": short_text(orc.get(3), 64),
        **{key: value for key, value in visit.items()},
    }
    if obr is not None:
        from_obr = _from_obr(obr)
        for key in ("placer_order_number", "filler_order_number"):  # ORC-2/3 first, OBR-2/3 when those are empty
            if order[key]:
                from_obr.pop(key)
        order.update({key: value for key, value in from_obr.items() if value is not None})
    # Scheduled start: the first present of TQ1-7, OBR-27.4, ORC-7.4, OBR-7.
    candidates = [(tq1, 7, 1, "TQ1-7"), (obr, 27, 4, "OBR-27"), (orc, 7, 4, "ORC-7"), (obr, 7, 1, "OBR-7")]
    present = [(f.get(n, c), where) for f, n, c, where in candidates if f is not None and f.get(n, c) is not None]
    start = date_time(*present[0]) if present else (None, None)
    priorities = [(tq1, 9, 1), (obr, 27, 6), (orc, 7, 6)]
    priority = next((f.get(n, c) for f, n, c in priorities if f is not None and f.get(n, c) is not None), None)
    if priority is not None:
        order["requested_procedure_priority"] = PRIORITY.get(priority.upper()[:1], "")
    zds = group.get("ZDS", [None])[0]
    if zds is not None:
        order["study_instance_uid"] = uid(zds.get(1), "ZDS-1")
    steps = [_step_from_ipc(ipc, order) for ipc in ipcs] if ipcs else [_step_from_obr(obr, order)]
    for step in steps:
        step["start_date"], step["start_time"] = start
    if ipcs:
        first = ipcs[0]
        order["accession_number"] = identifier(first.get(1), 16, "IPC-1")
        order["issuer_of_accession_number"] = short_text(first.get(1, 2) or first.get(1, 3), 64)
        order["requested_procedure_id"] = identifier(first.get(2), 16, "IPC-2")
        order["study_instance_uid"] = uid(first.get(3), "IPC-3") or order.get("study_instance_uid")
    order = {key: value for key, value in order.items() if value is not None}
    return OrderRequest(control=control, order_status=(orc.get(5) or "").upper(), order=order, steps=steps)


def _from_obr(obr: Fields) -> dict:
    procedure_code = coded(obr, 44) or coded(obr, 4)
    return {
        "accession_number": identifier(obr.get(18), 16, "OBR-18"),
        "requested_procedure_id": identifier(obr.get(19), 16, "OBR-19"),
        "requested_procedure_code": procedure_code,
        "requested_procedure_description": short_text(obr.get(44, 2) or obr.get(4, 2), 64),
        "requesting_physician": xcn(obr, 16),
        "reason_for_requested_procedure": short_text(obr.get(31, 2) or obr.get(31, 1), 64),
        "placer_order_number": short_text(obr.get(2), 64),
        "filler_order_number": short_text(obr.get(3), 64),
    }


def _step_from_obr(obr: Fields | None, order: dict) -> dict:
    if obr is None:
        return {"step_id": None}
    protocol = coded(obr, 4, first=4)
    return {
        "step_id": identifier(obr.get(20), 16, "OBR-20"),
        "station_ae_title": identifier(obr.get(21), 16, "OBR-21"),
        "modality": identifier(obr.get(24), 16, "OBR-24"),
        "description": short_text(obr.get(4, 5), 64) or order.get("requested_procedure_description"),
        "protocol_codes": [protocol] if protocol else None,
        "performing_physician_name": cnn(obr, 34),
    }


def _step_from_ipc(ipc: Fields, order: dict) -> dict:
    protocols = [coded(ipc, 6, repetition=r) for r in range(1, ipc.repetitions(6) + 1)]
    protocols = [protocol for protocol in protocols if protocol]
    return {
        "step_id": identifier(ipc.get(4), 16, "IPC-4"),
        "modality": identifier(ipc.get(5), 16, "IPC-5"),
        "protocol_codes": protocols or None,
        "station_name": short_text(ipc.get(7), 16),
        "location": short_text(ipc.get(8), 16),
        "station_ae_title": identifier(ipc.get(9), 16, "IPC-9"),
        "description": (protocols[0]["meaning"] if protocols else None) or order.get("requested_procedure_description"),
    }
