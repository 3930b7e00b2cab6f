"""Rule conditions and rule order: which destinations an instance is owed to."""

from __future__ import annotations

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from routing.rules import (
    CompiledRule,
    InvalidCondition,
    compile_conditions,
    conditions_match,
    select,
    validate_conditions,
    values_of,
)


def ct(**attributes) -> Dataset:
    dataset = Dataset()
    dataset.Modality = "CT"
    dataset.StudyDescription = "CHEST W/O CONTRAST"
    dataset.StudyDate = "20240615"
    dataset.StudyTime = "123015.250"
    dataset.SeriesNumber = 3
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"Modality": "CT"}, True),
        ({"Modality": "MR"}, False),
        ({"Modality": "ct"}, False),  # equals is case-sensitive, as DICOM code strings are
        ({"Modality": "C?"}, True),
        ({"StudyDescription": "CHEST*"}, True),
        ({"StudyDescription": "*HEAD*"}, False),
        ({"StudyDescription": "CHEST.W*"}, False),  # a dot is literal in a wildcard pattern
        ({"StudyDescription": "re:(?i)chest"}, True),
        ({"StudyDescription": r"re:^HEAD\b"}, False),
        ({"StudyDate": "range:20240101-20241231"}, True),
        ({"StudyDate": "range:20250101-"}, False),
        ({"StudyDate": "range:-20240615"}, True),
        ({"StudyDate": "range:20240601-20240630"}, True),
        ({"StudyTime": "range:120000-130000"}, True),  # numeric: fractions of a TM compare too
        ({"SeriesNumber": "range:1-5"}, True),
        ({"SeriesNumber": "range:10-20"}, False),
        ({"SeriesNumber": "range:-5..3"}, True),
        ({"ImageType": "AXIAL"}, True),  # any value of a multi-valued attribute
        ({"AccessionNumber": "*"}, True),  # absent matches only patterns that match ""
        ({"AccessionNumber": "A*"}, False),
        ({"Modality": "CT", "CallingAE": "CT*"}, True),
        ({"Modality": "CT", "CallingAE": "MR*"}, False),
        ({"CalledAE": "ISTHMUS"}, True),
        ({}, True),
    ],
)
def test_condition_patterns(conditions, expected):
    assert conditions_match(conditions, ct(), calling_ae="CT1", called_ae="ISTHMUS") is expected


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        ({"Modalty": "CT"}, "not a DICOM keyword"),
        ({"StudyDescription": "re:(unclosed"}, "bad regular expression"),
        ({"StudyDate": "range:20240101"}, "bad range"),
        ({"StudyDate": "range:-"}, "bad range"),
    ],
)
def test_bad_conditions_are_named(conditions, message):
    with pytest.raises(InvalidCondition, match=message):
        compile_conditions(conditions)
    assert message in validate_conditions(conditions)[0]


def test_validate_accepts_good_conditions_and_refuses_a_list():
    assert validate_conditions({"Modality": "CT", "CallingAE": "re:^CT\\d$"}) == []
    assert validate_conditions(["Modality"]) == ["conditions must be a mapping from keyword to pattern"]


def compiled(rule_id: int, conditions: dict, destinations: tuple[int, ...], *, stop=False, default=False):
    return CompiledRule(rule_id, f"r{rule_id}", default, stop, destinations, compile_conditions(conditions))


def values(modality: str, description: str = "") -> dict[str, list[str]]:
    return {"Modality": [modality], "StudyDescription": [description]}


def test_two_destinations_by_modality_and_a_fan_out():
    rules = [
        compiled(1, {"Modality": "CT"}, (10,)),
        compiled(2, {"Modality": "MR"}, (20,)),
        compiled(3, {"Modality": "re:^(CT|MR)$"}, (10, 20)),  # fan-out; 10 is already owed under rule 1
    ]
    assert select(rules, values("CT")) == [(1, 10), (3, 20)]
    assert select(rules, values("MR")) == [(2, 20), (3, 10)]
    assert select(rules, values("US")) == []


def test_stop_after_this_rule_skips_later_rules():
    rules = [
        compiled(1, {"StudyDescription": "re:(?i)research"}, (30,), stop=True),
        compiled(2, {"Modality": "CT"}, (10,)),
    ]
    assert select(rules, values("CT", "Research protocol 7")) == [(1, 30)]
    assert select(rules, values("CT", "Chest")) == [(2, 10)]


def test_default_rule_only_when_nothing_else_matched():
    rules = [
        compiled(9, {}, (99,), default=True),  # order does not matter for a default
        compiled(1, {"Modality": "CT"}, (10,)),
    ]
    assert select(rules, values("CT")) == [(1, 10)]
    assert select(rules, values("MR")) == [(9, 99)]


def test_a_value_pydicom_cannot_decode_matches_as_absent_and_does_not_raise():
    """Header values stay raw until read (part10.read_header): a malformed one costs its match, not the instance."""
    rows = Tag("Rows")
    dataset = Dataset({rows: RawDataElement(rows, "US", 3, b"\x01\x02\x03", 0, False, True)})  # US is 2 bytes a value

    assert values_of(dataset, "Rows") == [""]
    assert conditions_match({"Rows": "*"}, dataset)
