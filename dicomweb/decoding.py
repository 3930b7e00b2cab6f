"""What WADO-RS may decode: the pixels a request would hold are counted from the header before any decoder runs.

A header may claim 60000 x 60000 pixels over a few bytes of encapsulated data, and a
decoder allocates the whole image before it reads a byte of it. Past ISTHMUS_MAX_DECODE_MB
the answer is 406 with a problem body: the stored representation is still there to accept
(the instance with transfer-syntax=*, a frame in its stored media type), and 413 would
speak of the request's own content (RFC 9110 15.5.14), which is not what is too large.
"""

from __future__ import annotations

from django.conf import settings
from pydicom.dataset import Dataset

from dicomweb.base import DicomWebError


def number(dataset: Dataset, keyword: str, default: int) -> int:
    """A header's count as an int; a missing, empty or malformed one counts as `default`."""
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def sample_bytes(bits_allocated: int) -> int:
    """Bytes a decoder gives each sample: 1-bit pixels are unpacked to a byte, 24 bits go into 4."""
    return next((size for size in (1, 2, 4, 8) if bits_allocated <= 8 * size), 8)


def decoded_size(dataset: Dataset, frames: int, per_sample: int | None = None) -> int:
    """Rows x Columns x frames x Samples per Pixel x bytes per sample (from Bits Allocated unless `per_sample`)."""
    rows, columns = number(dataset, "Rows", 0), number(dataset, "Columns", 0)
    samples = max(number(dataset, "SamplesPerPixel", 1), 1)
    per_sample = per_sample or sample_bytes(number(dataset, "BitsAllocated", 8))
    return rows * columns * max(frames, 1) * samples * per_sample


def frame_count(dataset: Dataset) -> int:
    return max(number(dataset, "NumberOfFrames", 1), 1)


def check(dataset: Dataset, frames: int, what: str, instead: str, *, per_sample: int | None = None) -> None:
    """Refuse (406) before decoding `frames` frames of `dataset` when they would pass ISTHMUS_MAX_DECODE_MB.

    `what` names the resource and `instead` what the client may accept; both go in the problem's detail.
    `per_sample` counts a working copy's bytes instead of the decoded ones (rendering works in float64).
    """
    size = decoded_size(dataset, frames, per_sample)
    if size > settings.MAX_DECODE_BYTES:
        shape = (
            f"{number(dataset, 'Rows', 0)} x {number(dataset, 'Columns', 0)} x {max(frames, 1)} frame(s) x "
            f"{number(dataset, 'BitsAllocated', 8)} bits x {max(number(dataset, 'SamplesPerPixel', 1), 1)} sample(s)"
        )
        raise DicomWebError(
            406,
            f"{what}: {shape} would need {size >> 20} MB, more than ISTHMUS_MAX_DECODE_MB "
            f"({settings.MAX_DECODE_BYTES >> 20}); {instead}",
        )
