"""pydicom reading a file whose reads are clamped to what the file holds.

pydicom reads a value with `fp.read(length)` for the length the file declares, and CPython
allocates the whole requested size before reading: a 100-byte file declaring a 4 GB value
costs a 4 GB allocation (or a MemoryError). Through ClampedFile a read asks for no more than
is left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble


class ClampedFile:
    """`stream` with read(n) cut to the bytes left; every other attribute is the stream's."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._size = os.fstat(stream.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        left = max(self._size - self._stream.tell(), 0)
        return self._stream.read(left if size is None or size < 0 or size > left else size)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def split_dataset(path: Path) -> tuple[FileMetaDataset, int]:
    """The file meta information (PS3.10 7.1) and the offset of the data set, as pynetdicom's split_dataset."""
    with open(path, "rb") as raw:
        stream = ClampedFile(raw)
        read_preamble(stream, False)
        meta = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=_past_group_0002)
        return FileMetaDataset(meta), stream.tell()


def read_header(path: Path, **options) -> Dataset:
    """dcmread(path, stop_before_pixels=True, **options), read through a ClampedFile."""
    with open(path, "rb") as raw:
        return dcmread(ClampedFile(raw), stop_before_pixels=True, **options)


def _past_group_0002(tag, _vr, _length) -> bool:
    return tag.group != 2
