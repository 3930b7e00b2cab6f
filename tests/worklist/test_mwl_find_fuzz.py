"""Fuzzing the worklist C-FIND query parser over the wire: any identifier gets steps, none, or a failure status.

As tests/gateway/test_qr_find_fuzz.py, with the keys of PS3.4 Table K.6-1: the
Scheduled Procedure Step Sequence and its items, code sequences, PN component
groups, start date and time ranges matched as one.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pynetdicom.sop_class import ModalityWorklistInformationFind

from tests.find_fuzz import assemble, element, elements, fuzz_find, keys, sequence, text_element
from tests.worklist import factories
from worklist import selectors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, about the garbage it is sent

STEP = keys([*selectors.STEP_KEYS, "ScheduledProtocolCodeSequence", "PatientName"])
CODE_ITEM = keys([*selectors.CODE_ITEM, "CodeMeaning", "ContextIdentifier"])
VOCABULARY = keys([*selectors.TOP_KEYS, *selectors.CODE_SEQUENCES, "SpecificCharacterSet", "PatientAge",
                   selectors.SPS, selectors.SPS, selectors.SPS])  # fmt: skip
ITEMS = {
    tag_for_keyword(selectors.SPS): STEP,
    tag_for_keyword("ScheduledProtocolCodeSequence"): CODE_ITEM,
    tag_for_keyword("RequestedProcedureCodeSequence"): CODE_ITEM,
}


@st.composite
def identifiers(draw) -> bytes:
    return assemble(draw(elements(VOCABULARY, ITEMS)), ordered=draw(st.integers(0, 9)) > 0)


@pytest.fixture
def worklist(listener, modality) -> int:
    factories.scheduled(
        patient_fields=dict(patient_id="PID-JANE", patient_name="DOE^JANE", patient_birth_date="19700101"),
        order_fields=dict(accession_number="ACC100", requested_procedure_code={"value": "CTHD", "scheme": "99"}),
        protocol_codes=[{"value": "P1", "scheme": "99ISTHMUS", "meaning": "Head routine"}],
    )
    factories.scheduled(patient_fields=dict(patient_name="Yamada^Tarou=山田^太郎"), station_ae_title="MR1")
    return listener.port


NAME = text_element("PatientName", "")
SPS_TAG, CODES_TAG = tag_for_keyword(selectors.SPS), tag_for_keyword("RequestedProcedureCodeSequence")
# What the fuzzer found: a code sequence sent as text (iterated as items), no key at all (answers with
# empty data sets, which pynetdicom cannot send), a step item no element can be read from, a NUL in a
# name on PostgreSQL.
REGRESSIONS = [
    assemble([NAME, (CODES_TAG, element(CODES_TAG, "AE", b"*"))]),
    assemble([(0x00101010, element(0x00101010, "AS", b""))]),
    assemble([NAME, (SPS_TAG, sequence(SPS_TAG, [b"\x01\x02\x03"], undefined=False))]),
    assemble([text_element("PatientName", "DOE\x00^*=")]),
]


def test_fuzz_any_worklist_identifier_gets_steps_none_or_a_failure_status(worklist, caplog):
    fuzz_find(worklist, [ModalityWorklistInformationFind], identifiers(), caplog, REGRESSIONS)
