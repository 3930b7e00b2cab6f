"""Fuzzing QIDO-RS query parameters over HTTP: any query gets 200 with a JSON array or a 400 problem, in time.

Hypothesis builds raw query strings (keywords, tags, control parameters,
dotted sequence paths, unknown names; values with wildcards, ranges, lists,
NULs, invalid percent-escapes and UTF-8) and study/series UIDs for the URL;
the live server runs each search against the test database.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
import requests
from hypothesis import example, given
from hypothesis import strategies as st

from gateway import qr
from tests.dicomweb.archive import reader_token, short_db_connections, store_study  # noqa: F401
from tests.find_fuzz import TRICKY, query_text
from tests.fuzz import fuzz

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("short_db_connections")]

KNOWN = [*qr.ATTRIBUTES, *qr.COMPUTED, "00100010", "0020000D", "00080061", "00100020", "includefield", "fuzzymatching",
         "SpecificCharacterSet", "RetrieveURL"]  # fmt: skip
ODD = ["7FE00010", "00000000", "00400275.00321060", "PatientName.Foo", "PixelData", "NotAKeyword", "0010001", ""]
NUMBERS = ["9223372036854775808", "0", "1", "-1", "25", "1001", "2147483648", "9" * 30, "1e3", " 5", "five", ""]
RAW = ["%", "%G1", "%FF", "%C3%28", "%00", "%2A", "+", "&", "=", "%E2%80%AE", "%ED%A0%80"]


def value() -> st.SearchStrategy[str]:
    """A percent-encoded value, or a raw one with broken escapes."""
    encoded = st.one_of(query_text(), st.sampled_from(NUMBERS)).map(lambda text: quote(text, safe="*?,-^"))
    return st.one_of(encoded, encoded, st.lists(st.sampled_from(RAW + TRICKY[:20]), max_size=3).map("".join))


@st.composite
def searches(draw, study_uid: str, series_uid: str) -> str:
    """A QIDO-RS path and query string."""
    # A path segment of its own: empty or with a slash, it is another resource (404 is right for those).
    segment = (
        query_text().filter(lambda text: text.strip(".") and "/" not in text).map(lambda text: quote(text, safe=""))
    )
    uid = st.one_of(st.sampled_from([study_uid, series_uid, "1.2.3", "*", "%00"]), segment)
    paths = ["studies", "series", "instances", f"studies/{draw(uid)}/series", f"studies/{draw(uid)}/instances",
             f"studies/{draw(uid)}/series/{draw(uid)}/instances"]  # fmt: skip
    # Mostly names the index knows, so that the values reach the database; sometimes anything.
    odd = st.one_of(st.sampled_from(ODD), st.text(max_size=12).map(lambda text: quote(text, safe="")))
    names = st.one_of(st.sampled_from(KNOWN), st.sampled_from(KNOWN), st.sampled_from(KNOWN), odd)
    pairs = draw(st.lists(st.tuples(names, value()), max_size=4))
    pairs += draw(st.lists(st.tuples(st.sampled_from(["limit", "offset"]), st.sampled_from(NUMBERS)), max_size=2))
    query = "&".join(f"{name}={text}" if draw(st.integers(0, 9)) else name for name, text in pairs)
    return f"{draw(st.sampled_from(paths))}?{query}"


def test_fuzz_any_qido_query_gets_results_or_a_problem(live_server, tmp_path):
    study = store_study(tmp_path / "a", "CT_small.dcm", series=2, modalities=("CT", "MR"), StudyDate="20260110")
    store_study(tmp_path / "b", "MR_small.dcm", PatientName="MÜLLER^HANS", PatientID="PID-2")
    session = requests.Session()
    session.headers.update({"Authorization": f"Bearer {reader_token()}", "Accept": "application/dicom+json"})

    @fuzz
    @given(search=searches(study.uid, study.series[0]))
    # What the fuzzer found: PostgreSQL's bigint OFFSET and NUL parameters (both 500 before).
    @example(search="instances?offset=9223372036854775808")
    @example(search="studies?PatientName=A%00B*&StudyInstanceUID=1.2%00,1.3")
    def answered(search: str) -> None:
        response = session.get(f"{live_server.url}/dicomweb/{search}", timeout=20)
        assert response.status_code in (200, 400), (response.status_code, response.text[:500])
        if response.status_code == 200:
            assert response.headers["Content-Type"] == "application/dicom+json"
            assert isinstance(response.json(), list)
        else:
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.json()["status"] == 400 and response.json()["detail"]

    try:
        answered()
    finally:
        session.close()
