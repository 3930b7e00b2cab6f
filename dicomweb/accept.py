"""Accept header parsing for DICOMweb (RFC 9110 12.5.1 with PS3.18 8.7 type and transfer-syntax parameters)."""

from __future__ import annotations

from dataclasses import dataclass, field

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
ANY_SYNTAX = "*"


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: `type/subtype; param=value; q=0.5`."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def part_type(self) -> str:
        """The media type of the parts of a multipart/related range ('' when not multipart or not given)."""
        return self.params.get("type", "").lower() if self.media_type == "multipart/related" else ""

    @property
    def transfer_syntax(self) -> str:
        return self.params.get("transfer-syntax", "")

    def matches(self, media_type: str) -> bool:
        """True when this range covers `media_type` ('*/*', 'image/*' or equal)."""
        if self.media_type == "*/*":
            return True
        kind, _, subtype = self.media_type.partition("/")
        other_kind, _, _ = media_type.partition("/")
        return self.media_type == media_type or (subtype == "*" and kind == other_kind)


def _split(value: str, separator: str) -> list[str]:
    """Split on `separator` outside double quotes."""
    parts, current, quoted = [], [], False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_media_range(text: str) -> MediaRange | None:
    """One media range, or None when it is malformed."""
    pieces = [piece.strip() for piece in _split(text, ";")]
    media_type = pieces[0].lower()
    if media_type.count("/") != 1:
        return None
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"')
        if name == "q":
            try:
                q = max(0.0, min(1.0, float(value)))
            except ValueError:
                return None
        elif name:
            params[name] = value
    return MediaRange(media_type, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The acceptable ranges, most preferred first; an absent or empty header accepts anything."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [parse_media_range(item) for item in _split(header, ",") if item.strip()]
    usable = [media_range for media_range in ranges if media_range is not None and media_range.q > 0]
    return sorted(usable, key=lambda media_range: -media_range.q)  # sorted() is stable: header order breaks ties


def accepts_any(ranges: list[MediaRange], *media_types: str) -> bool:
    """True when a single-part range accepts one of `media_types`."""
    return any(media_range.matches(media_type) for media_range in ranges for media_type in media_types)


def dicom_syntaxes(ranges: list[MediaRange]) -> list[str] | None:
    """Transfer syntaxes acceptable for application/dicom instances, '*' meaning as stored; None: not acceptable.

    PS3.18 8.7.3.5.2: without a transfer-syntax parameter the default is Explicit VR Little Endian.
    """
    syntaxes: list[str] = []
    for media_range in ranges:
        if media_range.media_type == "multipart/related":
            if media_range.part_type not in ("", "application/dicom"):
                continue
        elif media_range.media_type not in ("*/*", "application/*", "application/dicom"):
            continue
        syntaxes.append(media_range.transfer_syntax or EXPLICIT_VR_LITTLE_ENDIAN)
    return syntaxes or None


def frame_types(ranges: list[MediaRange]) -> list[tuple[str, str]]:
    """(part media type, transfer syntax) pairs acceptable for frames or bulk data, in preference order.

    '*/*' (also for a bare multipart/related) leaves the choice to us: the stored form.
    """
    pairs: list[tuple[str, str]] = []
    for media_range in ranges:
        if media_range.media_type == "multipart/related":
            pairs.append((media_range.part_type or "*/*", media_range.transfer_syntax))
        elif media_range.media_type in ("*/*", "application/*"):
            pairs.append(("*/*", ""))
        else:
            pairs.append((media_range.media_type, media_range.transfer_syntax))
    return pairs
