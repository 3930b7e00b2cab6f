"""Query strings in logs: parameter names kept, values never (the patient's name, ID, birth date are values)."""

from __future__ import annotations

import logging

import pytest

from gateway.privacy import MaskQueryStrings, mask_query, mask_text


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("PatientName=DOE%5EJOHN&PatientID=12345&limit=5", "PatientName=***&PatientID=***&limit=***"),
        ("00100010=DOE&00100020=12345&00100030=19580214", "00100010=***&00100020=***&00100030=***"),
        ("patientname=doe*&PATIENTBIRTHDATE=19580214-", "patientname=***&PATIENTBIRTHDATE=***"),
        ("OtherPatientIDs=9&IssuerOfPatientID=HOSP&includefield=PatientAge", "OtherPatientIDs=***&IssuerOfPatientID=***&includefield=***"),
        ("DOE%5EJOHN&Doe=1&PatientID", "***&***&PatientID"),  # a name that is no parameter may itself be data
        ("ScheduledProcedureStepSequence.Modality=CT", "ScheduledProcedureStepSequence.Modality=***"),
        ("", ""),
    ],
)  # fmt: skip
def test_query_values_are_masked_and_only_known_names_shown(query, logged):
    assert mask_query(query) == logged


def test_text_and_log_records_have_their_query_strings_masked():
    line = "Error handling request GET /dicomweb/studies?PatientName=DOE^JOHN&limit=1 HTTP/1.1"
    assert mask_text(line) == "Error handling request GET /dicomweb/studies?PatientName=***&limit=*** HTTP/1.1"
    record = logging.LogRecord("django.request", logging.WARNING, __file__, 1, "Bad Request: %s", ("/x?q=DOE",), None)
    assert MaskQueryStrings().filter(record) and record.getMessage() == "Bad Request: /x?q=***"
