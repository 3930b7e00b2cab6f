"""Streamed multipart/related bodies (RFC 2387, PS3.18 8.7.3.2): parts are written as their bytes are read."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Part:
    """One body part: its Content-Type, extra headers, and its content as an iterable of chunks."""

    content_type: str
    chunks: Iterable[bytes]
    headers: dict[str, str] | None = None


def new_boundary() -> str:
    return uuid.uuid4().hex


def content_type(part_type: str, boundary: str, transfer_syntax: str = "") -> str:
    """The Content-Type of the whole message: `multipart/related; type="..."; boundary=...`."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return value + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")


def stream(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """Yield the encoded message part by part; a part's chunks are passed through, never joined."""
    delimiter = f"--{boundary}".encode()
    for part in parts:
        headers = {"Content-Type": part.content_type, **(part.headers or {})}
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        yield delimiter + b"\r\n" + head.encode("latin-1") + b"\r\n"
        for chunk in part.chunks:
            if chunk:
                yield chunk
        yield b"\r\n"
    yield delimiter + b"--\r\n"
