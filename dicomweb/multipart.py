"""Streamed multipart/related bodies (RFC 2387, PS3.18 8.7.3.2): parts are written as their bytes are read."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


@dataclass
class Part:
    """One body part: its Content-Type, extra headers, its content as an iterable of chunks, and its size if known."""

    content_type: str
    chunks: Iterable[bytes]
    headers: dict[str, str] | None = None
    size: int | None = None


def new_boundary() -> str:
    return uuid.uuid4().hex


def content_type(part_type: str, boundary: str, transfer_syntax: str = "") -> str:
    """The Content-Type of the whole message: `multipart/related; type="..."; boundary=...`."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return value + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")


def _head(part: Part, delimiter: bytes) -> bytes:
    headers = {"Content-Type": part.content_type, **(part.headers or {})}
    return delimiter + b"\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("latin-1")


def stream(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """Yield the encoded message part by part; a part's chunks are passed through, never joined.

    The CRLF that ends a part goes out with the next part's head: two writes per part, not three.
    """
    delimiter = f"--{boundary}".encode()
    lead = b""
    for part in parts:
        yield lead + _head(part, delimiter) + b"\r\n"
        for chunk in part.chunks:
            if chunk:
                yield chunk
        lead = b"\r\n"
    yield lead + delimiter + b"--\r\n"


def length(parts: Sequence[Part], boundary: str) -> int | None:
    """The encoded message's size when every part's size is known (None otherwise), for Content-Length.

    A known length spares server and client the chunked encoding (gunicorn joins each chunk
    with its size line, a copy of every file) and lets the client show progress.
    """
    if any(part.size is None for part in parts):
        return None
    delimiter = f"--{boundary}".encode()
    closing = len(delimiter) + 4  # "--" CRLF
    return sum(len(_head(part, delimiter)) + 2 + part.size + 2 for part in parts) + closing
