"""Q/R C-FIND over the wire: dcmtk findscu against our listener, in Patient Root and Study Root, at every level."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from django.utils import timezone
from pydicom import dcmread

from gateway.models import Node, Patient, Study
from tests.conftest import dcmtk, peer_env
from tests.gateway.qr_data import add_instance

STUDY_1, STUDY_2, STUDY_3, STUDY_4 = (
    "1.2.826.0.1.3680043.8.498.1",
    "1.2.826.0.1.3680043.8.498.2",
    "1.2.826.0.1.3680043.8.498.3",
    "1.2.826.0.1.3680043.8.498.4",
)
CT_SERIES, MR_SERIES = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"


@pytest.fixture
def archive(listener, modality) -> dict:
    """Three patients: DOE^JANE with two studies (CT+MR, CT), SMITH^JOHN with one, and MÜLLER^HANS in Latin-1."""
    Node.objects.filter(pk=modality.pk).update(allow_query_retrieve=True)  # off for a new node: granted here
    jane = dict(patient_id="PID1", patient_name="DOE^JANE", birth_date="19700101", sex="F")
    ct = [add_instance(**jane, study_uid=STUDY_1, series_uid=CT_SERIES, instance_number=n) for n in (1, 2)]
    mr = add_instance(
        **jane, study_uid=STUDY_1, series_uid=MR_SERIES, modality="MR", series_number=2, source="MR_small.dcm"
    )
    add_instance(**jane, study_uid=STUDY_2, study_date="20240301", study_time="083000", accession="ACC2")
    add_instance(
        patient_id="PID2",
        patient_name="SMITH^JOHN",
        sex="M",
        study_uid=STUDY_3,
        study_date="20231220",
        study_time="140000",
        accession="ACC_3",
    )
    add_instance(
        patient_id="PID3",
        patient_name="MÜLLER^HANS",
        study_uid=STUDY_4,
        study_date="20240116",
        accession="ACC%4",
        charset="ISO_IR 100",
    )
    return {"port": listener.port, "ct": ct, "mr": mr}


def findscu(port: int, root: str, level: str, keys: dict[str, str], out: Path, *extra: str) -> tuple[list, str]:
    """Run findscu; return the response identifiers (read back with pydicom) and its verbose log."""
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), "-v", "-aet", "CT1", "-aec", "ISTHMUS", "-to", "10", "-X", "-od", str(out), root]
    args += ["-k", f"QueryRetrieveLevel={level}"]
    for keyword, value in keys.items():
        args += ["-k", f"{keyword}={value}" if value is not None else keyword]
    result = subprocess.run(
        [*args, *extra, "127.0.0.1", str(port)], env=peer_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))], result.stdout + result.stderr


def final_status(log: str) -> str:
    lines = [line for line in log.splitlines() if "Final Find Response" in line]
    assert lines, log
    return lines[-1]


def statuses(log: str) -> list[int]:
    """Every DIMSE status findscu received, from its debug (-d) dump of the response messages."""
    return [int(code, 16) for code in re.findall(r"^D: DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", log, re.MULTILINE)]


PATIENT_ROOT, STUDY_ROOT = "-P", "-S"


def test_patient_level_wildcard_with_patient_counts(archive, tmp_path):
    keys = {
        "PatientName": "DOE*",
        "PatientID": "",
        "PatientBirthDate": "",
        "NumberOfPatientRelatedStudies": "",
        "NumberOfPatientRelatedSeries": "",
        "NumberOfPatientRelatedInstances": "",
    }
    responses, log = findscu(archive["port"], PATIENT_ROOT, "PATIENT", keys, tmp_path)
    assert "Success" in final_status(log)
    assert len(responses) == 1
    (jane,) = responses
    assert (jane.PatientName, jane.PatientID, jane.PatientBirthDate) == ("DOE^JANE", "PID1", "19700101")
    assert (jane.NumberOfPatientRelatedStudies, jane.NumberOfPatientRelatedSeries) == (2, 3)
    assert jane.NumberOfPatientRelatedInstances == 4
    assert jane.QueryRetrieveLevel == "PATIENT" and jane.RetrieveAETitle == "ISTHMUS"
    assert "PatientSex" not in jane  # only the keys asked for


def test_patient_level_universal_returns_every_patient(archive, tmp_path):
    responses, _ = findscu(archive["port"], PATIENT_ROOT, "PATIENT", {"PatientID": ""}, tmp_path)
    assert sorted(r.PatientID for r in responses) == ["PID1", "PID2", "PID3"]


def test_wildcard_is_case_sensitive(archive, tmp_path):
    responses, log = findscu(archive["port"], PATIENT_ROOT, "PATIENT", {"PatientName": "doe*"}, tmp_path)
    assert responses == [] and "Success" in final_status(log)


def test_question_mark_matches_one_character_and_percent_underscore_are_literal(archive, tmp_path):
    keys = {"PatientName": "SM?TH^*", "AccessionNumber": ""}
    responses, _ = findscu(archive["port"], STUDY_ROOT, "STUDY", keys, tmp_path / "a")
    assert [r.AccessionNumber for r in responses] == ["ACC_3"]
    # "_" and "%" are not wildcards in DICOM: ACC_* matches ACC_3 only, ACC%* matches ACC%4 only.
    underscore, _ = findscu(archive["port"], STUDY_ROOT, "STUDY", {"AccessionNumber": "ACC_*"}, tmp_path / "b")
    percent, _ = findscu(archive["port"], STUDY_ROOT, "STUDY", {"AccessionNumber": "ACC%*"}, tmp_path / "c")
    assert [r.AccessionNumber for r in underscore] == ["ACC_3"]
    assert [r.AccessionNumber for r in percent] == ["ACC%4"]


def test_study_level_patient_root_date_range_and_study_counts(archive, tmp_path):
    keys = {
        "PatientID": "PID1",
        "StudyDate": "20240101-20240131",
        "StudyInstanceUID": "",
        "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": "",
        "ModalitiesInStudy": "",
    }
    responses, log = findscu(archive["port"], PATIENT_ROOT, "STUDY", keys, tmp_path)
    assert "Success" in final_status(log)
    assert [r.StudyInstanceUID for r in responses] == [STUDY_1]
    (study,) = responses
    assert (study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances) == (2, 3)
    assert list(study.ModalitiesInStudy) == ["CT", "MR"]
    assert study.StudyDate == "20240115"


@pytest.mark.parametrize(
    ("date_range", "expected"),
    [
        ("20240116-", [STUDY_2, STUDY_4]),
        ("-20240115", [STUDY_1, STUDY_3]),
        ("20240115", [STUDY_1]),
    ],
)
def test_study_root_open_ranges(archive, tmp_path, date_range, expected):
    keys = {"StudyDate": date_range, "StudyInstanceUID": ""}
    responses, _ = findscu(archive["port"], STUDY_ROOT, "STUDY", keys, tmp_path)
    assert sorted(r.StudyInstanceUID for r in responses) == expected


def test_study_time_range_includes_the_whole_upper_minute(archive, tmp_path):
    keys = {"StudyTime": "0800-1015", "StudyInstanceUID": ""}
    responses, _ = findscu(archive["port"], STUDY_ROOT, "STUDY", keys, tmp_path)
    # 083000 and 101500 (study 1 and 4 at the default time) are in; 140000 is not.
    assert sorted(r.StudyInstanceUID for r in responses) == [STUDY_1, STUDY_2, STUDY_4]


def test_study_root_uid_list_and_modalities_in_study_matching(archive, tmp_path):
    keys = {"StudyInstanceUID": f"{STUDY_1}\\{STUDY_3}", "PatientName": ""}
    responses, _ = findscu(archive["port"], STUDY_ROOT, "STUDY", keys, tmp_path / "a")
    assert sorted(str(r.PatientName) for r in responses) == ["DOE^JANE", "SMITH^JOHN"]
    keys = {"ModalitiesInStudy": "MR", "StudyInstanceUID": ""}
    responses, _ = findscu(archive["port"], STUDY_ROOT, "STUDY", keys, tmp_path / "b")
    assert [r.StudyInstanceUID for r in responses] == [STUDY_1]


def test_series_level_with_instance_counts(archive, tmp_path):
    keys = {
        "StudyInstanceUID": STUDY_1,
        "SeriesInstanceUID": "",
        "Modality": "",
        "SeriesNumber": "",
        "NumberOfSeriesRelatedInstances": "",
    }
    responses, _ = findscu(archive["port"], STUDY_ROOT, "SERIES", keys, tmp_path)
    by_modality = {r.Modality: r for r in responses}
    assert set(by_modality) == {"CT", "MR"}
    assert by_modality["CT"].SeriesInstanceUID == CT_SERIES and by_modality["CT"].NumberOfSeriesRelatedInstances == 2
    assert by_modality["MR"].SeriesNumber == 2 and by_modality["MR"].NumberOfSeriesRelatedInstances == 1
    assert all(r.StudyInstanceUID == STUDY_1 for r in responses)


def test_image_level_in_patient_root(archive, tmp_path):
    keys = {
        "PatientID": "PID1",
        "StudyInstanceUID": STUDY_1,
        "SeriesInstanceUID": CT_SERIES,
        "SOPInstanceUID": "",
        "SOPClassUID": "",
        "InstanceNumber": "",
        "Rows": "",
    }
    responses, _ = findscu(archive["port"], PATIENT_ROOT, "IMAGE", keys, tmp_path)
    expected = {(i.sop_instance_uid, i.instance_number) for i in archive["ct"]}
    assert {(r.SOPInstanceUID, r.InstanceNumber) for r in responses} == expected
    assert all(r.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and r.Rows == 128 for r in responses)


def test_image_level_needs_the_series_unique_key(archive, tmp_path):
    keys = {"StudyInstanceUID": STUDY_1, "SOPInstanceUID": ""}
    responses, log = findscu(archive["port"], STUDY_ROOT, "IMAGE", keys, tmp_path, "-d")
    assert responses == []
    assert statuses(log) == [0xA900]
    assert "SeriesInstanceUID is required at IMAGE level" in log  # the Error Comment


def test_patient_root_study_level_needs_patient_id(archive, tmp_path):
    _, log = findscu(archive["port"], PATIENT_ROOT, "STUDY", {"StudyInstanceUID": ""}, tmp_path, "-d")
    assert statuses(log) == [0xA900]


def test_character_set_is_returned_as_stored(archive, tmp_path):
    keys = {"PatientName": "M*", "PatientID": ""}
    responses, _ = findscu(archive["port"], STUDY_ROOT, "STUDY", keys, tmp_path)
    (study,) = responses
    assert study.SpecificCharacterSet == "ISO_IR 100"
    assert str(study.PatientName) == "MÜLLER^HANS" and study.PatientID == "PID3"


def test_unsupported_optional_key_warns_in_pending(archive, tmp_path):
    keys = {"PatientID": "PID2", "PatientComments": ""}
    responses, log = findscu(archive["port"], PATIENT_ROOT, "PATIENT", keys, tmp_path, "-d")
    assert [r.PatientID for r in responses] == ["PID2"]
    assert "PatientComments" not in responses[0]
    assert statuses(log) == [0xFF01, 0x0000]


def test_answers_are_capped_at_find_limit(archive, tmp_path, settings):
    settings.FIND_LIMIT = 2
    responses, log = findscu(archive["port"], STUDY_ROOT, "STUDY", {"StudyInstanceUID": ""}, tmp_path)
    assert len(responses) == 2 and "Success" in final_status(log)


def test_cancel_stops_the_answers(archive, tmp_path):
    patient = Patient.objects.create(patient_id="MANY", patient_name="MANY^STUDIES")
    now = timezone.now()
    Study.objects.bulk_create(
        Study(study_instance_uid=f"1.2.826.0.1.3680043.8.498.9.{n}", patient=patient, received_at=now)
        for n in range(2000)
    )
    keys = {"StudyInstanceUID": ""}
    responses, log = findscu(archive["port"], STUDY_ROOT, "STUDY", keys, tmp_path, "--cancel", "1", "-d")
    assert 1 <= len(responses) < 2000
    assert statuses(log)[-1] == 0xFE00


def test_node_without_query_retrieve_permission_is_refused(archive, modality, tmp_path):
    modality.allow_query_retrieve = False
    modality.save()
    responses, log = findscu(archive["port"], STUDY_ROOT, "STUDY", {"StudyInstanceUID": ""}, tmp_path, "-d")
    assert responses == []
    assert statuses(log) == [0x0124]
