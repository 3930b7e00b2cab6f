"""Fuzzing the STOW-RS multipart reader: any body and boundary give parts or a clean error, never an escape.

spool_parts() alone (parts, or BadBody / TooLarge with no temp file left, in bounded memory), then the
whole view through Django's test client, which re-raises any exception that escapes it: the answer is a
4xx (or a STOW-RS 200/202/409), never a 500. `ISTHMUS_FUZZ_EXAMPLES=20000` runs a long search.
"""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from dicomweb.multipart_reader import BadBody, TooLarge, spool_parts
from tests.dicomweb.access import BOUNDARY, MULTIPART, bearer, leftover_temp_files, multipart
from tests.fuzz import fuzz
from tests.gateway.instances import make_instance

MB = 1 << 20
# The reader holds one 256 KB read, a part's first 4 KB and the parser's state; the fuzzed bodies are small,
# so this bound allows for what a first use imports, and a 32 MB body shows the reader never holds a body.
MEMORY_BOUND = 8 * MB
LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
BOUNDARIES = st.one_of(st.just(BOUNDARY), st.text(LATIN1, min_size=1, max_size=90))


@st.composite
def multipart_bodies(draw, boundary: str) -> bytes:
    """A multipart body that is nearly right: parts with headers, then cut, spliced or corrupted somewhere."""
    delimiter = b"--" + boundary.encode("latin-1")
    body = draw(st.one_of(st.just(b""), st.binary(max_size=64)))  # a preamble (python-multipart refuses one)
    for _ in range(draw(st.integers(0, 4))):
        headers = draw(st.sampled_from([b"Content-Type: application/dicom\r\n", b"", b"X: y\r\n" * 3]))
        headers += draw(st.binary(max_size=24)) if draw(st.integers(0, 3)) == 0 else b""
        body += b"\r\n" + delimiter + b"\r\n" + headers + b"\r\n" + draw(st.binary(max_size=512))
    body += b"\r\n" + delimiter + draw(st.sampled_from([b"--\r\n"] * 4 + [b"--", b"\r\n", b"", b"-"]))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # half of them left well-formed
        position = draw(st.integers(0, len(body)))
        body = draw(
            st.sampled_from(
                [body[:position], body[:position] + draw(st.binary(max_size=8)) + body[position:], body[position:]]
            )
        )
    return body


@st.composite
def requests_(draw) -> tuple[str, bytes]:
    boundary = draw(BOUNDARIES)
    body = draw(st.one_of(st.binary(max_size=4096), multipart_bodies(boundary)))
    return boundary, body


@pytest.fixture
def spool(tmp_path) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


@fuzz
@given(request=requests_(), max_bytes=st.one_of(st.integers(1, 5000), st.just(MB)), max_parts=st.integers(1, 5))
def test_spool_parts_gives_parts_or_a_clean_error(spool, request, max_bytes, max_parts):
    boundary, body = request
    tracemalloc.start()
    try:
        parts = spool_parts(io.BytesIO(body), boundary, directory=spool, max_bytes=max_bytes, max_parts=max_parts)
    except (BadBody, TooLarge):
        parts = None
    finally:
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"the reader held {peak / MB:.1f} MB"
    event("refused" if parts is None else f"{len(parts)} part(s)")
    if parts is None:
        assert list(spool.iterdir()) == [], "a refused body left temp files"
        return
    assert 1 <= len(parts) <= max_parts and len(body) <= max_bytes
    assert sorted(path.name for path in spool.iterdir()) == sorted(part.path.name for part in parts)
    assert sum(part.path.stat().st_size for part in parts) <= len(body)
    for part in parts:
        assert part.digest[1] == part.path.stat().st_size
        part.path.unlink()


def test_a_large_body_is_spooled_in_bounded_memory(spool):
    part = bytes(range(256)) * (64 * 1024)  # 16 MiB
    body = multipart(part, part)
    tracemalloc.start()
    try:
        parts = spool_parts(io.BytesIO(body), BOUNDARY, directory=spool, max_bytes=len(body), max_parts=2)
    finally:
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 4 * MB, f"the reader held {peak / MB:.1f} MB of a {len(body) / MB:.0f} MB body"
    assert [item.path.read_bytes() == part for item in parts] == [True, True]


CONTENT_TYPES = st.one_of(
    st.builds(lambda boundary: f'multipart/related; type="application/dicom"; boundary="{boundary}"', BOUNDARIES),
    st.builds(lambda boundary: f"multipart/related; boundary={boundary}", BOUNDARIES),
    st.sampled_from(["application/dicom", "multipart/related", "multipart/related; boundary=", "", "text/plain"]),
    st.text(LATIN1, max_size=120),
)


@pytest.fixture
def stow_client(client, settings, tmp_path, db) -> tuple:
    settings.STORAGE_DIR = tmp_path / "storage"
    return client, bearer(name="fuzzer")


@fuzz
@given(content_type=CONTENT_TYPES, body=st.one_of(st.binary(max_size=4096), multipart_bodies(BOUNDARY)))
def test_the_stow_view_answers_any_body_without_an_exception(stow_client, content_type, body):
    client, headers = stow_client
    response = client.post(
        "/dicomweb/studies", data=body, content_type=content_type, HTTP_AUTHORIZATION=headers["Authorization"]
    )
    assert response.status_code in (200, 202, 400, 409, 411, 413, 415), response.content[:300]
    event(f"HTTP {response.status_code}")
    if response.status_code >= 400 and response.status_code != 409:
        assert response["Content-Type"] == "application/problem+json"
    assert leftover_temp_files() == []


def test_a_wellformed_body_passes_the_view(stow_client, tmp_path):
    """The fuzzed view is the real one: a well-formed body is stored by it."""
    client, headers = stow_client
    data = make_instance("CT_small.dcm", tmp_path / "sent").read_bytes()
    response = client.post(
        "/dicomweb/studies", data=multipart(data), content_type=MULTIPART, HTTP_AUTHORIZATION=headers["Authorization"]
    )
    assert response.status_code == 200
