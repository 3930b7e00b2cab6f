"""Deflated data sets (PS3.5 A.5) inflated as a stream under caps, never whole in memory.

A 1 MB deflated data set can inflate to 1 GiB of zeros, and pydicom inflates a
deflated file whole into memory. Here zlib's output is taken a bounded piece at
a time, and the stream is refused as soon as it passes a cap on its inflated
size or on its ratio to the deflated size (a decoding bomb).
"""

from __future__ import annotations

import io
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from gateway import clamped

PIECE = 1 << 20  # most inflated bytes zlib hands back at once
READ = 1 << 16  # deflated bytes read at a time


class Exceeded(Exception):
    """The data set inflates past a cap; the message names the cap (no patient data)."""


class Broken(Exception):
    """Not a whole deflate stream (it ends early)."""


@dataclass(frozen=True)
class Limits:
    """Inflated size allowed: at most `max_bytes`, and at most `max_ratio` times the deflated size once past `ratio_floor`."""

    max_bytes: int
    max_ratio: float
    ratio_floor: int

    def ceiling(self, deflated_size: int) -> int:
        return int(min(self.max_bytes, max(self.ratio_floor, self.max_ratio * deflated_size)))

    def refusal(self, deflated_size: int) -> str:
        """Why a stream that passed ceiling() was refused, naming the setting to raise."""
        ceiling = self.ceiling(deflated_size)
        if ceiling == self.max_bytes:
            return f"the deflated data set inflates past {ceiling >> 20} MB (ISTHMUS_MAX_INSTANCE_MB)"
        return (
            f"the deflated data set ({deflated_size} bytes) inflates past {ceiling >> 20} MB, "
            f"a ratio above {self.max_ratio:g} (ISTHMUS_MAX_INFLATE_RATIO)"
        )


def limits() -> Limits:
    """The caps from the settings."""
    return Limits(settings.MAX_INSTANCE_BYTES, settings.MAX_INFLATE_RATIO, settings.INFLATE_RATIO_FLOOR_BYTES)


def inflate(stream: BinaryIO, deflated_size: int, caps: Limits) -> Iterator[bytes]:
    """The inflated bytes of a raw deflate stream (RFC 1951), at most PIECE at a time.

    Raises Exceeded past caps.ceiling(deflated_size), Broken if the stream ends early, zlib.error if corrupt.
    Bytes after the end of the stream (a padding byte) are ignored.
    """
    ceiling = caps.ceiling(deflated_size)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, full = 0, False
    while not inflater.eof:
        data = inflater.unconsumed_tail or stream.read(READ)
        if not data and not full:  # a full piece may leave output pending inside zlib: ask once more
            raise Broken("the deflated data set ends early")
        piece = inflater.decompress(data, PIECE)
        full = len(piece) == PIECE
        total += len(piece)
        if total > ceiling:
            raise Exceeded(caps.refusal(deflated_size))
        if piece:
            yield piece


def explicit_part10(path: Path, caps: Limits) -> Iterator[bytes]:
    """A deflated Part 10 file as Explicit VR Little Endian: the same data set inflated, under a new file meta.

    PS3.5 A.5: the deflated bytes are an Explicit VR Little Endian data set, so nothing is re-encoded.
    """
    meta, offset = clamped.split_dataset(path)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "FileMetaInformationGroupLength" not in meta:
        meta.FileMetaInformationGroupLength = 0  # write_file_meta_info sets it
    with open(path, "rb") as source:
        preamble = source.read(128)
        head = io.BytesIO()
        write_file_meta_info(head, meta, enforce_standard=False)
        yield preamble.ljust(128, b"\0") + b"DICM" + head.getvalue()
        size = source.seek(0, io.SEEK_END) - offset
        source.seek(offset)
        yield from inflate(source, size, caps)


@contextmanager
def inflated_copy(path: Path, directory: Path, caps: Limits) -> Iterator[Path]:
    """explicit_part10() written to a temp file in `directory` (the store's temp area), removed on exit."""
    handle, name = tempfile.mkstemp(dir=directory, suffix=".inflated")
    copy = Path(name)
    try:
        with os.fdopen(handle, "wb") as target:
            for piece in explicit_part10(path, caps):
                target.write(piece)
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def open_inflated(path: Path, directory: Path, caps: Limits) -> BinaryIO:
    """inflated_copy() opened for reading; its name is gone already, so closing the file frees its space."""
    with inflated_copy(path, directory, caps) as copy:
        return copy.open("rb")
