"""Fuzzing the PDU and DIMSE message readers of `manage.py dimse` over real loopback sockets.

Each example opens a connection, sends what hypothesis drew and half-closes;
the listener must answer with well-formed PDUs (A-ASSOCIATE-AC/RJ, P-DATA-TF
with a DIMSE status, A-RELEASE-RP, A-ABORT) or close, within the socket
timeout. After the run the listener is alive, serves a registered modality,
has given back its threads and stayed within a memory bound, logged no
traceback, left no association event open and no file in its temp area.

`ISTHMUS_FUZZ_EXAMPLES=20000` runs a long random campaign (tests/fuzz.py).
"""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from gateway.models import AssociationEvent
from tests.conftest import echoscu, free_port
from tests.fuzz import fuzz
from tests.gateway.dimse_peer import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    RELEASE_RQ,
    associate_rq,
    connect,
    established,
    files_under,
    listener_process,
    proc_status,
    read_until_closed,
)
from tests.gateway.dimse_peer import (
    P_DATA_TF as P_DATA_TF_TYPE,
)

ABSTRACT_SYNTAXES = (
    Verification,
    CTImageStorage,
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelFind,
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
)
CONTEXT_IDS = (1, 3, 5, 7, 9, 11)  # in the order above
ANSWER_TIMEOUT = 15.0  # the listener answers or closes within this (its deadlines are far shorter)


@pytest.fixture
def fuzz_listener(modality, tmp_path) -> Iterator[tuple[int, object, object]]:
    port, log = free_port(), tmp_path / "listener.log"
    storage = tmp_path / "storage"
    limits = {"ISTHMUS_DIMSE_ARTIM_TIMEOUT": "3", "ISTHMUS_DIMSE_PDU_TIMEOUT": "3", "ISTHMUS_STORAGE_DIR": str(storage)}
    with listener_process(port, log, **limits) as listener:
        assert echoscu(port, "CT1").returncode == 0
        before = (proc_status(listener.pid, "VmRSS"), proc_status(listener.pid, "Threads"))
        yield port, listener, log
        assert_unharmed(port, listener, log, storage, before)


def assert_unharmed(port, listener, log, storage, before: tuple[int, int]) -> None:
    assert listener.poll() is None, "the listener died"
    assert echoscu(port, "CT1").returncode == 0, "a registered modality is still served"
    open_events = AssociationEvent.objects.filter(accepted=True, ended_at=None)
    deadline = time.monotonic() + 15  # the listener records an association's end after its peer has gone
    while (
        proc_status(listener.pid, "Threads") > before[1] + 2 or open_events.exists()
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc_status(listener.pid, "Threads") <= before[1] + 2, "every fuzzed connection's threads ended"
    grown_mib = (proc_status(listener.pid, "VmRSS") - before[0]) / 1024
    assert grown_mib < 40, f"the listener grew by {grown_mib:.0f} MiB"
    assert not open_events.exists(), "every accepted association's event was closed"
    assert files_under(storage / ".tmp") == []
    output = log.read_text()
    problems = [line for line in output.splitlines() if "Traceback" in line or "Exception in thread" in line]
    assert not problems, output[output.find(problems[0]) - 300 :][:3000] if problems else ""


def answers(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Half-close, then every PDU until the listener closes: it must close, and send nothing malformed."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.settimeout(ANSWER_TIMEOUT)
    try:
        return read_until_closed(sock)
    finally:
        sock.close()


# --- Arbitrary bytes where a PDU is expected, before any association ---


def _mutated(draw, data: bytes) -> bytes:
    """`data` with a few bytes replaced, truncated or extended."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data) + draw(st.binary(max_size=16))


@st.composite
def request_bytes(draw) -> bytes:
    """Whatever arrives first on a new connection: noise, a header of any type and length, or a spoiled request."""
    kind = draw(st.sampled_from(["noise", "header", "request", "titles"]))
    if kind == "noise":
        return draw(st.binary(max_size=2048))
    if kind == "header":
        length = draw(st.integers(0, 2**32 - 1) | st.integers(0, 512))
        return struct.pack(">BBL", draw(st.integers(0, 255)), 0, length) + draw(st.binary(max_size=512))
    request = associate_rq(abstract_syntaxes=ABSTRACT_SYNTAXES)
    if kind == "titles":  # arbitrary called and calling AE title bytes (PS3.8 9.3.2: at offsets 10 and 26)
        titles = draw(st.binary(min_size=32, max_size=32))
        return request[:10] + titles + request[42:]
    return _mutated(draw, request)


def _with_context_id(request: bytes, context_id: int) -> bytes:
    """The request with its first presentation context's ID changed (PS3.8 9.3.2.2: item type 0x20, ID at +4)."""
    at = request.index(b"\x20\x00", 74)
    return request[: at + 4] + bytes([context_id]) + request[at + 5 :]


@fuzz
@given(request=request_bytes())
@example(request=_with_context_id(associate_rq(), 2))  # even: pynetdicom's state machine raised in its thread
def test_arbitrary_bytes_before_an_association(fuzz_listener, request):
    port, _listener, _log = fuzz_listener
    sock = connect(port)
    try:
        sock.sendall(request)
    except OSError:  # the listener refused it before we were done
        pass
    for pdu_type, body in answers(sock):
        assert pdu_type in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT), (pdu_type, body[:64])


# --- Arbitrary DIMSE messages and fragments inside an established association ---

MESSAGES = {
    "echo": (dimse_primitives.C_ECHO, dimse_messages.C_ECHO_RQ, Verification),
    "store": (dimse_primitives.C_STORE, dimse_messages.C_STORE_RQ, CTImageStorage),
    "worklist": (dimse_primitives.C_FIND, dimse_messages.C_FIND_RQ, ModalityWorklistInformationFind),
    "query": (dimse_primitives.C_FIND, dimse_messages.C_FIND_RQ, StudyRootQueryRetrieveInformationModelFind),
    "mpps": (dimse_primitives.N_CREATE, dimse_messages.N_CREATE_RQ, ModalityPerformedProcedureStep),
    "commitment": (dimse_primitives.N_ACTION, dimse_messages.N_ACTION_RQ, StorageCommitmentPushModel),
}


def _query() -> bytes:
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientName, query.StudyInstanceUID = "STUDY", "DOE*", ""
    return encode(query, True, True)


def _request(kind: str, message_id: int, data_set: bytes):
    """A DIMSE request primitive of `kind` carrying `data_set` as its data set (when it has one)."""
    primitive_class, _message_class, sop_class = MESSAGES[kind]
    primitive = primitive_class()
    primitive.MessageID = message_id
    if kind == "commitment":
        primitive.RequestedSOPClassUID, primitive.RequestedSOPInstanceUID = sop_class, "1.2.840.10008.1.20.1.1"
        primitive.ActionTypeID, primitive.ActionInformation = 1, io.BytesIO(data_set)
        return primitive
    primitive.AffectedSOPClassUID = sop_class
    if kind in ("store", "mpps"):
        primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.9.7433.99"
    if kind in ("store", "worklist", "query"):
        primitive.Priority = 2
    if kind == "store":
        primitive.DataSet = io.BytesIO(data_set)
    elif kind in ("worklist", "query"):
        primitive.Identifier = io.BytesIO(data_set)
    elif kind == "mpps":
        primitive.AttributeList = io.BytesIO(data_set)
    return primitive


def _p_data_pdus(kind: str, context_id: int, message_id: int, data_set: bytes, max_pdu: int) -> list[bytes]:
    message = MESSAGES[kind][1]()
    message.primitive_to_message(_request(kind, message_id, data_set))
    pdus = []
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


@st.composite
def dimse_traffic(draw) -> list[bytes]:
    """A few P-DATA-TF PDUs: real requests (some spoiled), or presentation data values of any header and content."""
    pdus = []
    for message_id in range(1, draw(st.integers(1, 3)) + 1):
        shape = draw(st.sampled_from(["request", "values", "other"]))
        if shape == "other":  # any other PDU type mid-association: an abort with any reason, a second request...
            pdus.append(struct.pack(">BBL", draw(st.integers(1, 7)), 0, 4) + draw(st.binary(min_size=4, max_size=4)))
        elif shape == "request":
            kind = draw(st.sampled_from(sorted(MESSAGES)))
            context_id = draw(st.sampled_from(CONTEXT_IDS) | st.integers(0, 255))
            data_set = draw(st.just(_query()) | st.binary(max_size=600))
            real = _p_data_pdus(kind, context_id, message_id, data_set, draw(st.sampled_from([32, 128, 16384])))
            pdus += [_mutated(draw, pdu) if draw(st.integers(0, 3)) == 0 else pdu for pdu in real]
        else:
            values = draw(
                st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300)), max_size=3)
            )
            items = b"".join(struct.pack(">LBB", len(data) + 2, cid, header) + data for cid, header, data in values)
            pdus.append(struct.pack(">BBL", P_DATA_TF_TYPE, 0, len(items)) + items)
    return pdus


@fuzz
@given(traffic=dimse_traffic())
@example(traffic=_p_data_pdus("store", 2, 1, b"\x08\x00\x16\x00", 16384))  # unaccepted context: its file stayed
@example(traffic=[bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 0xFF])])  # an abort with no such reason
def test_arbitrary_dimse_messages_in_an_association(fuzz_listener, traffic):
    port, _listener, _log = fuzz_listener
    sock = established(port, abstract_syntaxes=ABSTRACT_SYNTAXES)
    try:
        for pdu in [*traffic, RELEASE_RQ]:
            sock.sendall(pdu)
    except OSError:  # aborted and closed before we were done
        pass
    for pdu_type, body in answers(sock):
        assert pdu_type in (P_DATA_TF_TYPE, A_RELEASE_RP, A_ABORT), (pdu_type, body[:64])
