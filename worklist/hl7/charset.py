"""MSH-18 character sets (HL7 Table 0211) -> Python codecs, and decoding a message with one."""

from __future__ import annotations

from worklist.errors import TABLE_VALUE_NOT_FOUND, Rejected

# Single- and multi-byte sets that keep ASCII bytes as ASCII, so MSH can be read before decoding.
CODECS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}
DEFAULT = ""  # no MSH-18: UTF-8 (which ASCII is part of), else ISO 8859-1


def declared_charset(msh18: str) -> str:
    """The codec for MSH-18 ("" when absent); an unknown set is rejected rather than guessed."""
    name = " ".join(msh18.upper().split())
    if not name:
        return DEFAULT
    if name not in CODECS:
        raise Rejected(f"MSH-18 character set {msh18[:20]!r} not supported", TABLE_VALUE_NOT_FOUND)
    return CODECS[name]


def decode(raw: bytes, codec: str) -> str:
    """Decode a message; without MSH-18 accept UTF-8 and fall back to ISO 8859-1 (what senders use)."""
    if codec == DEFAULT:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise Rejected(f"bytes not valid in the MSH-18 character set ({codec}) at offset {exc.start}") from exc


def ack_codec(codec: str) -> str:
    return codec or "utf-8"
