"""Hypothesis strategies for C-FIND identifiers and QIDO-RS queries, and a raw C-FIND sender.

Identifiers are encoded here, element by element (PS3.5 7.1.2, explicit VR
little endian), not by pydicom: a hostile peer sends what no encoder would
write (a US of three bytes, a sequence tag with text in it, an item tag at the
top level), and the listener must answer those too.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable
from io import BytesIO

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND

from tests.fuzz import fuzz

# PS3.5 Table 7.1-1: VRs with a 4-byte length after two reserved bytes.
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
ALL_VRS = sorted(LONG_VRS | {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH",
                             "SL", "SS", "ST", "TM", "UI", "UL", "US"})  # fmt: skip
BINARY_NUMBER_VRS = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "SV": 8, "UV": 8}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

# Values that exercise each kind of matching (PS3.4 C.2.2.2) and each way to get it wrong.
TRICKY = [
    "", "*", "?", "**", "DOE*", "*^JANE", "D?E^*", "DOE^JANE", "doe*", "=", "^", "^^^^", "=*", "*=*", "A=B=C=D",
    "山田^太郎", "Yamada^Tarou=山田^太郎", "MÜLLER*", "%", "_", "[a]", "[", "\\", "\\\\", "a\\b\\c", "'; DROP TABLE x;--",
    "19700101", "19700101-", "-20240101", "20240101-20231231", "2024-01-01", "1970010", "99999999", "-", "--",
    "00000000-99999999", "20240101-20240101-", "20240229", "20230230", "1.2.3-4", "...", "+", "+1", "0101",
    "101500", "101500.123456", "1015-", "-2359", "25:00", "240000", "20240101101500", "20240101101500+0100-",
    "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1\\1.2.826.0.1.3680043.8.498.2", "1.2.3.",
    "0", "-1", "1", "65535", "65536", "2147483647", "2147483648", "9223372036854775808", "9" * 40, "1e308", "-1e308",
    "NaN", "nan", "inf", "-Infinity", "0x10", "1_000", " 12 ", "1.5", "१२", "\x00", "A\x00B", "\x00*", "\ufffd",
    "\u202e", "\t", "CT", "MR\\CT", "CT,MR", "PATIENT", "STUDY", "SERIES", "IMAGE", "ONLINE", "ISO_IR 100",
    "ISO_IR 192", "ISO 2022 IR 87", "ISO_IR 999", "GB18030", "ISO 2022 IR 6\\ISO 2022 IR 87",
]  # fmt: skip


def query_text() -> st.SearchStrategy[str]:
    """A query value: a tricky one, arbitrary text, or a list or range of those."""
    single = st.one_of(st.sampled_from(TRICKY), st.text(max_size=40))
    return st.one_of(
        single,
        st.lists(single, min_size=2, max_size=4).map("\\".join),
        st.tuples(single, single).map("-".join),
    )


def value_bytes(vr: str) -> st.SearchStrategy[bytes]:
    """The bytes of a value of this VR: mostly the right shape, sometimes anything at all."""
    encoded = st.one_of(
        query_text().map(lambda text: text.encode("utf-8", "surrogatepass")),
        query_text().map(lambda text: text.encode("latin-1", "replace")),
    )
    if vr in BINARY_NUMBER_VRS:
        size = BINARY_NUMBER_VRS[vr]
        right = st.lists(st.binary(min_size=size, max_size=size), max_size=3).map(b"".join)
        return st.one_of(right, st.binary(max_size=17))
    return st.one_of(encoded, encoded, st.binary(max_size=64))


def element(tag: int, vr: str, value: bytes, *, undefined: bool = False) -> bytes:
    """One explicit VR little endian data element, as written on the wire."""
    group, number = tag >> 16, tag & 0xFFFF
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", group, number, vr.encode(), 0, UNDEFINED if undefined else len(value)) + value
    value = value[:0xFFFF]
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def sequence(tag: int, items: Iterable[bytes], *, undefined: bool) -> bytes:
    """A sequence of items, with defined lengths or with delimiters (PS3.5 7.5)."""
    if not undefined:
        body = b"".join(struct.pack("<HHI", ITEM >> 16, ITEM & 0xFFFF, len(item)) + item for item in items)
        return element(tag, "SQ", body)
    body = b"".join(
        struct.pack("<HHI", ITEM >> 16, ITEM & 0xFFFF, UNDEFINED) + item + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        for item in items
    )
    return element(tag, "SQ", body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), undefined=True)


def keys(keywords: Iterable[str]) -> list[tuple[int, str]]:
    """(tag, dictionary VR) of each keyword."""
    return [(tag_for_keyword(keyword), dictionary_VR(keyword)) for keyword in keywords]


# Tags no vocabulary names: private, group length, meta information, item tags at the wrong level.
STRAY_TAGS = [0x00090010, 0x00091001, 0x00100000, 0x00020010, 0x00080000, ITEM, ITEM_END, SEQUENCE_END, 0x7FE00010]


@st.composite
def elements(draw, vocabulary: list[tuple[int, str]], items: dict[int, list[tuple[int, str]]], depth: int = 0):
    """[(tag, encoded element)]: some of the vocabulary (and a stray), VRs sometimes wrong, sequences nested.

    `items` maps a sequence tag to the vocabulary of its items.
    """
    chosen = draw(st.lists(st.sampled_from(vocabulary), max_size=8, unique_by=lambda key: key[0]))
    if draw(st.integers(0, 9)) == 0:
        chosen.append((draw(st.sampled_from(STRAY_TAGS)), draw(st.sampled_from(ALL_VRS))))
    encoded = []
    for tag, vr in chosen:
        if draw(st.integers(0, 6)) == 0:
            vr = draw(st.sampled_from(ALL_VRS))  # the peer says it is of another VR
        if vr == "SQ" and depth < 2:
            nested = items.get(tag, vocabulary)
            members = draw(st.lists(elements(nested, items, depth + 1).map(assemble), max_size=2))
            encoded.append((tag, sequence(tag, members, undefined=draw(st.booleans()))))
        else:
            encoded.append((tag, element(tag, vr, draw(value_bytes(vr)))))
    return encoded


def assemble(pairs: list[tuple[int, bytes]], ordered: bool = True) -> bytes:
    """A data set's bytes: one element per tag (the first given), in tag order unless told otherwise."""
    unique = list(dict(reversed(pairs)).items())[::-1]
    if ordered:
        unique.sort(key=lambda pair: pair[0])
    return b"".join(data for _tag, data in unique)


def text_element(keyword: str, value: str) -> tuple[int, bytes]:
    tag = tag_for_keyword(keyword)
    return tag, element(tag, dictionary_VR(keyword), value.encode("utf-8", "surrogatepass"))


def find(assoc: Association, sop_class: str, identifier: bytes) -> list[int]:
    """Send a C-FIND whose identifier is these bytes; every response status, in order.

    pynetdicom's send_c_find() encodes a data set, so the request is built
    here from its primitive; an empty list means no final answer within the AE's dimse_timeout.
    """
    context = next(ctx for ctx in assoc.accepted_contexts if ctx.abstract_syntax == sop_class)
    request = C_FIND()
    request.MessageID, request.AffectedSOPClassUID, request.Priority = 1, sop_class, 2
    request.Identifier = BytesIO(identifier)
    # As send_c_find() does: pause the association's reactor, or it takes the responses for itself.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    statuses: list[int] = []
    try:
        assoc.dimse.send_msg(request, context.context_id)
        while True:
            _context_id, response = assoc.dimse.get_msg(block=True)
            if response is None:  # timed out
                return []
            statuses.append(int(response.Status))
            if statuses[-1] not in (0xFF00, 0xFF01):
                return statuses
    finally:
        assoc._reactor_checkpoint.set()


PENDING = {0xFF00, 0xFF01}
# PS3.4 C.4.1.1.4 / K.4.1.1.4: success; refused (out of resources), identifier does not match, unable to
# process as our handlers answer it. pynetdicom's own 0xC311/0xC312 mean a handler raised: never clean.
FINAL = {0x0000, 0xA700, 0xA900, 0xC000}


def fuzz_find(
    port: int,
    sop_classes: list[str],
    identifiers: st.SearchStrategy[bytes],
    caplog: pytest.LogCaptureFixture,
    regressions: Iterable[bytes] = (),
) -> None:
    """Every identifier gets pending answers and a clean final status within 20 s, nothing logged as an error.

    `regressions` are identifiers the fuzzer once found failing: each is tried on every run.
    """
    scu = AE(ae_title="CT1")
    scu.dimse_timeout = 20
    for sop_class in sop_classes:
        scu.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", port, ae_title="ISTHMUS")
    assert assoc.is_established

    def errors() -> int:
        return sum(record.levelno >= logging.ERROR for record in caplog.records)

    def answered(sop_class: str, identifier: bytes) -> None:
        errors_before = errors()
        statuses = find(assoc, sop_class, identifier)
        assert statuses, "no final answer in time"
        *pending, final = statuses
        assert set(pending) <= PENDING and final in FINAL, [f"0x{status:04X}" for status in statuses]
        assert errors() == errors_before
        assert assoc.is_established

    # Not empty: pynetdicom would announce a data set and send no fragment of it (the peer waits for it).
    run = given(
        sop_class=st.sampled_from(sop_classes),
        identifier=st.one_of(identifiers, identifiers, identifiers, st.binary(max_size=300)).filter(len),
    )(answered)
    for identifier in regressions:
        run = example(sop_class=sop_classes[0], identifier=identifier)(run)
    try:
        fuzz(run)()
    finally:
        assoc.release()
