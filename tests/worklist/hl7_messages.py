"""HL7 v2 test messages with fake patients, built field by field so each test shows what it changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worklist.hl7.mllp import send

if TYPE_CHECKING:  # the benchmarks import this module without Django set up
    from worklist.hl7.listener import Hl7Listener


def segment(name: str, fields: dict[int, str]) -> str:
    last = max(fields)
    return name + "|" + "|".join(fields.get(number, "") for number in range(1, last + 1))


def msh(control_id: str, message_type: str, charset: str = "", sender: str = "RIS") -> str:
    fields = {3: sender, 4: "HOSP", 5: "ISTHMUS", 6: "RAD", 7: "20240105101500", 9: message_type,
              10: control_id, 11: "P", 12: "2.5"}  # fmt: skip
    if charset:
        fields[18] = charset
    return "MSH|^~\\&|" + "|".join(fields.get(number, "") for number in range(3, max(fields) + 1))


def pid(patient_id: str = "PAT001", name: str = "TESTER^ALICE", birth: str = "19700101", sex: str = "F") -> str:
    return segment("PID", {1: "1", 3: f"{patient_id}^^^HOSP", 5: name, 7: birth, 8: sex})


def message(*segments: str, charset: str = "utf-8") -> bytes:
    return ("\r".join(segments) + "\r").encode(charset)


def orm(
    control_id: str,
    control: str,
    accession: str,
    *,
    patient: str = "",
    modality: str = "CT",
    station: str = "CT1",
    start: str = "202401051030",
    description: str = "CT HEAD",
    step_id: str = "SPS1",
    order_status: str = "SC",
    charset: str = "",
    codec: str = "utf-8",
) -> bytes:
    """ORM^O01 as IHE RAD-4 shapes it: OBR-18 accession, -19 RP ID, -20 SPS ID, -21 station AE, -24 modality."""
    obr = {1: "1", 2: f"PL{accession}", 3: f"FL{accession}", 4: f"CTHEAD^{description}^LOCAL", 18: accession,
           19: f"RP{accession}", 20: step_id, 21: station, 24: modality, 27: f"^^^{start}^^S", 31: "^Headache"}  # fmt: skip
    return message(
        msh(control_id, "ORM^O01", charset),
        patient or pid(),
        segment("PV1", {1: "1", 2: "O", 3: "RAD^101", 8: "1234^REFERRER^ROBERT", 19: "V42"}),
        segment("ORC", {1: control, 2: f"PL{accession}", 3: f"FL{accession}", 5: order_status}),
        segment("OBR", obr),
        charset=codec,
    )


def adt(control_id: str, event: str, patient: str, *extra: str, charset: str = "", codec: str = "utf-8") -> bytes:
    return message(msh(control_id, f"ADT^{event}", charset), segment("EVN", {1: event}), patient, *extra, charset=codec)


def exchange(listener: Hl7Listener, *messages: bytes, codec: str = "utf-8", source: str = "") -> list[str]:
    """Send messages over one real MLLP connection (from `source`, a loopback address, if given); the ACKs as text."""
    return [ack.decode(codec) for ack in send("127.0.0.1", listener.port, list(messages), source=source)]


def msa(ack: str) -> list[str]:
    return next(line for line in ack.split("\r") if line.startswith("MSA")).split("|")


def err(ack: str) -> list[str]:
    return next(line for line in ack.split("\r") if line.startswith("ERR")).split("|")
