"""HL7 escape sequences (HL7 v2.5 2.7) and turning text into single-valued DICOM strings."""

from __future__ import annotations

import re

# Inside one PN component these are DICOM delimiters (PS3.5 6.2.1), not text.
PN_DELIMITERS = "^="
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
HEX_RE = re.compile(r"^[0-9A-Fa-f]+$")
FORMATTING_AS_SPACE = {".br", ".sp", ".ce", ".sk"}


def unescape(raw: str, esc: str, separators: str, encoding: str) -> str:
    """Resolve \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ and \\Xhh..\\ (bytes in the message's character set).

    Highlighting, character-set switches (\\C..\\, \\M..\\) and local (\\Z..\\) escapes are dropped.
    `separators` is python-hl7's order: segment, field, repetition, component, subcomponent.
    """
    if esc not in raw:
        return raw
    mapping = {"F": separators[1], "R": separators[2], "S": separators[3], "T": separators[4], "E": esc}
    out: list[str] = []
    position = 0
    while position < len(raw):
        start = raw.find(esc, position)
        end = raw.find(esc, start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            out.append(raw[position:])
            break
        out.append(raw[position:start])
        out.append(_sequence(raw[start + 1 : end], mapping, encoding))
        position = end + 1
    return "".join(out)


def _sequence(body: str, mapping: dict[str, str], encoding: str) -> str:
    if body in mapping:
        return mapping[body]
    if body[:1] == "X" and len(body) % 2 == 1 and HEX_RE.match(body[1:]):
        return bytes.fromhex(body[1:]).decode(encoding or "utf-8", errors="replace")
    if body[:3] in FORMATTING_AS_SPACE:
        return " "
    return ""  # \H\ \N\ \C..\ \M..\ \Z..\ and formatting we do not render


def lo(value: str, max_length: int, extra: str = "") -> str:
    """One DICOM string value: no backslash (the VM delimiter), no control characters, at most max_length."""
    cleaned = CONTROL_RE.sub(" ", value).replace("\\", " ")
    for character in extra:
        cleaned = cleaned.replace(character, " ")
    return cleaned.strip()[:max_length].strip()


def escape(text: str) -> str:
    """Text for a field of a message we write with the standard separators |^~\\&."""
    text = CONTROL_RE.sub(" ", text).replace("\\", "\\E\\")
    for character, sequence in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(character, sequence)
    return text
