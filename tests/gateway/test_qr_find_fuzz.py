"""Fuzzing the Q/R C-FIND query parser over the wire: any identifier gets matches, none, or a failure status.

Hypothesis writes identifiers byte by byte (tests/find_fuzz.py): the keys the
index matches on with wildcards, ranges, UID lists, bad dates, huge numbers,
NULs, wrong VRs, sequences, stray tags, and plain garbage. Each goes to our
listener in a C-FIND over one association, against the test database, so an
SQL error is caught as surely as a Python one.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from gateway import qr
from gateway.models import Node
from tests.find_fuzz import assemble, element, elements, fuzz_find, keys, query_text, sequence, text_element
from tests.gateway.qr_data import add_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, about the garbage it is sent

STUDIES = ["1.2.826.0.1.3680043.8.498.91", "1.2.826.0.1.3680043.8.498.92"]
SERIES = ["1.2.826.0.1.3680043.8.498.93", "1.2.826.0.1.3680043.8.498.94"]
VOCABULARY = keys(
    [
        *qr.ATTRIBUTES,
        *qr.COMPUTED,
        *qr.FRAME_KEYWORDS,
        "PatientAge",
        "OtherPatientIDsSequence",
        "ReferencedStudySequence",
    ]
)
ITEMS = {tag_for_keyword("OtherPatientIDsSequence"): keys(["PatientID", "IssuerOfPatientID", "TypeOfPatientID"])}
LEVELS = ["PATIENT", "STUDY", "SERIES", "IMAGE"] * 4 + ["", "FOO", "study", "STUDY\\SERIES", " IMAGE ", "\x00"]


@st.composite
def identifiers(draw) -> bytes:
    """A level, usually the unique keys above it (real ones or not), and anything else."""
    pairs = [text_element("QueryRetrieveLevel", draw(st.sampled_from(LEVELS)))]
    for keyword, known in (
        ("PatientID", ["PID1", "PID2"]),
        ("StudyInstanceUID", STUDIES),
        ("SeriesInstanceUID", SERIES),
    ):
        if draw(st.integers(0, 4)):
            pairs.append(text_element(keyword, draw(st.one_of(st.sampled_from(known), query_text()))))
    pairs += draw(elements(VOCABULARY, ITEMS))
    return assemble(pairs, ordered=draw(st.integers(0, 9)) > 0)


@pytest.fixture
def archive(listener) -> int:
    Node.objects.create(name="ct-1", ae_title="CT1", host="127.0.0.1", port=104, allow_query_retrieve=True)
    jane = dict(patient_id="PID1", patient_name="DOE^JANE", birth_date="19700101")
    add_instance(**jane, study_uid=STUDIES[0], series_uid=SERIES[0], instance_number=1)
    add_instance(**jane, study_uid=STUDIES[0], series_uid=SERIES[1], modality="MR", source="MR_small.dcm")
    add_instance(patient_id="PID2", patient_name="MÜLLER^HANS", study_uid=STUDIES[1], charset="ISO_IR 100")
    return listener.port


LEVEL = text_element("QueryRetrieveLevel", "STUDY")
# What the fuzzer found: a NUL in a value (PostgreSQL refuses it even as a parameter: 0xC311 before), a
# character set given as a number and a sequence with bytes no item can be read from (pydicom raised
# while pynetdicom decoded the identifier, inside the handler).
REGRESSIONS = [
    assemble([LEVEL, text_element("PatientID", "PID1"), text_element("PatientName", "DOE\x00*")]),
    assemble([LEVEL, text_element("PatientID", "PID\x001"), text_element("StudyInstanceUID", "1.2\x00\\1.3")]),
    assemble([LEVEL, (0x00080005, element(0x00080005, "US", b"\x01\x00"))]),
    assemble([LEVEL, (0x00101002, sequence(0x00101002, [b"\x01\x02\x03"], undefined=False))]),
]


def test_fuzz_any_identifier_gets_matches_none_or_a_failure_status(archive, caplog):
    roots = [StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind]
    fuzz_find(archive, roots, identifiers(), caplog, REGRESSIONS)
