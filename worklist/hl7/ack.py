"""Original-mode acknowledgements (HL7 v2.5 2.9.2): ACK with MSA, and ERR when something failed."""

from __future__ import annotations

import re
import uuid

from django.conf import settings
from django.utils import timezone

from worklist.hl7.mapping import Header
from worklist.hl7.text import escape

SEVERITY_ERROR = "E"


def control_id() -> str:
    """A fresh MSH-10 for a message we send (ST, at most 20 characters in v2.5)."""
    return uuid.uuid4().hex[:20]


def build(header: Header, code: str, *, error_text: str = "", error_code: str = "", error_location: str = "") -> str:
    """The ACK for `header` as text with CR segment ends: AA, or AE/AR with an ERR segment."""
    now = timezone.localtime().strftime("%Y%m%d%H%M%S")
    echo = {name: _echo(getattr(header, name)) for name in ECHOED}
    event = echo["event"]
    msh = [
        "MSH",
        "^~\\&",
        echo["receiving_application"] or settings.AE_TITLE,
        echo["receiving_facility"],
        echo["sending_application"],
        echo["sending_facility"],
        now,
        "",
        f"ACK^{event}^ACK" if event else "ACK",
        control_id(),
        echo["processing_id"] or "P",
        echo["version"] or "2.5",
        "",
        "",
        "",
        "",
        "",
        echo["charset"],
    ]
    segments = ["|".join(msh).rstrip("|")]
    segments.append("|".join(["MSA", code, echo["control_id"], escape(error_text)[:80]]).rstrip("|"))
    if code != "AA":
        segments.append(_err(error_code or "207", error_text, error_location))
    return "\r".join(segments) + "\r"


ECHOED = ("receiving_application", "receiving_facility", "sending_application", "sending_facility", "event",
          "control_id", "processing_id", "version", "charset")  # fmt: skip
# A header read leniently may hold our field, repetition or segment separators: they would break the ACK.
NOT_ECHOED_RE = re.compile(r"[|~\x00-\x1f\x7f]")


def _echo(value: str) -> str:
    """A header value sent back in the ACK, its components kept, its structure-breaking characters dropped."""
    return NOT_ECHOED_RE.sub("", value)


def _err(error_code: str, text: str, location: str) -> str:
    """ERR (v2.5): ERR-2 location SEG^1^FIELD, ERR-3 code from table 0357, ERR-4 severity, ERR-8 text."""
    where = ""
    if location:
        segment, _, number = location.partition("-")
        where = f"{segment}^1^{number}" if number else segment
    meaning = TABLE_0357.get(error_code, "Application internal error")
    return "|".join(["ERR", "", where, f"{error_code}^{meaning}^HL70357", SEVERITY_ERROR, "", "", "", escape(text)])


TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


def encode(ack: str, codec: str) -> bytes:
    """In the message's own character set, so the sender reads its echoed fields back unchanged."""
    return ack.encode(codec or "utf-8", errors="replace")
