"""A received DICOM Part 10 file, read without touching its pixel data.

The store needs two things from a file before it may keep it: the few header
attributes the index holds, and proof the data set is whole (a truncated
transfer must not become a stored instance). Both are done here by reading
element headers and skipping values, so a 2 GB multi-frame costs a few reads.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.dsutils import split_dataset

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# PS3.5 7.1.2: explicit VRs whose length is 4 bytes after 2 reserved bytes.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
MAX_DEPTH = 32


class Unreadable(Exception):
    """Not a complete, parseable Part 10 file; the message says why (no patient data)."""


@dataclass(frozen=True)
class Header:
    """What the store needs from a file: its meta information and the indexed attributes."""

    dataset: Dataset
    transfer_syntax_uid: str
    sop_class_uid: str  # from the file meta: what the C-STORE command (or STOW part) announced
    sop_instance_uid: str
    dataset_offset: int


def read_header(path: Path, tags: Iterable[int]) -> Header:
    """Check `path` is a whole Part 10 file and read only `tags` (never pixel data)."""
    try:
        file_meta, offset = split_dataset(path)
        transfer_syntax = UID(str(file_meta.get("TransferSyntaxUID", "")).strip("\0 "))
        if not transfer_syntax or not transfer_syntax.is_transfer_syntax:
            raise Unreadable("no usable transfer syntax in the file meta information")
        wanted = frozenset(tags)
        found = check_complete(path, offset, transfer_syntax, wanted)
        if found is None:  # deflated, or a wanted element of undefined length: let pydicom read them
            dataset = dcmread(path, stop_before_pixels=True, specific_tags=list(wanted))
        else:
            dataset = _dataset(path, found, transfer_syntax)
    except Unreadable:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error, zlib.error) as exc:
        raise Unreadable(f"cannot parse the data set: {type(exc).__name__}") from exc
    return Header(
        dataset=dataset,
        transfer_syntax_uid=str(transfer_syntax),
        sop_class_uid=str(file_meta.get("MediaStorageSOPClassUID", "")).strip("\0 "),
        sop_instance_uid=str(file_meta.get("MediaStorageSOPInstanceUID", "")).strip("\0 "),
        dataset_offset=offset,
    )


def check_complete(
    path: Path, offset: int, transfer_syntax: UID, wanted: frozenset[int] = frozenset()
) -> dict[int, tuple[str | None, int, int]] | None:
    """Raise Unreadable unless every element from `offset` on is whole (PS3.5 7.1, 7.5).

    Returns where the `wanted` top-level elements are: tag -> (explicit VR or None,
    value offset, length), or None when they cannot be read that way (deflated
    data, or a wanted element of undefined length).
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        _check_deflated(path, offset)
        return None
    with open(path, "rb") as stream:
        size = stream.seek(0, 2)
        stream.seek(offset)
        walker = _Walker(stream, size, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian, wanted)
        walker.elements(end=size, depth=0)
    return None if walker.undefined_wanted else walker.found


def _dataset(path: Path, found: dict[int, tuple[str | None, int, int]], transfer_syntax: UID) -> Dataset:
    """The wanted elements as raw elements, decoded by pydicom only when read (one pass over the file, not two)."""
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    elements = {}
    with open(path, "rb") as stream:
        for tag, (vr, value_offset, length) in sorted(found.items()):
            stream.seek(value_offset)
            value = stream.read(length)
            elements[BaseTag(tag)] = RawDataElement(
                BaseTag(tag), vr, length, value, value_offset, implicit, little, True, False
            )
    dataset = Dataset(elements)
    dataset.set_original_encoding(implicit, little)
    return dataset


def _check_deflated(path: Path, offset: int) -> None:
    """PS3.5 A.5: a deflated data set is whole when its zlib stream ends."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    with open(path, "rb") as stream:
        stream.seek(offset)
        while not inflater.eof and (chunk := stream.read(1 << 16)):
            while chunk and not inflater.eof:
                inflater.decompress(chunk, 1 << 20)  # bounded output: a zip bomb costs time, not memory
                chunk = inflater.unconsumed_tail
    if not inflater.eof:
        raise Unreadable("the deflated data set ends early")


class _Walker:
    """Walks element headers, seeking over values, and checks each length fits the file."""

    def __init__(
        self, stream: BinaryIO, size: int, implicit: bool, little: bool, wanted: frozenset[int] = frozenset()
    ) -> None:
        self.stream, self.size, self.implicit = stream, size, implicit
        self.endian = "<" if little else ">"
        self.wanted = wanted
        self.found: dict[int, tuple[str | None, int, int]] = {}
        self.undefined_wanted = False

    def _read(self, count: int) -> bytes:
        data = self.stream.read(count)
        if len(data) != count:
            raise Unreadable("the data set ends inside an element header")
        return data

    def _skip(self, length: int, end: int) -> None:
        position = self.stream.tell()
        if position + length > end:
            raise Unreadable("an element's value runs past the end of the data set")
        self.stream.seek(position + length)

    def _tag(self) -> int:
        group, element = struct.unpack(self.endian + "HH", self._read(4))
        return group << 16 | element

    def elements(self, end: int, depth: int) -> None:
        """A data set up to `end`, or (end is None) up to its item delimiter."""
        if depth > MAX_DEPTH:
            raise Unreadable("sequences nested too deep")
        while self.stream.tell() < (end if end is not None else self.size + 1):
            tag = self._tag()
            if tag == ITEM_END and end is None:
                self._read(4)
                return
            if tag >> 16 == 0xFFFE:
                raise Unreadable("an item delimiter where an element was expected")
            implicit_value, vr = False, None
            if self.implicit:
                (length,) = struct.unpack(self.endian + "L", self._read(4))
            else:
                vr = self._read(2)
                if vr in LONG_VRS:
                    self._read(2)
                    (length,) = struct.unpack(self.endian + "L", self._read(4))
                    implicit_value = vr == b"UN"  # PS3.5 6.2.2: UN of undefined length holds implicit VR LE
                else:
                    (length,) = struct.unpack(self.endian + "H", self._read(2))
            if depth == 0 and tag in self.wanted:
                if length == UNDEFINED:
                    self.undefined_wanted = True
                else:
                    self.found[tag] = (vr.decode("ascii", "replace") if vr else None, self.stream.tell(), length)
            if length == UNDEFINED:
                self.items(depth + 1, implicit_value)
            else:
                self._skip(length, end if end is not None else self.size)
        if end is None:
            raise Unreadable("an item of undefined length has no delimiter")
        if self.stream.tell() != end:
            raise Unreadable("element lengths do not add up to the data set")

    def items(self, depth: int, implicit_value: bool) -> None:
        """The items of an undefined-length value (a sequence or encapsulated pixel data)."""
        while True:
            tag = self._tag()
            (length,) = struct.unpack(self.endian + "L", self._read(4))
            if tag == SEQUENCE_END:
                return
            if tag != ITEM:
                raise Unreadable("a sequence holds something other than items")
            if length != UNDEFINED:
                self._skip(length, self.size)
            elif implicit_value and not self.implicit:
                inner = _Walker(self.stream, self.size, True, True)
                inner.elements(end=None, depth=depth)
            else:
                self.elements(end=None, depth=depth)
