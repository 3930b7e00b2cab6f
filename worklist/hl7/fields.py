"""Reading HL7 fields as DICOM values: unescaped text, PN from XPN/XCN, DA/TM from TS, codes, UIDs."""

from __future__ import annotations

import re

from hl7.containers import Message, Segment

from worklist.errors import DATA_TYPE_ERROR, WorklistError
from worklist.hl7.text import PN_DELIMITERS, lo, unescape

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
DIGITS_RE = re.compile(r"^[0-9]+")


class Fields:
    """One segment's fields as unescaped text (python-hl7 splits, we unescape with the message's codec)."""

    def __init__(self, message: Message, segment: Segment, encoding: str = "utf-8") -> None:
        self.message, self.segment, self.encoding = message, segment, encoding
        self.name = str(segment[0])

    def raw(self, number: int, component: int = 1, subcomponent: int = 1, repetition: int = 1) -> str:
        node = self.segment[number] if number < len(self.segment) else ""
        for index in (repetition, component, subcomponent):
            if isinstance(node, str):
                return node if index == 1 else ""
            node = node[index - 1] if index <= len(node) else ""
        return node if isinstance(node, str) else str(node)

    def get(self, number: int, component: int = 1, subcomponent: int = 1, repetition: int = 1) -> str | None:
        """The value; None when absent, "" for HL7's explicit null `""`."""
        raw = self.raw(number, component, subcomponent, repetition)
        if raw == "":
            return None
        if raw == '""':
            return ""
        return unescape(raw, self.message.esc, self.message.separators, self.encoding)

    def text(self, number: int, component: int = 1, subcomponent: int = 1, repetition: int = 1) -> str:
        return self.get(number, component, subcomponent, repetition) or ""

    def repetitions(self, number: int) -> int:
        if number >= len(self.segment):
            return 0
        node = self.segment[number]
        return 1 if isinstance(node, str) else len(node)


# --- values -----------------------------------------------------------------------


def identifier(value: str | None, max_length: int, location: str) -> str | None:
    """Identifiers are never truncated: too long is an error (AE), not a silent change of key."""
    if value is None:
        return None
    value = value.strip()
    if len(value) > max_length or "\\" in value:
        raise WorklistError(f"{location} longer than {max_length} characters", code=DATA_TYPE_ERROR, location=location)
    return value


def pn(parts: list[str | None]) -> str | None:
    """family, given, middle, prefix, suffix -> DICOM PN (PS3.5 6.2.1); delimiters inside a part become spaces."""
    if all(part is None for part in parts):
        return None
    cleaned = [lo(part or "", 64, extra=PN_DELIMITERS) for part in parts]
    return "^".join(cleaned).rstrip("^")[:324]


def xpn(fields: Fields, number: int) -> str | None:
    # XPN: 1 family (FN.1), 2 given, 3 middle, 4 suffix, 5 prefix
    g = lambda c: fields.get(number, c)  # noqa: E731
    return pn([g(1), g(2), g(3), g(5), g(4)])


def xcn(fields: Fields, number: int, repetition: int = 1) -> str | None:
    # XCN: 1 ID, 2 family, 3 given, 4 middle, 5 suffix, 6 prefix
    g = lambda c: fields.get(number, c, repetition=repetition)  # noqa: E731
    return pn([g(2), g(3), g(4), g(6), g(5)])


def cnn(fields: Fields, number: int) -> str | None:
    # NDL.1 CNN as subcomponents: 1 ID, 2 family, 3 given, 4 middle, 5 suffix, 6 prefix
    g = lambda s: fields.get(number, 1, s)  # noqa: E731
    return pn([g(2), g(3), g(4), g(6), g(5)])


def date_time(value: str | None, location: str) -> tuple[str | None, str | None]:
    """HL7 TS/DTM -> (DA, TM): the offset is dropped; DICOM keeps local time."""
    if value is None:
        return None, None
    if value == "":
        return "", ""
    digits = re.split(r"[+-]", value.strip(), maxsplit=1)[0]
    if not DIGITS_RE.match(digits) or len(digits) < 8:
        raise WorklistError(f"{location} is not a date/time", code=DATA_TYPE_ERROR, location=location)
    return digits[:8], digits[8:16]


def coded(fields: Fields, number: int, first: int = 1, repetition: int = 1) -> dict | None:
    """CE/CWE components (identifier, text, coding system) -> {"value", "meaning", "scheme"}."""
    value = fields.text(number, first, repetition=repetition)
    if not value:
        return None
    return {
        "value": lo(value, 16),
        "meaning": lo(fields.text(number, first + 1, repetition=repetition), 64),
        "scheme": lo(fields.text(number, first + 2, repetition=repetition), 16),
    }


def uid(value: str | None, location: str) -> str | None:
    if value is None or value == "":
        return None
    value = value.strip()
    if len(value) > 64 or not UID_RE.match(value):
        raise WorklistError(f"{location} is not a DICOM UID", code=DATA_TYPE_ERROR, location=location)
    return value


def short_text(value: str | None, max_length: int) -> str | None:
    return None if value is None else lo(value, max_length)
