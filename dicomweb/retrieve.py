"""WADO-RS reads: which instances a URL names, in which transfer syntax they go, and their bytes from disk.

Stored files are streamed in chunks. An instance that must be decoded for the client is re-encoded in memory,
one instance at a time.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

from django.db.models import QuerySet
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomweb.accept import ANY_SYNTAX, EXPLICIT_VR_LITTLE_ENDIAN
from dicomweb.base import DicomWebError
from gateway import store
from gateway.models import Instance

CHUNK = 1 << 20
# What we re-encode to on request: the uncompressed little-endian syntaxes (we never compress).
TRANSCODE_TARGETS = {EXPLICIT_VR_LITTLE_ENDIAN, ImplicitVRLittleEndian}
# Re-encodable to Explicit VR Little Endian without a pixel decoder (big endian is retired and not converted).
_NATIVE_LITTLE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}


def instances(study: str, series: str = "", instance: str = "") -> QuerySet:
    """The instances a WADO-RS URL names, in series and instance order; 404 when there are none."""
    rows = Instance.objects.filter(series__study__study_instance_uid=study)
    if series:
        rows = rows.filter(series__series_instance_uid=series)
    if instance:
        rows = rows.filter(sop_instance_uid=instance)
    rows = rows.select_related("series__study").order_by("series__series_number", "series_id", "instance_number", "pk")
    if not rows.exists():
        raise DicomWebError(404, "no such study, series or instance")
    return rows


def representative(study: str, series: str = "", instance: str = "") -> Instance:
    """The image that stands for a study or series (its middle image by number); 404 when it has none."""
    rows = instances(study, series, instance).filter(rows__gt=0)
    count = rows.count()
    if not count:
        raise DicomWebError(404, "nothing here has an image")
    return rows[count // 2]


def can_decode(transfer_syntax: str) -> bool:
    """True when pydicom has a working decoder (plugin installed) for this transfer syntax."""
    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return uid in _NATIVE_LITTLE
    try:
        return get_decoder(uid).is_available
    except NotImplementedError:
        return False


def target_syntax(stored: str, acceptable: list[str]) -> str | None:
    """The transfer syntax an instance is sent in: as stored when accepted, else an accepted uncompressed one.

    None when the client accepts neither what is stored nor something we can decode it to (406).
    """
    for wanted in acceptable:
        if wanted in (ANY_SYNTAX, stored):
            return stored
        if wanted in TRANSCODE_TARGETS and can_decode(stored):
            return wanted
    return None


def file_size(path: Path) -> int | None:
    """The stored file's size, None when it is missing (indexed, but its file is gone)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def file_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, CHUNK at a time, opened only when the response body reaches it."""
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def transcoded_chunks(path: Path, syntax: str) -> Iterator[bytes]:
    """The instance re-encoded as Part 10 in `syntax` (one of TRANSCODE_TARGETS), decoding compressed pixels."""
    dataset = dcmread(path)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        dataset.decompress(as_rgb=True, generate_instance_uid=False)  # the same instance, decoded
    dataset.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    view = buffer.getbuffer()
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start : start + CHUNK])


def instance_chunks(instance: Instance, syntax: str, path: Path) -> Iterator[bytes]:
    """The instance's file (`path`, from store.instance_path) as stored, or transcoded to `syntax`."""
    if syntax == instance.transfer_syntax_uid:
        return file_chunks(path)
    return transcoded_chunks(path, syntax)


def read_header(instance: Instance) -> Dataset:
    """Everything before Pixel Data; large values stay on disk until asked for (defer_size)."""
    return dcmread(store.instance_path(instance), stop_before_pixels=True, defer_size=4096)


def pixel_vr(instance: Instance) -> str | None:
    """The VR Pixel Data has, for metadata (None when the instance has no image)."""
    if not instance.rows:
        return None
    if UID(instance.transfer_syntax_uid).is_encapsulated:
        return "OB"
    return "OW" if (instance.bits_allocated or 8) > 8 else "OB"
