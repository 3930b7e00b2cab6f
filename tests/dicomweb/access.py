"""Helpers for the STOW-RS, token and access tests: tokens, storage and hand-made multipart bodies."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicomweb.models import ApiToken
from gateway import store

BOUNDARY = "isthmus-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def bearer(*, read: bool = True, write: bool = True, name: str = "viewer", **options) -> dict[str, str]:
    _token, raw = ApiToken.issue(name, read=read, write=write, **options)
    return {"Authorization": f"Bearer {raw}"}


def encode(dataset: Dataset) -> bytes:
    """A data set as Part 10 bytes, the way dicomweb-client encodes each part."""
    with BytesIO() as buffer:
        pydicom.dcmwrite(buffer, dataset)
        return buffer.getvalue()


def multipart(*parts: bytes | tuple[str, bytes], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/related body; a part given as (content type, bytes) gets that Content-Type."""
    body = b""
    for part in parts:
        content_type, data = part if isinstance(part, tuple) else ("application/dicom", part)
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def leftover_temp_files() -> list[Path]:
    return [path for path in store.temp_dir().iterdir() if path.is_file() and not path.name.startswith(".")]


def stored_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*.dcm") if store.tempdirs.TEMP_DIR not in path.parts)
