"""Pixel data frames for WADO-RS /frames and /bulkdata: read straight from the file, one frame at a time.

A native frame is streamed from the file in chunks; a decoded one is held whole, so its size is checked first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import UID

from dicomweb import decoding
from dicomweb.base import DicomWebError

OCTET_STREAM = "application/octet-stream"
# PS3.18 Table 8.7.3-2 (and -5): the media type of each compressed transfer syntax's frames.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
_LONG_LENGTH_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT"}
CHUNK = 1 << 20


def frame_numbers(text: str, count: int) -> list[int]:
    """PS3.18 8.3.3.1 {frames}: comma-separated 1-based numbers; 400 when malformed, 404 when out of range."""
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise DicomWebError(400, "frames must be a comma-separated list of frame numbers") from None
    if not numbers or any(number < 1 for number in numbers):
        raise DicomWebError(400, "frame numbers start at 1")
    if any(number > count for number in numbers):
        raise DicomWebError(404, f"the instance has {count} frame(s)")
    return numbers


class PixelFile:
    """An instance file (retrieve.open_instance) at its Pixel Data value: the header is parsed, the pixels are not read.

    It owns `source` and closes it.
    """

    def __init__(self, source: BinaryIO) -> None:
        self.fp = source
        try:
            self.dataset: Dataset = dcmread(self.fp, stop_before_pixels=True)
            self.syntax = UID(self.dataset.file_meta.TransferSyntaxUID)
            self.length = self._value_header()
        except Exception:
            self.fp.close()
            raise
        self.value_start = self.fp.tell()

    def __enter__(self) -> PixelFile:
        return self

    def __exit__(self, *exc) -> None:
        self.fp.close()

    def _value_header(self) -> int:
        endian = "<" if self.syntax.is_little_endian else ">"
        head = self.fp.read(8)
        if len(head) < 8 or struct.unpack(f"{endian}HH", head[:4]) != (0x7FE0, 0x0010):
            raise DicomWebError(404, "the instance has no pixel data")
        if self.syntax.is_implicit_VR:
            return struct.unpack(f"{endian}L", head[4:])[0]
        if head[4:6] in _LONG_LENGTH_VRS:
            return struct.unpack(f"{endian}L", self.fp.read(4))[0]
        return struct.unpack(f"{endian}H", head[6:])[0]

    @property
    def count(self) -> int:
        return int(self.dataset.get("NumberOfFrames") or 1)

    @property
    def media_type(self) -> str:
        """What the stored frames are: a compressed image type, or octet-stream for native pixels."""
        return FRAME_MEDIA_TYPES.get(self.syntax, OCTET_STREAM) if self.syntax.is_encapsulated else OCTET_STREAM

    @property
    def needs_decoding(self) -> bool:
        """True when the stored frames are not native little-endian pixels (compressed, or big endian)."""
        return self.syntax.is_encapsulated or not self.syntax.is_little_endian

    def stored_frame(self, number: int) -> Iterator[bytes]:
        """Frame `number` (1-based) as stored: the compressed bitstream, or the native pixel bytes in chunks."""
        if self.syntax.is_encapsulated:
            self.fp.seek(self.value_start)
            yield get_frame(self.fp, number - 1, number_of_frames=self.count)
            return
        size = self._native_frame_size()
        start = self.value_start + (number - 1) * size
        for offset in range(0, size, CHUNK):
            self.fp.seek(start + offset)  # the position is ours again at each chunk
            chunk = self.fp.read(min(CHUNK, size - offset))
            if not chunk:
                return
            yield chunk

    def _native_frame_size(self) -> int:
        ds = self.dataset
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
        if bits % 8:
            raise DicomWebError(406, "frames of 1-bit pixel data are only available in the stored bulk data")
        return int(ds.Rows) * int(ds.Columns) * samples * bits // 8

    def check_decoding(self, what: str) -> None:
        """406 before decoding when one frame would pass ISTHMUS_MAX_DECODE_MB (frames are decoded one at a time)."""
        decoding.check(self.dataset, 1, what, f"accept {self.media_type} (the frames as stored)")

    def decoded_frame(self, number: int) -> Iterator[bytes]:
        """Frame `number` decoded to native little-endian pixel bytes (YCbCr converted to RGB, as decompress does)."""
        if not self.syntax.is_encapsulated and self.syntax.is_little_endian:
            yield from self.stored_frame(number)
            return
        array = pixel_array(self.fp, index=number - 1, as_rgb=True)  # this frame only
        yield array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
