"""Fuzzing the HL7 path: whatever bytes arrive, an ACK that parses comes back, in bounded time and memory.

The handler is what the MLLP server calls with one frame's bytes: admit, read,
map, apply. The frame reader is fed arbitrary streams cut at arbitrary points.
`ISTHMUS_FUZZ_EXAMPLES=20000` runs them long (tests/fuzz.py).
"""

from __future__ import annotations

import time
import tracemalloc

import hl7
import pytest
from django.test import override_settings
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import fuzz
from tests.worklist.hl7_messages import adt, message, msh, orm, pid, segment
from worklist.hl7.mllp import END, START, FrameReader, FrameTooLarge, frame
from worklist.hl7.receive import handle_message

VALID = [
    orm("F1", "NW", "ACC1"),
    orm("F2", "XO", "ACC1", modality="MR", start="202401061415"),
    orm("F3", "CA", "ACC1"),
    adt("F4", "A08", pid("PAT9", "FUZZ^FRED^X", "19700101", "M"), segment("PV1", {1: "1"})),
    adt("F5", "A40", pid("PAT9", "FUZZ^FRED"), segment("MRG", {1: "PAT8^^^HOSP"})),
    adt("F6", "A04", pid("PATL", "MÜLLER\\T\\SÖHNE^JÖRG", "19600101", "M"), charset="8859/1", codec="latin-1"),
    message(msh("F7", "OMI^O23^OMI_O23"), pid(), segment("ORC", {1: "NW", 2: "PL9", 5: "SC"}),
            segment("TQ1", {1: "1", 7: "20240210083000", 9: "R"}),
            segment("IPC", {1: "ACC9^RIS", 2: "RP9", 3: "1.2.3.4", 4: "SPS9", 5: "MR", 6: "P1^Knee^LOCAL"})),
]  # fmt: skip
# What breaks parsers: separators, escapes, segment ends, bytes invalid in UTF-8, NUL, MLLP markers.
NASTY = [b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b'""', b"\\X", b"\\XFF\\", b"\xff", b"\xc3", b"\x00",
         b"\x0b", b"\x1c", b"MSH|^~\\&|", b"PID|", b"ORC|NW|", b"OBR|1", b"MRG|", b"IPC|", b"9" * 70]  # fmt: skip


@st.composite
def mutated(draw) -> bytes:
    """A valid ORM/OMI/ADT with a few bytes deleted, inserted, replaced, or the tail cut."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        if kind == "delete":
            del data[at : at + draw(st.integers(1, 12))]
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from(NASTY) | st.binary(min_size=1, max_size=8))
        elif kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[max(at, 8) :]
    return bytes(data)


def assert_is_an_ack(answer: bytes, seconds: float) -> None:
    assert seconds < 5, f"{seconds:.1f} s for one message"
    text = answer.decode("latin-1")
    assert text.startswith("MSH|^~\\&|") and text.endswith("\r")
    parsed = hl7.parse(text.strip())
    assert str(parsed.segment("MSA")[1]) in {"AA", "AE", "AR"}
    assert str(parsed.segment("MSH")[9]).startswith("ACK")


def handled(raw: bytes) -> tuple[bytes, float]:
    started = time.perf_counter()
    answer = handle_message(raw, "127.0.0.1:40000")
    return answer, time.perf_counter() - started


@pytest.fixture
def unlimited(hl7_sender):
    """The RIS registered, no rate limit: every example reaches the parser."""
    with override_settings(HL7_RATE_LIMIT=0):
        yield


@fuzz
@given(raw=st.binary(max_size=3000) | st.binary(max_size=3000).map(lambda tail: b"MSH|^~\\&|" + tail))
def test_arbitrary_bytes_get_an_ack(unlimited, raw):
    assert_is_an_ack(*handled(raw))


@fuzz
@given(raw=mutated())
def test_mutated_orders_and_adt_get_an_ack(unlimited, raw):
    assert_is_an_ack(*handled(raw))


@pytest.mark.parametrize("filler", ["|", "^", "~", "\rZ"])
def test_a_megabyte_of_separators_is_refused_before_parsing(unlimited, filler):
    raw = msh("BIG", "ADT^A08").encode() + b"\rPID|" + filler.encode() * ((1024 * 1024 - 100) // len(filler))
    tracemalloc.start()
    try:
        answer, seconds = handled(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_is_an_ack(answer, seconds)
    assert b"MSA|AR|BIG|more than 20000 segments" in answer and b"104^Value too long" in answer
    assert seconds < 2 and peak < 40 * 2**20, (seconds, peak)  # parsed whole: ~6 s and ~450 MB


# --- the MLLP frame reader -------------------------------------------------------------------

PIECES = st.one_of(st.binary(max_size=40), st.sampled_from([START, END, END[:1], END[1:], frame(b"MSH|x")]))


@fuzz
@given(pieces=st.lists(PIECES, max_size=60), cuts=st.lists(st.integers(0, 3000), max_size=40))
def test_frame_reader_gives_the_same_frames_however_the_stream_is_cut(pieces, cuts):
    stream, limit = b"".join(pieces), 64
    whole = _read(FrameReader(limit), [stream])
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert _read(FrameReader(limit), chunks) == whole


def _read(reader: FrameReader, chunks: list[bytes]) -> tuple[list[bytes], bool]:
    """Frames until FrameTooLarge (then the server closes), checking the buffer bound after every read."""
    frames = []
    try:
        for chunk in chunks:
            frames += list(reader.feed(chunk))
            assert reader.buffered <= reader.max_bytes + 2
    except FrameTooLarge:
        return frames, True
    assert all(len(one) <= reader.max_bytes and END not in one for one in frames)
    return frames, False


def test_frame_reader_scans_a_trickled_megabyte_in_linear_time():
    reader, body = FrameReader(), b"x" * (1024 * 1024 - 10)
    started = time.perf_counter()
    assert list(reader.feed(START)) == []
    for offset in range(0, len(body), 64):  # 16384 small reads of one large frame
        assert list(reader.feed(body[offset : offset + 64])) == []
    assert list(reader.feed(END)) == [body]
    assert time.perf_counter() - started < 2  # rescanning the buffer each read: about a minute
