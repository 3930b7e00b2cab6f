"""A received DICOM Part 10 file, read without touching its pixel data.

The store needs two things from a file before it may keep it: the few header
attributes the index holds, and proof the data set is whole (a truncated
transfer must not become a stored instance). Both are done here by reading
element headers and skipping values, so a 2 GB multi-frame costs a few reads.
A deflated data set is first inflated under caps into a temp file
(gateway/inflate.py); one that passes them is a decoding bomb (Bomb).
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from gateway import clamped, inflate

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# PS3.5 7.1.2: explicit VRs whose length is 4 bytes after 2 reserved bytes.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
MAX_DEPTH = 32


class Unreadable(Exception):
    """Not a complete, parseable Part 10 file; the message says why (no patient data)."""


class Bomb(Unreadable):
    """A deflated data set that inflates past a cap: hostile, refused whole. Carries the meta's SOP Instance UID."""

    def __init__(self, reason: str, sop_instance_uid: str = "") -> None:
        super().__init__(reason)
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class Header:
    """What the store needs from a file: its meta information and the indexed attributes."""

    dataset: Dataset
    transfer_syntax_uid: str
    sop_class_uid: str  # from the file meta: what the C-STORE command (or STOW part) announced
    sop_instance_uid: str
    dataset_offset: int


WINDOW = 1 << 16  # bytes read at a time; a header usually fits in one
_TAG = {"<": struct.Struct("<HH"), ">": struct.Struct(">HH")}
_SHORT = {"<": struct.Struct("<H"), ">": struct.Struct(">H")}
_LONG = {"<": struct.Struct("<L"), ">": struct.Struct(">L")}
_META_UIDS = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax_uid"}


def read_header(
    path: Path, tags: Iterable[int], *, caps: inflate.Limits | None = None, scratch: Path | None = None
) -> Header:
    """Check `path` is a whole Part 10 file and read only `tags` (never pixel data).

    One open, element headers taken from a read-ahead window, values skipped by offset.
    A deflated data set is inflated under `caps` (the settings' by default) into a temp
    file in `scratch` (the store passes its temp area; the system temp dir by default), read, then removed.
    """
    try:
        with open(path, "rb") as stream:
            window = _Window(stream)
            meta = _file_meta(window)
            if meta is None:  # not the usual layout: pydicom's reader judges it
                file_meta, offset = clamped.split_dataset(path)
                meta = {name: str(file_meta.get(keyword, "")).strip("\0 ") for name, keyword in _META_KEYWORDS}, offset
            uids, offset = meta
            transfer_syntax = UID(uids["transfer_syntax_uid"])
            if not transfer_syntax or not transfer_syntax.is_transfer_syntax:
                raise Unreadable("no usable transfer syntax in the file meta information")
            if transfer_syntax == DeflatedExplicitVRLittleEndian:
                dataset = _inflated_dataset(
                    path, tags, uids, caps or inflate.limits(), scratch or Path(tempfile.gettempdir())
                )
            else:
                dataset = _walked_dataset(path, window, offset, transfer_syntax, frozenset(tags))
    except Unreadable:
        raise
    except _PARSE_ERRORS as exc:
        raise Unreadable(f"cannot parse the data set: {type(exc).__name__}") from exc
    return Header(
        dataset=dataset,
        transfer_syntax_uid=str(transfer_syntax),
        sop_class_uid=uids["sop_class_uid"],
        sop_instance_uid=uids["sop_instance_uid"],
        dataset_offset=offset,
    )


# What pydicom raises on malformed input, besides its own InvalidDicomError (found by tests/gateway/test_part10_fuzz.py).
_PARSE_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    NotImplementedError,
    struct.error,
    zlib.error,
)


def _walked_dataset(path: Path, window: _Window, offset: int, transfer_syntax: UID, wanted: frozenset[int]) -> Dataset:
    """Walk every element header to the end (the completeness check), keeping where the wanted ones are."""
    walker = _Walker(window, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian, wanted)
    walker.elements(offset, end=window.size, depth=0)
    if walker.undefined_wanted:  # a wanted element of undefined length: let pydicom read them
        return clamped.read_header(path, specific_tags=list(wanted))
    return _dataset(window, walker.found, transfer_syntax)


def _inflated_dataset(
    path: Path, tags: Iterable[int], uids: dict[str, str], caps: inflate.Limits, scratch: Path
) -> Dataset:
    """PS3.5 A.5: the deflated data set inflated under caps into a temp file (Explicit VR Little Endian) and walked."""
    try:
        with inflate.inflated_copy(path, scratch, caps) as copy:
            return read_header(copy, tags).dataset
    except inflate.Exceeded as exc:
        raise Bomb(str(exc), uids["sop_instance_uid"]) from None
    except inflate.Broken as exc:
        raise Unreadable(str(exc)) from None


_META_KEYWORDS = (
    ("sop_class_uid", "MediaStorageSOPClassUID"),
    ("sop_instance_uid", "MediaStorageSOPInstanceUID"),
    ("transfer_syntax_uid", "TransferSyntaxUID"),
)


class _Window:
    """A file seen through a read-ahead window: small reads come from memory, far ones seek."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.size = stream.seek(0, 2)
        self.base, self.data = 0, b""

    def at(self, position: int, count: int) -> tuple[bytes, int]:
        """(buffer, index) such that buffer[index:index + count] are the file's bytes at `position`."""
        index = position - self.base
        if index < 0 or index + count > len(self.data):
            if position + count > self.size:
                raise Unreadable("the data set ends inside an element header")
            self.stream.seek(position)
            self.data, self.base, index = self.stream.read(max(count, WINDOW)), position, 0
            if len(self.data) < count:
                raise Unreadable("the file shrank while it was read")
        return self.data, index

    def read(self, position: int, count: int) -> bytes:
        data, index = self.at(position, count)
        return data[index : index + count]


def _file_meta(window: _Window) -> tuple[dict[str, str], int] | None:
    """The group 0002 UIDs and where the data set starts, read by hand (PS3.10 7.1: explicit VR little endian).

    None when it has an unusual layout (an odd VR, a huge value): pydicom's reader then judges it.
    """
    if window.size < 132 or window.read(128, 4) != b"DICM":
        raise Unreadable("not a DICOM Part 10 file (no preamble and DICM prefix)")
    try:
        uids, position = dict.fromkeys(_META_UIDS.values(), ""), 132
        while position + 8 <= window.size:
            data, index = window.at(position, 8)
            group, element = _TAG["<"].unpack_from(data, index)
            if group != 0x0002:
                break
            vr = data[index + 4 : index + 6]
            if not (vr.isalpha() and vr.isupper()):
                return None
            if vr in LONG_VRS:
                (length,), start = _LONG["<"].unpack(window.read(position + 8, 4)), position + 12
            else:
                (length,), start = _SHORT["<"].unpack_from(data, index + 6), position + 8
            if length > WINDOW:
                return None
            if element in _META_UIDS:
                uids[_META_UIDS[element]] = window.read(start, length).decode("ascii").strip("\0 ")
            position = start + length
        return uids, position
    except (UnicodeDecodeError, struct.error):
        return None


def _dataset(window: _Window, found: dict[int, tuple[str | None, int, int]], transfer_syntax: UID) -> Dataset:
    """The wanted elements as raw elements, decoded by pydicom only when read (one pass over the file, not two)."""
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    elements = {}
    for tag, (vr, value_offset, length) in sorted(found.items()):
        value = window.read(value_offset, length) if length else b""
        elements[BaseTag(tag)] = RawDataElement(
            BaseTag(tag), vr, length, value, value_offset, implicit, little, True, False
        )
    dataset = Dataset(elements)
    dataset.set_original_encoding(implicit, little)
    return dataset


class _Walker:
    """Walks element headers, skipping over values, and checks each length fits the file.

    `found` gets where the `wanted` top-level elements are: tag -> (explicit VR or None, value offset, length).
    """

    def __init__(self, window: _Window, implicit: bool, little: bool, wanted: frozenset[int] = frozenset()) -> None:
        self.window, self.size, self.implicit = window, window.size, implicit
        endian = "<" if little else ">"
        self.tag_struct, self.short, self.long = _TAG[endian], _SHORT[endian], _LONG[endian]
        self.wanted = wanted
        self.found: dict[int, tuple[str | None, int, int]] = {}
        self.undefined_wanted = False
        self.position = 0

    def _tag_and_length(self) -> tuple[int, bytes | None, int]:
        """The element header at `position` (tag, explicit VR or None, length); `position` moves past it."""
        position = self.position
        data, index = self.window.at(position, 8)
        group, element = self.tag_struct.unpack_from(data, index)
        if self.implicit:
            (length,) = self.long.unpack_from(data, index + 4)
            self.position = position + 8
            return group << 16 | element, None, length
        vr = data[index + 4 : index + 6]
        if vr in LONG_VRS:
            data, index = self.window.at(position + 8, 4)
            (length,) = self.long.unpack_from(data, index)
            self.position = position + 12
        else:
            (length,) = self.short.unpack_from(data, index + 6)
            self.position = position + 8
        return group << 16 | element, vr, length

    def _skip(self, length: int, end: int) -> None:
        if self.position + length > end:
            raise Unreadable("an element's value runs past the end of the data set")
        self.position += length

    def elements(self, start: int | None = None, *, end: int | None, depth: int) -> None:
        """A data set up to `end`, or (end is None) up to its item delimiter."""
        if depth > MAX_DEPTH:
            raise Unreadable("sequences nested too deep")
        if start is not None:
            self.position = start
        limit = end if end is not None else self.size + 1
        while self.position < limit:
            if self.position + 8 > self.size:
                raise Unreadable("the data set ends inside an element header")
            if end is None:
                data, index = self.window.at(self.position, 4)
                if self.tag_struct.unpack_from(data, index) == (0xFFFE, 0xE00D) and end is None:
                    self.position += 8  # item delimiter and its zero length
                    return
            tag, vr, length = self._tag_and_length()
            if tag >> 16 == 0xFFFE:
                raise Unreadable("an item delimiter where an element was expected")
            if depth == 0 and tag in self.wanted:
                if length == UNDEFINED:
                    self.undefined_wanted = True
                else:
                    self.found[tag] = (vr.decode("ascii", "replace") if vr else None, self.position, length)
            if length == UNDEFINED:
                self.items(
                    depth + 1, implicit_value=vr == b"UN"
                )  # PS3.5 6.2.2: UN of undefined length is implicit VR LE
            else:
                self._skip(length, end if end is not None else self.size)
        if end is None:
            raise Unreadable("an item of undefined length has no delimiter")
        if self.position != end:
            raise Unreadable("element lengths do not add up to the data set")

    def items(self, depth: int, implicit_value: bool) -> None:
        """The items of an undefined-length value (a sequence or encapsulated pixel data)."""
        while True:
            if self.position + 8 > self.size:
                raise Unreadable("the data set ends inside an element header")
            data, index = self.window.at(self.position, 8)
            group, element = self.tag_struct.unpack_from(data, index)
            (length,) = self.long.unpack_from(data, index + 4)
            self.position += 8
            tag = group << 16 | element
            if tag == SEQUENCE_END:
                return
            if tag != ITEM:
                raise Unreadable("a sequence holds something other than items")
            if length != UNDEFINED:
                self._skip(length, self.size)
            elif implicit_value and not self.implicit:
                inner = _Walker(self.window, True, True)
                inner.position = self.position
                inner.elements(end=None, depth=depth)
                self.position = inner.position
            else:
                self.elements(end=None, depth=depth)
