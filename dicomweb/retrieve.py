"""WADO-RS reads: which instances a URL names, in which transfer syntax they go, and their bytes from disk.

Stored files are streamed in chunks. An instance that must be decoded for the client is re-encoded in memory,
one instance at a time, once its decoded size passed decoding.check(). A deflated instance is inflated as a
stream (to Explicit VR Little Endian) or into a temp copy, never whole in memory.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from django.db.models import QuerySet
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomweb import decoding
from dicomweb.accept import ANY_SYNTAX, EXPLICIT_VR_LITTLE_ENDIAN
from dicomweb.base import DicomWebError
from gateway import inflate, store
from gateway.models import Instance

CHUNK = 1 << 20
# What we re-encode to on request: the uncompressed little-endian syntaxes (we never compress).
TRANSCODE_TARGETS = {EXPLICIT_VR_LITTLE_ENDIAN, ImplicitVRLittleEndian}
# Re-encodable to Explicit VR Little Endian without a pixel decoder (big endian is retired and not converted).
_NATIVE_LITTLE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
# What decoding.check() reads: Rows, Columns, Number of Frames, Samples per Pixel, Bits Allocated.
IMAGE_TAGS = [0x00280010, 0x00280011, 0x00280008, 0x00280002, 0x00280100]


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
    A deflated instance goes only to Explicit VR Little Endian: the same bytes, inflated as a stream.
    """
    for wanted in acceptable:
        if wanted in (ANY_SYNTAX, stored):
            return stored
        if wanted in TRANSCODE_TARGETS and can_decode(stored):
            if stored != DeflatedExplicitVRLittleEndian or wanted == EXPLICIT_VR_LITTLE_ENDIAN:
                return wanted
    return None


def check_transcode(instance: Instance, syntax: str, path: Path) -> None:
    """406 before any decoding when sending `instance` in `syntax` would hold more than ISTHMUS_MAX_DECODE_MB."""
    if syntax == instance.transfer_syntax_uid or instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return  # sent as stored, or inflated as a stream
    header = dcmread(path, stop_before_pixels=True, specific_tags=IMAGE_TAGS)
    decoding.check(
        header,
        decoding.frame_count(header),
        f"{instance.sop_instance_uid} in {syntax}",
        f"accept it as stored ({instance.transfer_syntax_uid}) or transfer-syntax=*",
    )


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
    if instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return inflate.explicit_part10(path, inflate.limits())  # target_syntax() allows only Explicit VR LE
    return transcoded_chunks(path, syntax)


def open_instance(instance: Instance) -> BinaryIO:
    """The instance's file open for reading; a deflated one as its inflated copy (pydicom would inflate it in memory).

    The copy is in the store's temp area, already unlinked: closing the file frees it.
    """
    path = store.instance_path(instance)
    if instance.transfer_syntax_uid != DeflatedExplicitVRLittleEndian:
        return path.open("rb")
    try:
        return inflate.open_inflated(path, store.temp_dir(), inflate.limits())
    except inflate.Exceeded as exc:  # stored before the caps were what they are now
        raise DicomWebError(406, f"{instance.sop_instance_uid}: {exc}") from None
    except (inflate.Broken, zlib.error) as exc:
        raise DicomWebError(
            500, f"{instance.sop_instance_uid}: the stored deflated data set is broken ({exc})"
        ) from None


@contextmanager
def read_header(instance: Instance) -> Iterator[Dataset]:
    """Everything before Pixel Data; large values stay in the open file until asked for (defer_size)."""
    with open_instance(instance) as source:
        yield dcmread(source, stop_before_pixels=True, defer_size=4096)


def pixel_vr(instance: Instance) -> str | None:
    """The VR Pixel Data has, for metadata (None when the instance has no image)."""
    if not instance.rows:
        return None
    if UID(instance.transfer_syntax_uid).is_encapsulated:
        return "OB"
    return "OW" if (instance.bits_allocated or 8) > 8 else "OB"
