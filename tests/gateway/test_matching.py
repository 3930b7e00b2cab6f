"""PS3.4 C.2.2.2 matching (gateway/matching.py) against real rows, on whichever database the run uses."""

from __future__ import annotations

import pytest
from django.utils import timezone
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from gateway.matching import QueryValueError, is_single_value, match
from gateway.models import Patient, Series, Study


@pytest.fixture
def patients(db) -> None:
    for patient_id, name, birth_date in [
        ("P1", "SMITH^JOHN", "19700101"),
        ("P2", "SMYTH^JANE", "19851231"),
        ("P3", "smith^anna", "19900615"),
        ("P4", "100%_DONE", ""),
        ("P5", "A[B]C", "20000101"),
        ("P6", "1000XDONE", "19991231"),
    ]:
        Patient.objects.create(patient_id=patient_id, patient_name=name, patient_birth_date=birth_date)


def ids(field: str, vr: str, value, **options) -> list[str]:
    return sorted(Patient.objects.filter(match(field, vr, value, **options)).values_list("patient_id", flat=True))


ALL = ["P1", "P2", "P3", "P4", "P5", "P6"]


@pytest.mark.parametrize("value", ["", None, "*", []])
def test_universal_matching_matches_every_row(patients, value):
    assert ids("patient_name", "PN", value) == ALL


def test_single_value_is_exact_and_case_sensitive(patients):
    assert ids("patient_name", "PN", "SMITH^JOHN") == ["P1"]
    assert ids("patient_name", "PN", "SMITH") == []
    assert ids("patient_name", "PN", "smith^john") == []


def test_person_name_case_can_be_ignored(patients):
    assert ids("patient_name", "PN", "smith^john", ignore_case=True) == ["P1"]
    assert ids("patient_name", "PN", "SMITH*", ignore_case=True) == ["P1", "P3"]
    # only for PN: an ID stays exact
    assert ids("patient_id", "LO", "p1", ignore_case=True) == []


def test_trailing_empty_name_components_are_insignificant(patients):
    assert ids("patient_name", "PN", PersonName("SMITH^JOHN^^")) == ["P1"]


def test_star_and_question_mark_wildcards(patients):
    assert ids("patient_name", "PN", "SMITH*") == ["P1"]
    assert ids("patient_name", "PN", "SM?TH*") == ["P1", "P2"]
    assert ids("patient_name", "PN", "*ANNA") == []
    assert ids("patient_name", "PN", "*anna") == ["P3"]
    assert ids("patient_name", "PN", "S?ITH^JOHN") == ["P1"]


def test_percent_underscore_and_brackets_are_literal(patients):
    assert ids("patient_name", "PN", "100%_*") == ["P4"]
    assert ids("patient_name", "PN", "1%*") == []
    assert ids("patient_name", "PN", "100_*") == []  # '_' is not "any character"
    assert ids("patient_name", "PN", "100?*") == ["P4", "P6"]
    assert ids("patient_name", "PN", "A[B]*") == ["P5"]
    assert ids("patient_name", "PN", "A[*") == ["P5"]


def test_date_ranges_exclude_empty_values(patients):
    assert ids("patient_birth_date", "DA", "19800101-19951231") == ["P2", "P3"]
    assert ids("patient_birth_date", "DA", "19991231-") == ["P5", "P6"]
    assert ids("patient_birth_date", "DA", "-19851231") == ["P1", "P2"]  # P4 has no birth date
    assert ids("patient_birth_date", "DA", "19700101") == ["P1"]


@pytest.mark.parametrize("value", ["2024-01-01-2024", "2024010", "abc-", "20240101-2024"])
def test_malformed_dates_are_refused(patients, value):
    with pytest.raises(QueryValueError):
        match("patient_birth_date", "DA", value)


@pytest.fixture
def studies(patients) -> None:
    patient = Patient.objects.get(patient_id="P1")
    now = timezone.now()
    for uid, time in [("1.1", "075959"), ("1.2", "080000.123"), ("1.3", "120059.999"), ("1.4", "1201"), ("1.5", "")]:
        study = Study.objects.create(study_instance_uid=uid, patient=patient, study_time=time, received_at=now)
        Series.objects.create(series_instance_uid=f"{uid}.1", study=study, series_number=int(uid[-1]), received_at=now)


def study_uids(field: str, vr: str, value) -> list[str]:
    return sorted(Study.objects.filter(match(field, vr, value)).values_list("study_instance_uid", flat=True))


def test_time_range_upper_bound_covers_its_precision(studies):
    assert study_uids("study_time", "TM", "0800-1200") == ["1.2", "1.3"]
    assert study_uids("study_time", "TM", "-0800") == ["1.1", "1.2"]
    assert study_uids("study_time", "TM", "1201-") == ["1.4"]
    assert study_uids("study_time", "TM", "080000") == ["1.2"]


def test_list_of_uids(studies):
    assert study_uids("study_instance_uid", "UI", "1.1\\1.3\\9.9") == ["1.1", "1.3"]
    assert study_uids("study_instance_uid", "UI", MultiValue(str, ["1.2", "1.4"])) == ["1.2", "1.4"]


def test_uid_has_no_wildcards(studies):
    assert study_uids("study_instance_uid", "UI", "1.*") == []
    assert study_uids("study_instance_uid", "UI", "*") == ["1.1", "1.2", "1.3", "1.4", "1.5"]


def test_integer_values(studies):
    series = Series.objects.filter(match("series_number", "IS", "3")).values_list("series_instance_uid", flat=True)
    assert list(series) == ["1.3.1"]
    with pytest.raises(QueryValueError):
        match("series_number", "IS", "three")


def test_single_value_detection_for_unique_keys():
    assert is_single_value("PID1", "LO")
    assert not is_single_value("PID*", "LO")
    assert not is_single_value("", "LO")
    assert is_single_value("1.2.3", "UI") and not is_single_value("1.2\\1.3", "UI")
    assert not is_single_value("20240101-", "DA")
