"""Fuzzing part10.read_header: whatever the bytes, a Header or part10.Unreadable, in bounded time and memory.

Arbitrary bytes, real files mutated (cut short, lengths overwritten, bytes flipped or inserted), sequences
nested as deep as a sender likes with or without their delimiters, and deflate streams that are bogus,
cut short or bombs. `ISTHMUS_FUZZ_EXAMPLES=20000` runs a long search (see tests/fuzz.py).
"""

from __future__ import annotations

import logging
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from gateway import indexing, inflate, part10
from routing import rules
from tests.fuzz import fuzz
from tests.gateway.bombs import part10_head

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's warnings about fuzzed values
MB = 1 << 20
# Small caps, so that a fuzzed deflate stream is judged quickly: 4 MiB inflated at most, ratio 100 past 1 MiB.
CAPS = inflate.Limits(max_bytes=4 * MB, max_ratio=100, ratio_floor=MB)
# Inputs are under 64 KB. What read_header may hold: a 1 MiB piece of inflated output, the 64 KiB read-ahead
# window, the file as pydicom reads it when read_header falls back to it, and pydicom's own structures.
MEMORY_BOUND = 8 * MB
TIME_BOUND = 5.0  # seconds for one input, on a loaded 2-core machine; a hang shows as far more
SEEDS = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "rtplan.dcm"]
SEED_BYTES = {name: Path(get_testdata_file(name)).read_bytes() for name in SEEDS}


def _length_fields(name: str) -> list[tuple[int, int]]:
    """(offset, size) of the value length of each file meta and top-level element of a seed file."""
    dataset = dcmread(get_testdata_file(name), stop_before_pixels=False)
    implicit = dataset.file_meta.TransferSyntaxUID.is_implicit_VR
    fields = []
    for element in [*dataset.file_meta, *([] if name == "image_dfl.dcm" else dataset)]:
        if element.file_tell is None:
            continue
        long_field = (implicit and element.tag >> 16 != 2) or element.VR.encode() in part10.LONG_VRS
        fields.append((element.file_tell - 4, 4) if long_field else (element.file_tell - 2, 2))
    return fields


LENGTH_FIELDS = {name: _length_fields(name) for name in SEEDS}


def judge(folder: Path, data: bytes) -> part10.Header | None:
    """read_header on `data`: a Header, or None for Unreadable; anything else fails, as do time, memory, leftovers."""
    path, scratch = folder / "fuzzed.dcm", folder / "scratch"
    scratch.mkdir(exist_ok=True)
    path.write_bytes(data)
    header = None
    started = time.monotonic()
    tracemalloc.start()
    try:
        header = part10.read_header(path, indexing.HEADER_TAGS, caps=CAPS, scratch=scratch)
    except part10.Unreadable:
        pass
    finally:
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - started < TIME_BOUND
    assert peak < MEMORY_BOUND, f"read_header held {peak / MB:.1f} MB"
    assert list(scratch.iterdir()) == [], "the inflated copy was left behind"
    assert header is None or isinstance(header, part10.Header)
    if header is not None:  # what the store reads next (index fields, rule values) never raises, however malformed
        dataset = header.dataset
        readers = (indexing.patient_fields, indexing.study_fields, indexing.series_fields, indexing.instance_fields)
        assert all(isinstance(read(dataset), dict) for read in readers)
        assert rules.instance_values(dataset, indexing.KEYWORDS, calling_ae="CT1", called_ae="ISTHMUS")
    return header


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Iterator[Path]:
    """A folder for the fuzzed files; pydicom's log of the values it reads is kept out of the output."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    yield tmp_path_factory.mktemp("fuzz")
    pydicom_log.setLevel(level)


@fuzz
@given(data=st.binary(max_size=4096), prefixed=st.booleans())
def test_arbitrary_bytes(folder, data, prefixed):
    judge(folder, (b"\0" * 128 + b"DICM" + data) if prefixed else data)


# -- real files, mutated ---------------------------------------------------------------------------------

LENGTHS = st.one_of(
    st.sampled_from([0, 1, 2, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000]), st.integers(0, 2**32 - 1)
)


@st.composite
def mutated_files(draw) -> bytes:
    name = draw(st.sampled_from(SEEDS))
    data = bytearray(SEED_BYTES[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "length", "byte", "insert"]))
        if kind == "length" and LENGTH_FIELDS[name]:
            offset, size = draw(st.sampled_from(LENGTH_FIELDS[name]))
            value = draw(LENGTHS) & (0xFFFF if size == 2 else 0xFFFFFFFF)
            data[offset : offset + size] = value.to_bytes(size, "little")
            continue
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "cut":
            del data[position:]
        elif kind == "byte" and data:
            data[position] = draw(st.integers(0, 255))
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@fuzz
@given(data=mutated_files())
def test_mutated_real_files(folder, data):
    judge(folder, data)


def test_the_seeds_themselves_are_read(folder):
    """The mutations start from files read_header accepts, so what is refused is refused for the mutation."""
    for name in SEEDS:
        assert judge(folder, SEED_BYTES[name]) is not None, name


# -- nested sequences --------------------------------------------------------------------------------------


def _item(content: bytes, undefined: bool, delimited: bool) -> bytes:
    """PS3.5 7.5: an item of explicit or undefined length (ended by an item delimiter unless `delimited` is False)."""
    if not undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content
    return (
        struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + (b"\xfe\xff\x0d\xe0\0\0\0\0" if delimited else b"")
    )


def _sequence(items: list[bytes], undefined: bool, delimited: bool) -> bytes:
    """(0040,0275) Request Attributes Sequence, explicit VR: of undefined length ended by a delimiter, or not."""
    body = b"".join(items)
    if not undefined:
        return struct.pack("<HH2sHL", 0x0040, 0x0275, b"SQ", 0, len(body)) + body
    end = b"\xfe\xff\xdd\xe0\0\0\0\0" if delimited else b""
    return struct.pack("<HH2sHL", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF) + body + end


@st.composite
def nested(draw, depth: int = 0) -> bytes:
    """A sequence whose items hold text and further sequences, nesting up to 50 deep (part10.MAX_DEPTH is 32)."""
    items = []
    for _ in range(draw(st.integers(0 if depth else 1, 2))):
        content = struct.pack("<HH2sH", 0x0008, 0x0050, b"SH", 4) + b"ACC1"  # Accession Number
        if depth < 50 and draw(st.booleans()):
            content += draw(nested(depth + 1))
        items.append(_item(content, draw(st.booleans()), draw(st.integers(0, 20)) > 0))
    return _sequence(items, draw(st.booleans()), draw(st.integers(0, 20)) > 0)


def _data_set(sequence: bytes) -> bytes:
    uid = b"1.2.3.4\0"
    return (
        struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 8) + uid  # SOP Class UID
        + struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 8) + uid  # SOP Instance UID
        + sequence
        + struct.pack("<HH2sH", 0x0020, 0x000D, b"UI", 8) + uid  # Study Instance UID
    )  # fmt: skip


@fuzz
@given(sequence=nested(), deflated=st.booleans())
def test_nested_undefined_length_sequences(folder, sequence, deflated):
    data_set = _data_set(sequence)
    if deflated:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data_set = compressor.compress(data_set) + compressor.flush()
    syntax = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    header = judge(folder, part10_head(syntax, "1.2.3.4", "1.2.3.4") + data_set)
    if header is not None:
        assert header.dataset.StudyInstanceUID == "1.2.3.4"  # read past the sequence, not stopped inside it


def test_sequences_nested_past_the_limit_are_unreadable(folder):
    deep = _sequence([], undefined=True, delimited=True)
    for _ in range(part10.MAX_DEPTH + 5):
        deep = _sequence([_item(deep, undefined=True, delimited=True)], undefined=True, delimited=True)
    assert judge(folder, part10_head(ExplicitVRLittleEndian) + _data_set(deep)) is None


# -- deflate streams ---------------------------------------------------------------------------------------


def _deflate(data: bytes, level: int = 6) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@st.composite
def deflate_streams(draw) -> bytes:
    """Bogus, cut or flipped streams, garbage deflated well, and bombs past CAPS."""
    valid = _deflate(_data_set(b""))
    kind = draw(st.sampled_from(["bytes", "cut", "flipped", "garbage", "bomb", "bounded"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2048))
    if kind == "cut":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "flipped":
        position = draw(st.integers(0, len(valid) - 1))
        return valid[:position] + bytes([valid[position] ^ draw(st.integers(1, 255))]) + valid[position + 1 :]
    if kind == "garbage":
        return _deflate(draw(st.binary(max_size=2048)))
    zeros = draw(st.integers(CAPS.max_bytes + 1, 3 * CAPS.max_bytes)) if kind == "bomb" else draw(st.integers(0, MB))
    element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, zeros)  # Pixel Data of `zeros` zeros
    return _deflate(_data_set(b"") + element + bytes(zeros), 1)


@fuzz
@given(stream=deflate_streams(), padding=st.binary(max_size=2))
def test_deflate_streams(folder, stream, padding):
    header = judge(folder, part10_head(DeflatedExplicitVRLittleEndian, "1.2.3.4", "1.2.3.4") + stream + padding)
    if header is not None:
        assert header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian


def test_inflating_holds_a_piece_at_a_time(folder):
    """64 MiB of zeros deflated to 280 KB: refused by ratio, or inflated to disk when the caps allow, in < 8 MB."""
    element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 64 * MB)
    data = part10_head(DeflatedExplicitVRLittleEndian, "1.2.3.4", "1.2.3.4") + _deflate(
        _data_set(b"") + element + bytes(64 * MB), 1
    )
    path = folder / "big.dcm"
    path.write_bytes(data)
    for caps, refused in ((inflate.Limits(128 * MB, 100, MB), True), (inflate.Limits(128 * MB, 2000, MB), False)):
        tracemalloc.start()
        try:
            header = part10.read_header(path, indexing.HEADER_TAGS, caps=caps, scratch=folder)
        except part10.Bomb:
            header = None
        finally:
            _current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert (header is None) == refused
        assert peak < MEMORY_BOUND, f"read_header held {peak / MB:.1f} MB"
    assert [item.name for item in folder.iterdir() if item.name.endswith(".inflated")] == []


def test_a_bomb_past_the_size_cap_is_a_bomb(folder):
    element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 8 * MB)
    data = part10_head(DeflatedExplicitVRLittleEndian, "1.2.3.4", "1.2.3.4") + _deflate(
        _data_set(b"") + element + bytes(8 * MB), 9
    )
    path = folder / "bomb.dcm"
    path.write_bytes(data)
    size_cap = inflate.Limits(max_bytes=4 * MB, max_ratio=2000, ratio_floor=MB)
    with pytest.raises(part10.Bomb, match="ISTHMUS_MAX_INSTANCE_MB") as refusal:
        part10.read_header(path, indexing.HEADER_TAGS, caps=size_cap, scratch=folder)
    assert refusal.value.sop_instance_uid == "1.2.3.4"
    ratio = inflate.Limits(max_bytes=64 * MB, max_ratio=100, ratio_floor=MB)
    with pytest.raises(part10.Bomb, match="ISTHMUS_MAX_INFLATE_RATIO"):
        part10.read_header(path, indexing.HEADER_TAGS, caps=ratio, scratch=folder)
    assert part10.read_header(path, indexing.HEADER_TAGS, caps=inflate.Limits(64 * MB, 2000, MB), scratch=folder)
    assert sorted(item.name for item in folder.iterdir() if item.name.endswith(".inflated")) == []
