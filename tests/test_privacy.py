"""No patient name, ID or birth date in any log: one patient sent through every inbound port of the whole gateway.

The gateway runs as `make run` runs it (web, DIMSE, HL7, worker); every byte of its output and every file
it writes outside the database and the store is searched for the patient's values afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from tests.conftest import dcmtk, free_port
from tests.running import RunningGateway
from tests.worklist.hl7_messages import adt, message, msh, orm, pid, segment
from tests.worklist.test_mpps import final, in_progress
from worklist.hl7.mllp import send

pytestmark = pytest.mark.slow

FAMILY, GIVEN = "Quixotez", "Marvella"
NAME = f"{FAMILY}^{GIVEN}"
PATIENT_ID = "QX7731PRIV"
OTHER_ID = PATIENT_ID + "B"  # a second patient record, who has the invalid birth date
BIRTH_DATE, BAD_BIRTH_DATE = "19580214", "19581431"  # month 14: pydicom's warning quotes it ("Invalid value for VR DA")
# Searched case-insensitively in every byte: each name component alone, the ID, the dates as sent and as ISO.
NEEDLES = [FAMILY, GIVEN, PATIENT_ID, BIRTH_DATE, "1958-02-14", BAD_BIRTH_DATE, "1958-14-31"]
ALL_SERVICES = "allow_echo: true, allow_store: true, allow_worklist: true, allow_mpps: true, " \
               "allow_query_retrieve: true, allow_commitment: true"  # fmt: skip
NODES = f"""
nodes:
  - {{name: ct-1, ae_title: CT1, host: 127.0.0.1, port: 104, {ALL_SERVICES}}}
  - {{name: no-store, ae_title: NOSTORE, host: 127.0.0.1, port: 104, allow_store: false}}
"""


def instance(path: Path, *, patient_id: str = PATIENT_ID, birth_date: str = BIRTH_DATE, study_uid: str = "") -> Path:
    """A real CT image carrying our patient."""
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.PatientName, dataset.PatientID, dataset.PatientBirthDate = NAME, patient_id, birth_date
    dataset.OtherPatientIDs = PATIENT_ID
    dataset.StudyInstanceUID = study_uid or generate_uid()
    dataset.SeriesInstanceUID, dataset.SOPInstanceUID = generate_uid(), generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(path)
    return path


def dcmtk_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk(tool), "-to", "10", *args],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
    )


def storescu(gateway: RunningGateway, calling: str, *files: Path) -> subprocess.CompletedProcess:
    return dcmtk_tool("storescu", "-aet", calling, "-aec", "ISTHMUS", "127.0.0.1", str(gateway.dimse_port),
                      *map(str, files))  # fmt: skip


def findscu(gateway: RunningGateway, model: str, *keys: str) -> subprocess.CompletedProcess:
    args = [model, "-aet", "CT1", "-aec", "ISTHMUS"]
    for key in keys:
        args += ["-k", key]
    return dcmtk_tool("findscu", *args, "127.0.0.1", str(gateway.dimse_port))


def multipart(*parts: bytes) -> tuple[bytes, str]:
    boundary = "privacy-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts
    )
    return (
        body + b"--" + boundary.encode() + b"--\r\n",
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def send_dimse(gateway: RunningGateway, workdir: Path) -> None:
    good = instance(workdir / "good.dcm")
    bad_date = instance(workdir / "bad-date.dcm", patient_id=OTHER_ID, birth_date=BAD_BIRTH_DATE)
    bad_uid = instance(workdir / "bad-uid.dcm", study_uid="1.2.3.not-a-uid")
    stored = storescu(gateway, "CT1", good, bad_date)
    assert stored.returncode == 0, stored.stdout + stored.stderr
    storescu(gateway, "CT1", bad_uid)  # refused: a study UID that is not a UID
    storescu(gateway, "NOSTORE", good)  # refused: the node may not store
    storescu(gateway, "STRANGER", good)  # rejected: an unknown calling AE
    patient = [f"PatientName={NAME}", f"PatientID={PATIENT_ID}", f"PatientBirthDate={BIRTH_DATE}"]
    found = findscu(gateway, "-S", "QueryRetrieveLevel=STUDY", *patient, "StudyInstanceUID")
    assert found.returncode == 0, found.stdout + found.stderr
    findscu(gateway, "-P", "QueryRetrieveLevel=PATIENT", *patient)
    findscu(gateway, "-S", "QueryRetrieveLevel=IMAGE", *patient, "SOPInstanceUID")
    # Answers carry the stored invalid birth date: pydicom validates values set on the answer data sets.
    findscu(gateway, "-S", "QueryRetrieveLevel=STUDY", f"PatientID={OTHER_ID}", "PatientBirthDate", "PatientName")
    findscu(gateway, "-P", "QueryRetrieveLevel=PATIENT", f"PatientID={OTHER_ID}", "PatientBirthDate")
    findscu(gateway, "-S", "QueryRetrieveLevel=STUDY", f"PatientName={NAME}", f"PatientBirthDate={BAD_BIRTH_DATE}")
    findscu(gateway, "-S", "QueryRetrieveLevel=NOSUCH", f"PatientName={NAME}", f"PatientID={PATIENT_ID}")
    worklist = findscu(gateway, "-W", *patient, "AccessionNumber", "ScheduledProcedureStepSequence[0].Modality")
    assert worklist.returncode == 0, worklist.stdout + worklist.stderr
    findscu(gateway, "-W", f"PatientName={NAME}", f"PatientBirthDate={BAD_BIRTH_DATE}", "AccessionNumber")
    findscu(
        gateway,
        "-W",
        f"PatientName={NAME}",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=2024-99",
    )


def send_mpps(gateway: RunningGateway) -> None:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title="ISTHMUS")
    assert assoc.is_established
    patient = {"PatientName": NAME, "PatientID": PATIENT_ID, "PatientBirthDate": BIRTH_DATE}
    try:
        uid = generate_uid()
        created = assoc.send_n_create(in_progress(**patient), ModalityPerformedProcedureStep, uid)
        assert created[0].Status == 0x0000
        ended = assoc.send_n_set(final(PatientName=NAME), ModalityPerformedProcedureStep, uid)
        assert ended[0].Status == 0x0000
        assoc.send_n_set(final(), ModalityPerformedProcedureStep, uid)  # completed already: an illegal transition
        bad_date = {**patient, "PatientBirthDate": BAD_BIRTH_DATE}
        assoc.send_n_create(in_progress(**bad_date), ModalityPerformedProcedureStep, None)
        assoc.send_n_create(
            in_progress(**bad_date, PerformedProcedureStepStatus=FAMILY), ModalityPerformedProcedureStep, None
        )
    finally:
        assoc.release()


def send_hl7(gateway: RunningGateway) -> None:
    patient = pid(PATIENT_ID, NAME, BIRTH_DATE, "F")
    acks = send("127.0.0.1", gateway.hl7_port, [
        orm("PRIV1", "NW", "PRIVACC2", patient=patient),
        adt("PRIV2", "A08", pid(PATIENT_ID, NAME, BAD_BIRTH_DATE, "F")),
        orm("PRIV3", "XX", "PRIVACC3", patient=patient),  # an order control we do not know
        message(msh("PRIV4", "ORM^O01"), patient),  # no ORC or OBR
        message(msh("PRIV5", "ADT^A40"), segment("EVN", {1: "A40"}), patient,
                segment("MRG", {1: f"{PATIENT_ID}X^^^HOSP", 7: NAME})),  # merge with an unknown patient
        f"{NAME}|{PATIENT_ID}|{BIRTH_DATE}".encode(),  # not HL7 at all
    ])  # fmt: skip
    assert b"MSA|AA|PRIV1" in acks[0], acks[0]


def send_web(gateway: RunningGateway, workdir: Path, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    study_uid = generate_uid()
    good = instance(workdir / "stow-good.dcm", study_uid=study_uid).read_bytes()
    bad_date = instance(
        workdir / "stow-bad-date.dcm", patient_id=OTHER_ID, birth_date=BAD_BIRTH_DATE, study_uid=study_uid
    ).read_bytes()
    body, content_type = multipart(good, bad_date, good[:2000], NAME.encode() + PATIENT_ID.encode())
    stow = requests.post(f"{gateway.url}/dicomweb/studies", data=body, headers={**auth, "Content-Type": content_type},
                         timeout=30)  # fmt: skip
    assert stow.status_code in (200, 202), stow.text
    studies = f"{gateway.url}/dicomweb/studies"
    queries = [
        {"PatientName": NAME, "PatientID": PATIENT_ID, "PatientBirthDate": BIRTH_DATE},
        {"00100010": NAME, "00100020": PATIENT_ID, "00100030": BIRTH_DATE, "OtherPatientIDs": PATIENT_ID},
        {"patientname": FAMILY + "*", "IssuerOfPatientID": PATIENT_ID},
        {"PatientBirthDate": "1958-14-31"},  # a bad date: 400
        {"PatientID": OTHER_ID, "includefield": "PatientBirthDate"},  # answers the invalid stored birth date
        {"PatientName": NAME, "NoSuchKeyword": PATIENT_ID, "includefield": FAMILY},  # unknown attributes: 400
        {"PatientName": NAME, "limit": BIRTH_DATE + "x"},  # a bad limit: 400
    ]
    for query in queries:
        answer = requests.get(studies, params=query, headers={**auth, "Referer": f"{studies}?PatientID={PATIENT_ID}"},
                              timeout=30)  # fmt: skip
        assert answer.status_code < 500, (query, answer.status_code, answer.text)
    assert requests.get(studies, params=queries[0], headers=auth, timeout=30).json(), "the stored study is found"
    requests.get(f"{studies}?{NAME}&{PATIENT_ID}", headers=auth, timeout=30)  # values where names belong: 400
    metadata = requests.get(f"{studies}/{study_uid}/metadata", headers=auth, timeout=30)
    assert metadata.status_code == 200 and PATIENT_ID in metadata.text, "WADO-RS reads the data sets back"
    requests.get(f"{studies}/{study_uid}", headers={**auth, "Accept": "multipart/related; type=application/dicom"},
                 timeout=30)  # fmt: skip
    requests.get(studies, params=queries[0], timeout=30)  # no token: 401
    requests.get(f"{gateway.url}/admin/gateway/study/", params={"q": NAME}, timeout=30)  # the admin's search
    requests.get(f"{gateway.url}/api/worklist/orders/", params={"patient_id": PATIENT_ID}, headers=auth, timeout=30)
    requests.post(
        f"{gateway.url}/api/worklist/orders/",
        headers=auth,
        timeout=30,
        json={"patient": {"patient_id": PATIENT_ID, "patient_name": NAME, "birth_date": BAD_BIRTH_DATE}},
    )
    # A request line gunicorn cannot parse: an unencoded space inside the query string.
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as raw:
        raw.sendall(f"GET /dicomweb/studies?PatientName={FAMILY} {GIVEN}&PatientID={PATIENT_ID} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1\r\n\r\n".encode())  # fmt: skip
        raw.recv(4096)


def forwarding_to_nowhere() -> str:
    """A rule sending everything to a DICOMweb destination where nothing listens: delivery fails and is logged."""
    return f"""destinations:
  - {{name: cloud, kind: dicomweb, url: "http://127.0.0.1:{free_port()}/dicomweb", retry_first_delay: 0.5}}
rules:
  - {{name: everything, conditions: {{}}, destinations: [cloud]}}
"""


def wait_for(gateway: RunningGateway, text: bytes, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in gateway.output():
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout} s"
        time.sleep(0.2)


def leaks(blob: bytes) -> list[str]:
    """Every line holding one of the patient's values, whatever its case."""
    needles = [needle.lower() for needle in NEEDLES]
    lines = blob.decode("utf-8", errors="replace").splitlines()
    return [line[:300] for line in lines if any(needle in line.lower() for needle in needles)]


def written_files(gateway: RunningGateway) -> list[Path]:
    """Every file the gateway wrote under its data dir except the database and the instance store."""
    storage = gateway.data_dir / "storage"
    return [
        path
        for path in gateway.data_dir.rglob("*")
        if path.is_file() and not path.is_relative_to(storage) and not path.name.startswith("isthmus.sqlite3")
    ]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_patient_name_id_and_birth_date_reach_no_log_on_any_path(tmp_path, level):
    gateway = RunningGateway(tmp_path, ISTHMUS_LOG_LEVEL=level, ISTHMUS_REQUIRE_KNOWN_HL7_SENDER="false").start()
    try:
        registered = gateway.manage("import_config", "-", stdin=NODES + forwarding_to_nowhere())
        assert registered.returncode == 0, registered.stderr
        token = gateway.manage("create_token", "privacy-test", "--scope", "read,write")
        assert token.returncode == 0, token.stderr
        send_dimse(gateway, tmp_path)
        send_mpps(gateway)
        send_hl7(gateway)
        send_web(gateway, tmp_path, token.stdout.strip())
        wait_for(gateway, b"forward job")  # the worker tried to forward the patient's instances, and failed
    finally:
        gateway.stop()
    output = gateway.output()
    assert b"all Isthmus processes stopped" in output
    assert b"C-STORE" in output or b"association accepted" in output, "the listener logged at all"
    found = leaks(output)
    for path in written_files(gateway):
        found += [f"{path.relative_to(gateway.data_dir)}: {leak}" for leak in leaks(path.read_bytes())]
    assert found == [], "\n".join(found)


def test_data_directory_and_everything_in_it_are_private_to_the_gateway_user(tmp_path):
    gateway = RunningGateway(tmp_path)
    gateway.data_dir.mkdir()
    gateway.data_dir.chmod(0o755)  # as an earlier version, or a hand-made directory, left it
    gateway.start()
    try:
        assert gateway.manage("import_config", "-", stdin=NODES).returncode == 0
        stored = storescu(gateway, "CT1", instance(tmp_path / "ct.dcm"))
        assert stored.returncode == 0, stored.stdout + stored.stderr
        instances = list((gateway.data_dir / "storage").rglob("*.dcm"))
        assert len(instances) == 1, "the instance is in the store"
        database = [path.name for path in gateway.data_dir.glob("isthmus.sqlite3*")]
        assert {"isthmus.sqlite3", "isthmus.sqlite3-wal", "isthmus.sqlite3-shm"} <= set(database)
        open_to_others = [
            f"{oct(path.stat().st_mode & 0o777)} {path.relative_to(tmp_path)}"
            for path in [gateway.data_dir, *gateway.data_dir.rglob("*")]
            if path.stat().st_mode & 0o077
        ]
    finally:
        gateway.stop()
    assert open_to_others == []
    assert (gateway.data_dir / "secret_key").stat().st_mode & 0o777 == 0o600
    assert instances[0].stat().st_mode & 0o777 == 0o600 and instances[0].parent.stat().st_mode & 0o777 == 0o700
    assert f"{gateway.data_dir} was open to other users (mode 0755); now 0700" in gateway.output().decode()
