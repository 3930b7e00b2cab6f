"""QIDO-RS over real sockets: dicomweb-client against the live server, data stored through store.save()."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from django.utils import timezone

from dicomweb.models import ApiToken
from tests.dicomweb.archive import client, reader_token, short_db_connections, store_study  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("short_db_connections")]


@pytest.fixture
def archive(tmp_path):
    """Study A: Doe, CT + MR series of two instances each; study B: Roe, one MR instance."""
    doe = store_study(
        tmp_path / "a",
        "CT_small.dcm",
        series=2,
        per_series=2,
        modalities=("CT", "MR"),
        StudyDate="20260110",
        AccessionNumber="ACC-1",
        StudyDescription="Chest",
    )
    roe = store_study(
        tmp_path / "b",
        "MR_small.dcm",
        StudyDate="20250505",
        AccessionNumber="ACC-2",
        PatientName="Roe^Richard",
        PatientID="PID-2",
    )
    return doe, roe


def _value(result: dict, tag: str):
    values = result[tag].get("Value", [])
    return values[0] if len(values) == 1 else values


def _uids(results: list[dict], tag: str = "0020000D") -> set[str]:
    return {_value(result, tag) for result in results}


def test_study_search_answers_the_required_attributes_and_computed_counts(live_server, archive):
    doe, _roe = archive
    results = client(live_server, reader_token()).search_for_studies(search_filters={"StudyInstanceUID": doe.uid})
    assert len(results) == 1
    study = results[0]
    assert _value(study, "00100010") == {"Alphabetic": "Doe^Jane^Secret"}
    assert _value(study, "00100020") == "PID-7731-SECRET"
    assert _value(study, "00080020") == "20260110"
    assert _value(study, "00080050") == "ACC-1"
    assert _value(study, "00081030") == "Chest"
    assert _value(study, "00080061") == ["CT", "MR"]  # ModalitiesInStudy
    assert _value(study, "00201206") == 2  # NumberOfStudyRelatedSeries
    assert _value(study, "00201208") == 4  # NumberOfStudyRelatedInstances
    assert _value(study, "00080056") == "ONLINE"
    # dicomweb-client sends "Host: localhost" without the port; the URL follows the Host header.
    assert _value(study, "00081190") == f"http://localhost/dicomweb/studies/{doe.uid}"
    assert study["00100030"]["vr"] == "DA" and study["00080090"]["vr"] == "PN"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientName": "doe*"}, "doe"),  # wildcard, case-insensitive
        ({"PatientName": "Roe^Richard"}, "roe"),
        ({"00100020": "PID-2"}, "roe"),  # by tag
        ({"StudyDate": "20260101-20261231"}, "doe"),
        ({"StudyDate": "-20251231"}, "roe"),
        ({"ModalitiesInStudy": "CT"}, "doe"),
        ({"AccessionNumber": "ACC-2"}, "roe"),
    ],
)
def test_study_search_matches_like_c_find(live_server, archive, filters, expected):
    doe, roe = archive
    results = client(live_server, reader_token()).search_for_studies(search_filters=filters)
    assert _uids(results) == {{"doe": doe.uid, "roe": roe.uid}[expected]}


def test_uid_lists_limit_offset_and_no_match(live_server, archive):
    doe, roe = archive
    dicomweb = client(live_server, reader_token())
    both = dicomweb.search_for_studies(search_filters={"StudyInstanceUID": f"{doe.uid},{roe.uid}"})
    assert _uids(both) == {doe.uid, roe.uid}
    first = dicomweb.search_for_studies(limit=1)
    second = dicomweb.search_for_studies(limit=1, offset=1)
    assert len(first) == len(second) == 1 and _uids(first) | _uids(second) == {doe.uid, roe.uid}
    assert dicomweb.search_for_studies(search_filters={"PatientName": "Nobody*"}) == []


def test_series_and_instance_searches(live_server, archive):
    doe, roe = archive
    dicomweb = client(live_server, reader_token())
    series = dicomweb.search_for_series(doe.uid)
    assert _uids(series, "0020000E") == set(doe.series)
    by_number = {_value(item, "00200011"): item for item in series}
    assert _value(by_number[2], "00080060") == "MR" and _value(by_number[2], "00201209") == 2
    assert _value(by_number[2], "00081190").endswith(f"/studies/{doe.uid}/series/{doe.series[1]}")
    assert "00100010" not in by_number[2]  # study attributes only when searching series of all studies
    every_mr = dicomweb.search_for_series(search_filters={"Modality": "MR"})
    assert _uids(every_mr, "0020000E") == {doe.series[1], roe.series[0]}
    assert "00100010" in every_mr[0]
    instances = dicomweb.search_for_instances(doe.uid, doe.series[0])
    assert {_value(item, "00080018") for item in instances} <= set(doe.files)
    assert len(instances) == 2 and {_value(item, "00200013") for item in instances} == {1, 2}
    assert all(_value(item, "0020000E") == doe.series[0] for item in instances)
    one = next(iter(roe.files))
    found = dicomweb.search_for_instances(search_filters={"SOPInstanceUID": one})
    assert len(found) == 1 and _value(found[0], "00280010") == 64  # Rows
    assert _value(found[0], "00081190").endswith(f"/instances/{one}")
    in_study = dicomweb.search_for_instances(doe.uid)
    assert len(in_study) == 4
    # A query parameter narrows the study of the URL, never widens it.
    assert dicomweb.search_for_series(doe.uid, search_filters={"StudyInstanceUID": roe.uid}) == []


def test_includefield_fuzzymatching_and_bad_parameters(live_server, archive):
    doe, _roe = archive
    url = f"{live_server.url}/dicomweb/studies"
    headers = {"Authorization": f"Bearer {reader_token()}", "Accept": "application/dicom+json"}
    answer = requests.get(url, params={"StudyInstanceUID": doe.uid, "includefield": "all"}, headers=headers, timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/dicom+json"
    assert "00100040" in answer.json()[0]  # PatientSex comes with all
    fuzzy = requests.get(url, params={"fuzzymatching": "true"}, headers=headers, timeout=10)
    assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["Warning"]
    assert fuzzy.headers["Warning"].startswith("299 ")
    included = requests.get(url, params={"includefield": "00080080,SOPClassUID"}, headers=headers, timeout=10)
    assert included.status_code == 200 and "SOPClassUID" in included.headers["Warning"]
    for params in ({"NotAnAttribute": "x"}, {"StudyDate": "2026"}, {"limit": "-1"}):
        bad = requests.get(url, params=params, headers=headers, timeout=10)
        assert bad.status_code == 400, params
        assert bad.headers["Content-Type"] == "application/problem+json" and bad.json()["status"] == 400
    xml = requests.get(url, headers={**headers, "Accept": "application/dicom+xml"}, timeout=10)
    assert xml.status_code == 406


def test_tokens(live_server, archive):
    url = f"{live_server.url}/dicomweb/studies"
    assert requests.get(url, timeout=10).status_code == 401
    revoked, raw_revoked = ApiToken.issue("revoked")
    ApiToken.objects.filter(pk=revoked.pk).update(revoked=True)
    _expired, raw_expired = ApiToken.issue("expired", expires_at=timezone.now() - timedelta(minutes=1))
    _writer, raw_writer = ApiToken.issue("writer", read=False, write=True)
    for raw, status in ((raw_revoked, 401), (raw_expired, 401), ("isth_not-a-token", 401), (raw_writer, 403)):
        answer = requests.get(url, headers={"Authorization": f"Bearer {raw}"}, timeout=10)
        assert answer.status_code == status, raw[:10]
    assert requests.get(url, headers={"Authorization": f"Bearer {reader_token()}"}, timeout=10).status_code == 200


def test_results_beyond_the_server_limit_are_announced(live_server, archive, settings):
    settings.QIDO_LIMIT = 1
    headers = {"Authorization": f"Bearer {reader_token()}"}
    url = f"{live_server.url}/dicomweb/studies"
    capped = requests.get(url, headers=headers, timeout=10)
    assert len(capped.json()) == 1 and "additional results" in capped.headers["Warning"]
    asked = requests.get(url, params={"limit": "5", "offset": "1"}, headers=headers, timeout=10)
    assert len(asked.json()) == 1 and "Warning" not in asked.headers  # the client pages on its own
