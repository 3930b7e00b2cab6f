"""Modality Worklist C-FIND over the wire: dcmtk `findscu -W` against our listener, answers read back with pydicom."""

from __future__ import annotations

import re
import subprocess
from datetime import date, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import dcmtk, peer_env
from tests.worklist import factories
from worklist.models import ScheduledStep

TODAY = date.today().strftime("%Y%m%d")
TOMORROW = (date.today() + timedelta(days=1)).strftime("%Y%m%d")
YESTERDAY = (date.today() - timedelta(days=1)).strftime("%Y%m%d")
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
CYRILLIC = "ПЕТРОВ^ИВАН"
SPS = "ScheduledProcedureStepSequence"
# Every step attribute a modality typically asks for (IHE RAD-5), all as return keys.
STEP_RETURN_KEYS = [
    f"{SPS}[0].ScheduledStationAETitle",
    f"{SPS}[0].ScheduledProcedureStepStartDate",
    f"{SPS}[0].ScheduledProcedureStepStartTime",
    f"{SPS}[0].Modality",
    f"{SPS}[0].ScheduledPerformingPhysicianName",
    f"{SPS}[0].ScheduledProcedureStepDescription",
    f"{SPS}[0].ScheduledProcedureStepID",
    f"{SPS}[0].ScheduledStationName",
    f"{SPS}[0].ScheduledProcedureStepLocation",
    f"{SPS}[0].ScheduledProcedureStepStatus",
]
TOP_RETURN_KEYS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "StudyInstanceUID",
    "ReferringPhysicianName",
    "RequestedProcedurePriority",
    "ReferencedStudySequence",
]


@pytest.fixture
def worklist(listener, modality) -> dict:
    """Open steps today and tomorrow on CT1 and MR1, and closed steps that must never be offered."""
    jane = factories.scheduled(
        patient_fields=dict(
            patient_id="PID-JANE", patient_name="DOE^JANE", patient_birth_date="19700101", patient_sex="F"
        ),
        order_fields=dict(
            accession_number="ACC100",
            requested_procedure_id="RP100",
            requested_procedure_description="CT HEAD",
            referring_physician_name="WELBY^MARCUS",
            requested_procedure_priority="ROUTINE",
            requested_procedure_code={"value": "CTHD", "scheme": "99ISTHMUS", "meaning": "CT head"},
        ),
        step_id="SPS100",
        start_date=TODAY,
        start_time="080000",
        performing_physician_name="HOUSE^GREGORY",
        station_name="CTROOM1",
        location="ROOM 1",
        protocol_codes=[{"value": "P1", "scheme": "99ISTHMUS", "meaning": "Head routine"}],
    )
    john = factories.scheduled(
        patient_fields=dict(patient_id="PID-JOHN", patient_name="DOE^JOHN"),
        order_fields=dict(accession_number="ACC101"),
        start_date=TODAY,
        start_time="101500",
    )
    dora = factories.scheduled(
        patient_fields=dict(patient_id="PID-DORA", patient_name="DOE^DORA"),
        order_fields=dict(accession_number="ACC102"),
        start_date=TOMORROW,
        start_time="090000",
    )
    muller = factories.scheduled(
        patient_fields=dict(patient_id="PID-MUELLER", patient_name="MÜLLER^HANS"),
        order_fields=dict(accession_number="ACC%7"),
        station_ae_title="MR1",
        modality="MR",
        start_date=TODAY,
        start_time="110000",
    )
    lookalike = factories.scheduled(
        patient_fields=dict(patient_id="PID-LOOK", patient_name="LOOK^ALIKE"),
        order_fields=dict(accession_number="ACC17"),
        station_ae_title="MR1",
        modality="MR",
        start_date=YESTERDAY,
    )
    yamada = factories.scheduled(
        patient_fields=dict(patient_id="PID-JP", patient_name=JAPANESE),
        order_fields=dict(accession_number="ACC200"),
        station_ae_title="MR1",
        modality="MR",
        start_date=TOMORROW,
        start_time="140000",
    )
    petrov = factories.scheduled(
        patient_fields=dict(patient_id="PID-RU", patient_name=CYRILLIC),
        order_fields=dict(accession_number="ACC300"),
        station_ae_title="MR1",
        modality="MR",
        start_date=TOMORROW,
        start_time="150000",
    )
    closed = [
        factories.scheduled(order_fields=dict(accession_number=f"ACC9{n}"), start_date=TODAY, status=status)
        for n, status in enumerate(ScheduledStep.CLOSED)
    ]
    return {
        "port": listener.port,
        "jane": jane,
        "john": john,
        "dora": dora,
        "muller": muller,
        "lookalike": lookalike,
        "yamada": yamada,
        "petrov": petrov,
        "closed": closed,
    }


def findscu(
    port: int, keys: list[str], out: Path, *extra: str, calling: str = "CT1", query: Path | None = None
) -> tuple[list[Dataset], str]:
    """Run `findscu -W`; return the answers (read back with pydicom) and its log."""
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), "-d", "-W", "-aet", calling, "-aec", "ISTHMUS", "-to", "10", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(
        [*args, *extra, "127.0.0.1", str(port), *([str(query)] if query else [])],
        env=peer_env(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))], result.stdout + result.stderr


def query_file(path: Path, charset: str | list[str], **top) -> Path:
    """A query identifier written by pydicom in `charset`, for findscu's query file argument."""
    query = Dataset()
    query.SpecificCharacterSet = charset
    for keyword in ("PatientName", "PatientID", "AccessionNumber"):
        setattr(query, keyword, top.get(keyword))
    item = Dataset()
    item.ScheduledStationAETitle = top.get("ScheduledStationAETitle")
    item.ScheduledProcedureStepStartDate = None
    query.ScheduledProcedureStepSequence = [item]
    query.save_as(path, implicit_vr=True, little_endian=True)
    return path


def statuses(log: str) -> list[int]:
    """Every DIMSE status findscu received, from its debug dump of the response messages."""
    return [int(code, 16) for code in re.findall(r"^D: DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", log, re.MULTILINE)]


def accessions(answers: list[Dataset]) -> list[str]:
    return [answer.AccessionNumber for answer in answers]


def test_all_steps_for_a_station_today_attribute_by_attribute(worklist, tmp_path):
    keys = [f"{SPS}[0].ScheduledStationAETitle=CT1", f"{SPS}[0].ScheduledProcedureStepStartDate={TODAY}"]
    keys += STEP_RETURN_KEYS[2:] + TOP_RETURN_KEYS + ["RequestedProcedureCodeSequence"]
    answers, log = findscu(worklist["port"], keys, tmp_path)

    assert accessions(answers) == ["ACC100", "ACC101"]  # soonest first; closed steps and tomorrow left out
    assert statuses(log)[-1] == 0x0000 and set(statuses(log)[:-1]) == {0xFF00}
    jane = answers[0]
    assert "SpecificCharacterSet" not in jane  # ASCII query, ASCII answer
    assert str(jane.PatientName) == "DOE^JANE"
    assert jane.PatientID == "PID-JANE"
    assert jane.PatientBirthDate == "19700101"
    assert jane.PatientSex == "F"
    assert jane.RequestedProcedureID == "RP100"
    assert jane.RequestedProcedureDescription == "CT HEAD"
    assert jane.StudyInstanceUID == worklist["jane"].order.study_instance_uid
    assert str(jane.ReferringPhysicianName) == "WELBY^MARCUS"
    assert jane.RequestedProcedurePriority == "ROUTINE"
    assert "ReferencedStudySequence" in jane and len(jane.ReferencedStudySequence) == 0  # type 2, empty
    code = jane.RequestedProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("CTHD", "99ISTHMUS", "CT head")
    step = jane.ScheduledProcedureStepSequence[0]
    assert step.ScheduledStationAETitle == "CT1"
    assert step.ScheduledProcedureStepStartDate == TODAY
    assert step.ScheduledProcedureStepStartTime == "080000"
    assert step.Modality == "CT"
    assert str(step.ScheduledPerformingPhysicianName) == "HOUSE^GREGORY"
    assert step.ScheduledProcedureStepDescription == "CT head without contrast"
    assert step.ScheduledProcedureStepID == "SPS100"
    assert step.ScheduledStationName == "CTROOM1"
    assert step.ScheduledProcedureStepLocation == "ROOM 1"
    assert step.ScheduledProcedureStepStatus == "SCHEDULED"
    john = answers[1]
    assert john.RequestedProcedureCodeSequence == []  # none stored: present and empty
    assert john.ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName == ""  # type 2, zero length
    assert john.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime == "101500"


def test_empty_step_sequence_returns_every_step_attribute(worklist, tmp_path):
    answers, _ = findscu(worklist["port"], ["AccessionNumber=ACC100", SPS], tmp_path)
    assert len(answers) == 1
    step = answers[0].ScheduledProcedureStepSequence[0]
    assert step.ScheduledProcedureStepID == "SPS100"
    assert step.ScheduledStationAETitle == "CT1"
    assert step.ScheduledProtocolCodeSequence[0].CodeValue == "P1"
    assert step.ScheduledProtocolCodeSequence[0].CodeMeaning == "Head routine"


def test_date_range(worklist, tmp_path):
    keys = [f"{SPS}[0].ScheduledProcedureStepStartDate={TODAY}-{TOMORROW}", "AccessionNumber", "PatientID"]
    answers, _ = findscu(worklist["port"], keys, tmp_path)
    assert accessions(answers) == ["ACC100", "ACC101", "ACC%7", "ACC102", "ACC200", "ACC300"]
    open_ended, _ = findscu(
        worklist["port"], [f"{SPS}[0].ScheduledProcedureStepStartDate=-{YESTERDAY}", "AccessionNumber"], tmp_path / "b"
    )
    assert accessions(open_ended) == ["ACC17"]


def test_combined_date_and_time_range(worklist, tmp_path):
    """Today 10:00 to tomorrow 09:00 is one date-time range (PS3.4 C.2.2.2.5), not two separate ones."""
    keys = [
        f"{SPS}[0].ScheduledProcedureStepStartDate={TODAY}-{TOMORROW}",
        f"{SPS}[0].ScheduledProcedureStepStartTime=1000-0900",
        "AccessionNumber",
    ]
    answers, _ = findscu(worklist["port"], keys, tmp_path)
    assert accessions(answers) == ["ACC101", "ACC%7", "ACC102"]


def test_time_range_alone(worklist, tmp_path):
    keys = [
        f"{SPS}[0].ScheduledProcedureStepStartTime=0900-1100",
        f"{SPS}[0].ScheduledStationAETitle=CT1",
        "AccessionNumber",
    ]
    answers, _ = findscu(worklist["port"], keys, tmp_path)
    assert accessions(answers) == ["ACC101", "ACC102"]  # 10:15 today, 09:00 tomorrow; not 08:00 today


def test_patient_name_wildcards(worklist, tmp_path):
    answers, _ = findscu(worklist["port"], ["PatientName=DOE^J*", "AccessionNumber"], tmp_path / "star")
    assert sorted(accessions(answers)) == ["ACC100", "ACC101"]
    answers, _ = findscu(worklist["port"], ["PatientName=DOE^?O*", "AccessionNumber"], tmp_path / "mark")
    assert sorted(accessions(answers)) == ["ACC101", "ACC102"]  # JOHN and DORA, not JANE
    answers, _ = findscu(worklist["port"], ["PatientName=D?E*"], tmp_path / "both")
    assert sorted(str(a.PatientName) for a in answers) == ["DOE^DORA", "DOE^JANE", "DOE^JOHN"]


def test_patient_name_case_insensitive_when_configured(worklist, tmp_path, settings):
    settings.WORKLIST_PN_CASE_INSENSITIVE = True
    answers, _ = findscu(worklist["port"], ["PatientName=doe^jane", "AccessionNumber"], tmp_path / "on")
    assert accessions(answers) == ["ACC100"]
    settings.WORKLIST_PN_CASE_INSENSITIVE = False
    answers, _ = findscu(worklist["port"], ["PatientName=doe^j*", "AccessionNumber"], tmp_path / "off")
    assert answers == []


def test_accession_number(worklist, tmp_path):
    answers, _ = findscu(worklist["port"], ["AccessionNumber=ACC102", "PatientID", SPS], tmp_path)
    assert len(answers) == 1
    assert answers[0].PatientID == "PID-DORA"
    assert answers[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == TOMORROW


def test_modality(worklist, tmp_path):
    answers, _ = findscu(worklist["port"], [f"{SPS}[0].Modality=MR", "AccessionNumber"], tmp_path)
    assert accessions(answers) == ["ACC17", "ACC%7", "ACC200", "ACC300"]


def test_percent_and_underscore_are_literal(worklist, tmp_path):
    """'%' and '_' are ordinary characters in DICOM; only '*' and '?' are wildcards (PS3.4 C.2.2.2.4)."""
    answers, _ = findscu(worklist["port"], ["AccessionNumber=ACC%*", "PatientID"], tmp_path / "percent")
    assert [a.PatientID for a in answers] == ["PID-MUELLER"]  # not ACC17, which LIKE 'ACC%%' would find
    answers, _ = findscu(worklist["port"], ["AccessionNumber=ACC_7", "PatientID"], tmp_path / "underscore")
    assert answers == []  # '_' would match ACC17 if it were a wildcard
    answers, _ = findscu(worklist["port"], ["AccessionNumber=ACC%7", "PatientID"], tmp_path / "exact")
    assert [a.PatientID for a in answers] == ["PID-MUELLER"]


def test_japanese_name_in_iso_2022_ir_87(worklist, tmp_path):
    """A query in ISO 2022 IR 87 matching the ideographic group; the answer comes back in the same set."""
    query = query_file(tmp_path / "q.dcm", ["", "ISO 2022 IR 87"], PatientName="=山田^太郎", PatientID=None)
    answers, _ = findscu(worklist["port"], [], tmp_path / "out", query=query)
    assert len(answers) == 1
    answer = answers[0]
    assert answer.SpecificCharacterSet == ["", "ISO 2022 IR 87"]
    assert str(answer.PatientName) == JAPANESE
    assert answer.PatientName.ideographic == "山田^太郎"
    assert answer.PatientID == "PID-JP"
    raw = (tmp_path / "out").glob("rsp*.dcm").__next__().read_bytes()
    assert b"\x1b$B" in raw  # written with the JIS X 0208 escape sequence, not UTF-8
    # The ideographic group alone, without '=', matches too.
    query = query_file(tmp_path / "q2.dcm", ["", "ISO 2022 IR 87"], PatientName="山田*", PatientID=None)
    answers, _ = findscu(worklist["port"], [], tmp_path / "out2", query=query)
    assert [a.PatientID for a in answers] == ["PID-JP"]


def test_utf8_name(worklist, tmp_path):
    query = query_file(tmp_path / "q.dcm", "ISO_IR 192", PatientName="ПЕТРОВ*", PatientID=None)
    answers, _ = findscu(worklist["port"], [], tmp_path / "out", query=query)
    assert len(answers) == 1
    assert answers[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(answers[0].PatientName) == CYRILLIC
    assert answers[0].PatientID == "PID-RU"


def test_latin1_query_answered_in_latin1(worklist, tmp_path):
    query = query_file(tmp_path / "q.dcm", "ISO_IR 100", PatientName="MÜLLER*", PatientID=None)
    answers, _ = findscu(worklist["port"], [], tmp_path / "out", query=query)
    assert [str(a.PatientName) for a in answers] == ["MÜLLER^HANS"]
    assert answers[0].SpecificCharacterSet == "ISO_IR 100"
    assert "MÜLLER".encode("latin-1") in next((tmp_path / "out").glob("rsp*.dcm")).read_bytes()


def test_names_that_do_not_fit_the_query_set_come_back_in_utf8(worklist, tmp_path):
    """A plain ASCII query for station MR1 finds Latin-1, Japanese and Cyrillic names: answered in UTF-8, no '?'."""
    answers, _ = findscu(worklist["port"], [f"{SPS}[0].ScheduledStationAETitle=MR1", "PatientName"], tmp_path)
    names = {str(answer.PatientName): answer.get("SpecificCharacterSet") for answer in answers}
    assert names == {"LOOK^ALIKE": None, "MÜLLER^HANS": "ISO_IR 192", JAPANESE: "ISO_IR 192", CYRILLIC: "ISO_IR 192"}


def test_completed_cancelled_and_discontinued_steps_are_not_offered(worklist, tmp_path):
    answers, _ = findscu(worklist["port"], ["AccessionNumber=ACC9*", "PatientID"], tmp_path)
    assert answers == []
    ScheduledStep.objects.filter(pk=worklist["jane"].pk).update(status=ScheduledStep.Status.COMPLETED)
    answers, _ = findscu(worklist["port"], ["AccessionNumber=ACC10*", "PatientID"], tmp_path / "after")
    assert [a.PatientID for a in answers] == ["PID-JOHN", "PID-DORA"]


def test_answers_capped(worklist, tmp_path, settings):
    settings.WORKLIST_LIMIT = 2
    answers, log = findscu(worklist["port"], [f"{SPS}[0].Modality=MR", "AccessionNumber"], tmp_path)
    assert accessions(answers) == ["ACC17", "ACC%7"]
    assert statuses(log)[-1] == 0x0000


def test_cancel_stops_the_answers(listener, modality, tmp_path, settings):
    settings.WORKLIST_LIMIT = 5000
    # More answers than socket buffers hold, so the SCP is still sending when the C-CANCEL arrives.
    order = factories.order()
    ScheduledStep.objects.bulk_create(
        ScheduledStep(order=order, step_id=f"C{n}", station_ae_title="CT1", start_date=TODAY, start_time=f"{n:06d}")
        for n in range(3000)
    )
    answers, log = findscu(listener.port, [f"{SPS}[0].ScheduledProcedureStepID"], tmp_path, "--cancel", "3")
    assert 3 <= len(answers) < 3000
    assert statuses(log)[-1] == 0xFE00  # Matching terminated due to Cancel


def test_node_without_worklist_permission_is_refused(worklist, modality, tmp_path):
    modality.allow_worklist = False
    modality.save()
    answers, log = findscu(worklist["port"], ["PatientName=DOE*"], tmp_path)
    assert answers == []
    assert statuses(log) == [0x0124]


def test_malformed_value_is_refused_with_a_status_and_not_logged(worklist, tmp_path, caplog):
    answers, log = findscu(worklist["port"], [f"{SPS}[0].ScheduledProcedureStepStartDate=2024-01-01-02"], tmp_path)
    assert answers == []
    assert statuses(log) == [0xA900]
    answers, log = findscu(worklist["port"], ["PatientBirthDate=1970-01-01"], tmp_path / "birth")
    assert statuses(log) == [0xA900]
    assert "PatientBirthDate: not a valid DA value" in caplog.text
    assert "1970-01-01" not in caplog.text  # a birth date is patient data
