"""HL7 orders and demographics over a real MLLP socket: what the RIS sends, what the worklist then holds."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time

from pydicom import dcmread
from pydicom.uid import UID

from gateway.models import Heartbeat
from tests.conftest import ROOT, dcmtk, free_port, manage, peer_env, stop_process, wait_for_port
from tests.worklist.hl7_messages import adt, err, exchange, message, msa, msh, orm, pid, segment
from worklist.hl7.mllp import FrameReader, frame
from worklist.models import Hl7Message, Order, Patient, PatientMerge, ScheduledStep


def open_steps(**filters) -> list[ScheduledStep]:
    """What the worklist offers: steps not closed (the MWL query's base)."""
    steps = ScheduledStep.objects.exclude(status__in=ScheduledStep.CLOSED).filter(**filters)
    return list(steps.select_related("order__patient"))


def test_new_then_change_then_cancel(hl7_listener):
    acks = exchange(hl7_listener, orm("C1", "NW", "ACC100"))
    assert msa(acks[0])[1:3] == ["AA", "C1"]
    order = Order.objects.get(accession_number="ACC100")
    assert UID(order.study_instance_uid).is_valid
    assert (order.source, order.status, order.requested_procedure_id) == ("hl7", "SCHEDULED", "RPACC100")
    assert order.requested_procedure_code == {"value": "CTHEAD", "meaning": "CT HEAD", "scheme": "LOCAL"}
    assert (order.placer_order_number, order.filler_order_number) == ("PLACC100", "FLACC100")
    assert order.referring_physician_name == "REFERRER^ROBERT"
    assert order.requested_procedure_priority == "STAT"
    assert order.reason_for_requested_procedure == "Headache"
    (step,) = open_steps(station_ae_title="CT1")
    assert (step.step_id, step.modality, step.start_date, step.start_time) == ("SPS1", "CT", "20240105", "1030")
    assert step.order.patient.patient_name == "TESTER^ALICE"

    acks = exchange(hl7_listener, orm("C2", "XO", "ACC100", modality="MR", station="MR1", start="202401061415"))
    assert msa(acks[0])[1] == "AA"
    order.refresh_from_db()
    (step,) = open_steps(order=order)
    assert (step.modality, step.station_ae_title, step.start_date, step.start_time) == ("MR", "MR1", "20240106", "1415")
    assert Order.objects.get(pk=order.pk).study_instance_uid == order.study_instance_uid

    acks = exchange(hl7_listener, orm("C3", "CA", "ACC100"))
    assert msa(acks[0])[1] == "AA"
    assert Order.objects.get(pk=order.pk).status == "CANCELED"
    assert ScheduledStep.objects.get(pk=step.pk).status == "CANCELED"
    assert open_steps() == []
    assert list(Hl7Message.objects.order_by("control_id").values_list("control_id", "ack_code")) == [
        ("C1", "AA"), ("C2", "AA"), ("C3", "AA")]  # fmt: skip


def test_discontinue_and_status_change(hl7_listener):
    exchange(hl7_listener, orm("D1", "NW", "ACC200"), orm("D2", "NW", "ACC201", step_id="SPS2"))
    acks = exchange(hl7_listener, orm("D3", "DC", "ACC200"), orm("D4", "SC", "ACC201", order_status="CM"))
    assert [msa(ack)[1] for ack in acks] == ["AA", "AA"]
    assert Order.objects.get(accession_number="ACC200").status == "DISCONTINUED"
    assert Order.objects.get(accession_number="ACC201").status == "COMPLETED"
    assert sorted(ScheduledStep.objects.values_list("status", flat=True)) == ["COMPLETED", "DISCONTINUED"]


def test_omi_with_two_ipc_steps(hl7_listener):
    omi = message(
        msh("O1", "OMI^O23^OMI_O23"),
        pid("PAT777", "OMI^OSCAR"),
        segment("ORC", {1: "NW", 2: "PL9", 3: "FL9", 5: "SC"}),
        segment("TQ1", {1: "1", 7: "20240210083000", 9: "R"}),
        segment("OBR", {1: "1", 2: "PL9", 3: "FL9", 4: "MRKNEE^MR Knee^LOCAL"}),
        segment("IPC", {1: "ACC900^HOSPRIS", 2: "RP900", 3: "1.2.826.0.1.3680043.2.1125.9", 4: "SPS901", 5: "MR",
                        6: "P1^Knee sag^LOCAL", 9: "MR1"}),
        segment("IPC", {1: "ACC900^HOSPRIS", 2: "RP900", 3: "1.2.826.0.1.3680043.2.1125.9", 4: "SPS902", 5: "MR",
                        6: "P2^Knee cor^LOCAL", 9: "MR2"}),
    )  # fmt: skip
    assert msa(exchange(hl7_listener, omi)[0])[1] == "AA"
    order = Order.objects.get(accession_number="ACC900")
    assert (order.issuer_of_accession_number, order.requested_procedure_id) == ("HOSPRIS", "RP900")
    assert order.study_instance_uid == "1.2.826.0.1.3680043.2.1125.9"
    assert order.requested_procedure_priority == "ROUTINE"
    steps = open_steps(order=order)
    assert sorted((s.step_id, s.station_ae_title, s.description, s.start_date) for s in steps) == [
        ("SPS901", "MR1", "Knee sag", "20240210"), ("SPS902", "MR2", "Knee cor", "20240210")]  # fmt: skip
    assert steps[0].protocol_codes[0]["scheme"] == "LOCAL"


def test_adt_a08_changes_the_name_the_worklist_shows(hl7_listener):
    exchange(hl7_listener, orm("A1", "NW", "ACC300"))
    update = adt("A2", "A08", pid("PAT001", "TESTER-SMITH^ALICE^B", "19700102", "F"), segment("PV1", {1: "1"}))
    assert msa(exchange(hl7_listener, update)[0])[1] == "AA"
    patient = Patient.objects.get(patient_id="PAT001", issuer_of_patient_id="HOSP")
    assert (patient.patient_name, patient.patient_birth_date) == ("TESTER-SMITH^ALICE^B", "19700102")
    (step,) = open_steps(order__accession_number="ACC300")
    assert step.order.patient.patient_name == "TESTER-SMITH^ALICE^B"


def test_adt_a04_registers_and_empty_fields_keep_their_value(hl7_listener):
    exchange(hl7_listener, adt("R1", "A04", pid("PAT050", "NEW^NORA", "19900101", "F")))
    exchange(hl7_listener, adt("R2", "A08", segment("PID", {1: "1", 3: "PAT050^^^HOSP", 5: "NEWER^NORA", 8: '""'})))
    patient = Patient.objects.get(patient_id="PAT050")
    assert (patient.patient_name, patient.patient_birth_date, patient.patient_sex) == ("NEWER^NORA", "19900101", "")


def test_adt_a40_merge_moves_orders_to_the_surviving_patient(hl7_listener):
    exchange(hl7_listener, orm("M1", "NW", "ACC400", patient=pid("OLD1", "DUPLICATE^DAN")))
    exchange(hl7_listener, orm("M2", "NW", "ACC401", patient=pid("KEEP1", "KEEPER^DAN")))
    merge = adt("M3", "A40", pid("KEEP1", "KEEPER^DAN"), segment("MRG", {1: "OLD1^^^HOSP"}))
    assert msa(exchange(hl7_listener, merge)[0])[1] == "AA"
    keeper, old = Patient.objects.get(patient_id="KEEP1"), Patient.objects.get(patient_id="OLD1")
    assert old.merged_into == keeper
    assert set(keeper.orders.values_list("accession_number", flat=True)) == {"ACC400", "ACC401"}
    assert {"id": "OLD1", "issuer": "HOSP"} in keeper.other_patient_ids
    assert PatientMerge.objects.get().message_control_id == "M3"
    # An order still sent under the old ID lands on the surviving patient.
    exchange(hl7_listener, orm("M4", "NW", "ACC402", patient=pid("OLD1", "DUPLICATE^DAN")))
    assert Order.objects.get(accession_number="ACC402").patient == keeper


def test_garbage_is_rejected_and_the_connection_keeps_working(hl7_listener):
    with socket.create_connection(("127.0.0.1", hl7_listener.port), timeout=10) as client:
        reader = FrameReader()

        def ask(payload: bytes) -> str:
            client.sendall(frame(payload))
            while True:
                for answer in reader.feed(client.recv(4096)):
                    return answer.decode()

        assert msa(ask(b"this is not HL7\r"))[1] == "AR"
        unsupported = ask(message(msh("G2", "ORU^R01"), pid()))
        assert msa(unsupported)[1:3] == ["AR", "G2"]
        assert err(unsupported)[3].startswith("200^")
        assert msa(ask(message(msh("G3", "ADT^A08", charset="KLINGON"), pid())))[1] == "AR"
        assert msa(ask(orm("G4", "NW", "ACC500")))[1] == "AA"
    assert Order.objects.filter(accession_number="ACC500").exists()


def test_understood_but_not_applicable_gets_ae_with_err(hl7_listener):
    unknown, missing, duplicate = exchange(
        hl7_listener,
        orm("E1", "XO", "NOSUCH"),
        orm("E2", "NW", ""),
        orm("E3", "NW", "ACC600"),
    )
    assert msa(unknown)[1] == "AE" and err(unknown)[2:4] == ["OBR^1^18", "204^Unknown key identifier^HL70357"]
    assert msa(missing)[1] == "AE" and err(missing)[3].startswith("101^")
    assert msa(duplicate)[1] == "AA"
    again = exchange(hl7_listener, orm("E4", "NW", "ACC600"))[0]
    assert msa(again)[1] == "AE" and err(again)[3].startswith("205^")
    assert Order.objects.count() == 1
    assert Hl7Message.objects.get(control_id="E1").ack_code == "AE"


def test_repeated_control_id_is_answered_again_and_not_applied_twice(hl7_listener):
    first = exchange(hl7_listener, orm("R1", "NW", "ACC700"))[0]
    Order.objects.filter(accession_number="ACC700").update(requested_procedure_description="changed here")
    second, third = exchange(hl7_listener, orm("R1", "NW", "ACC700"), orm("R1", "NW", "ACC700"))
    assert second == first == third  # the stored ACK, byte for byte (same ACK control ID)
    assert Order.objects.filter(accession_number="ACC700").count() == 1
    assert Order.objects.get(accession_number="ACC700").requested_procedure_description == "changed here"
    # A message answered AE applied nothing; sent again once it can apply, it is processed.
    assert msa(exchange(hl7_listener, orm("R2", "XO", "ACC701"))[0])[1] == "AE"
    exchange(hl7_listener, orm("R3", "NW", "ACC701"))
    assert msa(exchange(hl7_listener, orm("R2", "XO", "ACC701", modality="MR"))[0])[1] == "AA"
    assert ScheduledStep.objects.get(order__accession_number="ACC701").modality == "MR"


def test_message_split_across_tcp_reads(hl7_listener):
    whole = frame(orm("S1", "NW", "ACC800")) + frame(orm("S2", "XO", "ACC800", modality="US"))
    with socket.create_connection(("127.0.0.1", hl7_listener.port), timeout=10) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for cut in range(0, len(whole), 17):
            client.sendall(whole[cut : cut + 17])
            time.sleep(0.002)
        reader, acks = FrameReader(), []
        while len(acks) < 2:
            acks += list(reader.feed(client.recv(4096)))
    assert [msa(ack.decode())[1:3] for ack in acks] == [["AA", "S1"], ["AA", "S2"]]
    assert ScheduledStep.objects.get(order__accession_number="ACC800").modality == "US"


def test_latin1_and_utf8_names_with_escapes(hl7_listener):
    latin = adt("L1", "A04", pid("PATL1", "MÜLLER\\T\\SÖHNE^JÖRG\\F\\X", "19600101", "M"), charset="8859/1",
                codec="latin-1")  # fmt: skip
    acks = exchange(hl7_listener, latin, codec="latin-1")
    assert msa(acks[0])[1] == "AA" and "8859/1" in acks[0]
    assert Patient.objects.get(patient_id="PATL1").patient_name == "MÜLLER&SÖHNE^JÖRG|X"

    utf8 = adt("U1", "A04", pid("PATU1", "ŁUKASZ\\R\\Ż\\E\\W^ΑΛΕΞΗ\\S\\Σ^RENÉ\\XC3A9\\"), charset="UNICODE UTF-8")
    assert msa(exchange(hl7_listener, utf8)[0])[1] == "AA"
    # ~ and | are text in DICOM PN; ^ and \ are PN delimiters, so inside a component they become spaces.
    assert Patient.objects.get(patient_id="PATU1").patient_name == "ŁUKASZ~Ż W^ΑΛΕΞΗ Σ^RENÉé"

    wrong = adt("U2", "A04", pid("PATU2", "MÜLLER^X"), charset="UNICODE UTF-8", codec="latin-1")
    assert msa(exchange(hl7_listener, wrong, codec="latin-1")[0])[1] == "AR"
    assert not Patient.objects.filter(patient_id="PATU2").exists()


def test_logs_carry_no_names_ids_or_birth_dates(hl7_listener, caplog):
    caplog.set_level(logging.INFO)
    exchange(hl7_listener, orm("P1", "NW", "ACC950", patient=pid("SECRET42", "PRIVATE^PENNY", "19551231")))
    exchange(hl7_listener, orm("P2", "XO", "NOSUCH", patient=pid("SECRET42", "PRIVATE^PENNY", "19551231")))
    text = caplog.text
    assert "ACC950" in text and "P1" in text
    for secret in ("SECRET42", "PRIVATE", "PENNY", "19551231"):
        assert secret not in text


def test_manage_hl7_and_hl7_send_from_the_shell(hl7_sender, tmp_path):
    port = free_port()
    listener = subprocess.Popen(
        [sys.executable, "manage.py", "hl7", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=peer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_port(port, process=listener)
        deadline = time.monotonic() + 10  # the port opens a moment before the first heartbeat is written
        while not Heartbeat.objects.filter(kind="hl7").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Heartbeat.objects.filter(kind="hl7", address=f"MLLP 127.0.0.1:{port}").exists()
        order_file = tmp_path / "order.hl7"
        order_file.write_bytes(orm("F1", "NW", "ACC990").replace(b"\r", b"\n") + b"\n")
        sent = manage("hl7_send", str(order_file), "--port", str(port))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "MSA|AA|F1" in sent.stdout
        assert Order.objects.filter(accession_number="ACC990", steps__station_ae_title="CT1").exists()
        bad = tmp_path / "bad.hl7"
        bad.write_bytes(orm("F2", "XO", "NOSUCH"))
        refused = manage("hl7_send", str(bad), "--port", str(port))
        assert refused.returncode == 1 and "MSA|AE|F2" in refused.stdout

        listener.send_signal(signal.SIGTERM)
        assert listener.wait(timeout=15) == 0
        assert "HL7 listener stopped" in listener.stdout.read()
        assert not Heartbeat.objects.filter(kind="hl7").exists()
    finally:
        stop_process(listener)


def test_same_control_id_on_two_connections_at_once_is_applied_once(hl7_listener):
    results: list[str] = []
    barrier = threading.Barrier(4)

    def send_copy() -> None:
        barrier.wait()
        results.extend(exchange(hl7_listener, orm("RACE1", "NW", "ACC960")))

    threads = [threading.Thread(target=send_copy) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4 and len(set(results)) == 1 and msa(results[0])[1] == "AA"
    assert Order.objects.filter(accession_number="ACC960").count() == 1
    assert Patient.objects.filter(patient_id="PAT001").count() == 1


def _worklist(port: int, out) -> list:
    """`findscu -W` as the CT1 modality asks: every open step for its station."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID",
            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT1",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID"]  # fmt: skip
    args = [dcmtk("findscu"), "-W", "-aet", "CT1", "-aec", "ISTHMUS", "-to", "10", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    found = subprocess.run([*args, "127.0.0.1", str(port)], env=peer_env(), capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert found.returncode == 0, found.stdout + found.stderr
    return [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def test_an_hl7_order_is_what_findscu_sees(hl7_listener, listener, modality, tmp_path):
    exchange(hl7_listener, orm("W1", "NW", "ACC970", patient=pid("PATW1", "WORKLIST^WANDA")))
    (answer,) = _worklist(listener.port, tmp_path / "new")
    assert (answer.AccessionNumber, answer.PatientID, str(answer.PatientName)) == ("ACC970", "PATW1", "WORKLIST^WANDA")
    assert answer.StudyInstanceUID == Order.objects.get(accession_number="ACC970").study_instance_uid
    assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "SPS1"

    exchange(hl7_listener, adt("W2", "A08", pid("PATW1", "WORKLIST^WANDA^MARIE")))
    (answer,) = _worklist(listener.port, tmp_path / "renamed")
    assert str(answer.PatientName) == "WORKLIST^WANDA^MARIE"

    exchange(hl7_listener, orm("W3", "CA", "ACC970"))
    assert _worklist(listener.port, tmp_path / "cancelled") == []
