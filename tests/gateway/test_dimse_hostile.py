"""The DIMSE port against hostile peers, over real loopback sockets to `manage.py dimse` in its own process.

Oversized PDUs are refused before they are read, floods of silent and slow
connections are capped and cut, and a registered modality (dcmtk, from
127.0.0.1) is served throughout. Attackers bind other loopback addresses
(127.0.0.2 ...) so that the per-address cap applies to them and not to it.
"""

from __future__ import annotations

import io
import select
import socket
import threading
import time
from pathlib import Path

from pynetdicom.dimse_messages import C_FIND_RQ
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import ModalityWorklistInformationFind

from gateway.models import AssociationEvent
from tests.conftest import echoscu, free_port
from tests.gateway.dimse_peer import (
    A_ABORT,
    P_DATA_TF,
    connect,
    established,
    listener_process,
    p_data,
    pdu_header,
    proc_status,
    read_until_closed,
    stream,
)
from tests.gateway.instances import make_instance, storescu

MIB = 1024 * 1024
ATTACKER_ADDRESSES = [f"127.0.0.{n}" for n in range(2, 12)]  # ten addresses, none of them the modality's


def wait_for_line(log: Path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{log.read_text()}"
        time.sleep(0.05)


def test_oversized_pdus_are_refused_before_they_are_read(modality, tmp_path):
    port, log = free_port(), tmp_path / "listener.log"
    with listener_process(port, log) as listener:
        assert echoscu(port, "CT1").returncode == 0  # the first association's threads and connections exist
        rss_before = proc_status(listener.pid, "VmRSS")

        request = connect(port)  # no association yet: a request header claiming 1 GiB
        request.sendall(pdu_header(0x01, 1 << 30))
        streamed = stream(request, 300 * MIB)
        assert read_until_closed(request) == [], "closed without an answer: there is no association to abort"

        association = established(port)  # inside an association: a P-DATA-TF claiming 200 MiB
        association.sendall(pdu_header(P_DATA_TF, 200 * MIB))
        streamed += stream(association, 300 * MIB)
        answers = read_until_closed(association)
        assert [pdu_type for pdu_type, _ in answers] == [A_ABORT]
        assert answers[0][1][2:] == bytes([0x02, 0x06])  # from the service provider: invalid PDU parameter value

        grown_mib = (proc_status(listener.pid, "VmRSS") - rss_before) / 1024
        assert grown_mib < 20, f"the listener grew by {grown_mib:.1f} MiB"
        assert streamed < 600 * MIB, "the listener closed the connections instead of reading on"
        assert echoscu(port, "CT1").returncode == 0

    lines = log.read_text().splitlines()
    refused_rq = [line for line in lines if "1073741824 bytes for its A-ASSOCIATE-RQ" in line]
    refused_data = [line for line in lines if "209715200 bytes for its P-DATA-TF" in line]
    assert len(refused_rq) == 1 and "127.0.0.1:" in refused_rq[0] and "connection closed" in refused_rq[0]
    assert len(refused_data) == 1 and "127.0.0.1:" in refused_data[0] and "association aborted" in refused_data[0]
    aborted = AssociationEvent.objects.filter(accepted=True).order_by("at")[1]
    assert aborted.outcome == "aborted"


def test_slow_sender_inside_an_association_is_aborted_at_the_pdu_deadline(modality, tmp_path):
    port, log = free_port(), tmp_path / "listener.log"
    with listener_process(port, log, ISTHMUS_DIMSE_PDU_TIMEOUT="1.5", ISTHMUS_DIMSE_IDLE_TIMEOUT="60") as listener:
        association = established(port)
        association.sendall(pdu_header(P_DATA_TF, 100))
        started = time.monotonic()
        answers = trickle(association, seconds=10)
        assert [pdu_type for pdu_type, _ in answers] == [A_ABORT]
        assert time.monotonic() - started < 5, "one byte a second extended the deadline"
        assert proc_status(listener.pid, "Threads") <= 6 + 2  # its two threads gone; the listener's own remain
    assert "did not complete a PDU in time (ISTHMUS_DIMSE_PDU_TIMEOUT)" in log.read_text()


def test_messages_held_in_memory_are_capped(modality, tmp_path):
    """A command set that never ends, and a query data set past ISTHMUS_DIMSE_MAX_MESSAGE_MB: both aborted."""
    port, log = free_port(), tmp_path / "listener.log"
    with listener_process(port, log, ISTHMUS_DIMSE_MAX_MESSAGE_MB="1") as listener:
        assert echoscu(port, "CT1").returncode == 0
        rss_before = proc_status(listener.pid, "VmRSS")
        fragment = bytes(60_000)

        endless_command = established(port)  # command fragments, never the last: 24 MB unless cut
        sent = [stream_pdus(endless_command, p_data((1, 0x01, fragment)), 400)]
        assert [pdu_type for pdu_type, _ in read_until_closed(endless_command)] == [A_ABORT]

        query = established(port, abstract_syntaxes=(ModalityWorklistInformationFind,))
        query.sendall(p_data((1, 0x03, c_find_command(ModalityWorklistInformationFind))))
        sent.append(stream_pdus(query, p_data((1, 0x00, fragment)), 400))  # identifier fragments, never the last
        assert [pdu_type for pdu_type, _ in read_until_closed(query)] == [A_ABORT]

        assert max(sent) < 12 * MIB, f"aborted at the cap, not at the end: {sent}"
        assert (proc_status(listener.pid, "VmRSS") - rss_before) / 1024 < 20
    output = log.read_text()
    assert "(MessageTooLarge: command set past 1048576 bytes)" in output
    assert "(MessageTooLarge: data set past 1048576 bytes (ISTHMUS_DIMSE_MAX_MESSAGE_MB))" in output


def c_find_command(sop_class: str) -> bytes:
    """The encoded command set of a C-FIND-RQ that announces a data set (PS3.7 9.3.2.1)."""
    request = C_FIND()
    request.MessageID, request.AffectedSOPClassUID, request.Priority = 1, sop_class, 2
    request.Identifier = io.BytesIO(b"x")
    message = C_FIND_RQ()
    message.primitive_to_message(request)
    return encode(message.command_set, True, True)


def stream_pdus(sock: socket.socket, pdu: bytes, times: int) -> int:
    """Send `pdu` `times` times, stopping when the listener closes; the bytes sent."""
    sent = 0
    try:
        for _ in range(times):
            sock.sendall(pdu)
            sent += len(pdu)
    except OSError:
        pass
    return sent


def trickle(sock: socket.socket, seconds: float) -> list[tuple[int, bytes]]:
    """Send a byte a second until the listener answers or closes; what it sent back."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 1.0)
        if readable:
            return read_until_closed(sock)
        try:
            sock.send(b"\x00")
        except OSError:
            return []
    raise AssertionError(f"still open after {seconds} s of one byte a second")


class Flood:
    """Connections from the attacker addresses, 30 from each in turn, and when the listener closed each."""

    def __init__(self, port: int, per_address: int = 30) -> None:
        self.sockets = [connect(port, address) for address in ATTACKER_ADDRESSES for _ in range(per_address)]
        self.opened = time.monotonic()
        self.closed_at: dict[socket.socket, float] = {}

    def poll(self) -> None:
        """Note the connections the listener has closed (end of stream or reset) since the last look."""
        open_now = [s for s in self.sockets if s not in self.closed_at]
        readable, _, _ = select.select(open_now, [], [], 0) if open_now else ([], [], [])
        for sock in readable:
            try:
                if sock.recv(4096, socket.MSG_DONTWAIT) == b"":
                    self.closed_at[sock] = time.monotonic()
            except BlockingIOError:
                pass
            except OSError:
                self.closed_at[sock] = time.monotonic()

    def settle(self, seconds: float = 1.5) -> tuple[list, list]:
        """(refused, held): the connections closed at once, and those the listener keeps."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            time.sleep(0.05)
        refused = [s for s in self.sockets if s in self.closed_at]
        return refused, [s for s in self.sockets if s not in self.closed_at]

    def wait_all_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.closed_at) < len(self.sockets) and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.05)
        assert len(self.closed_at) == len(self.sockets), f"{len(self.sockets) - len(self.closed_at)} still open"

    def send_a_byte_a_second(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for sock in self.sockets:
                if sock not in self.closed_at:
                    try:
                        sock.send(b"\x01")
                    except OSError:
                        pass
            stop.wait(1.0)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def assert_modality_served(port: int, ct: Path) -> None:
    echo = echoscu(port, "CT1")
    assert echo.returncode == 0, echo.stdout + echo.stderr
    store = storescu(port, [ct])
    assert store.returncode == 0 and "Received Store Response (Success)" in store.stderr, store.stderr


def test_silent_and_slow_floods_are_capped_and_cut_while_a_modality_is_served(modality, tmp_path):
    port, log = free_port(), tmp_path / "listener.log"
    ct = make_instance("CT_small.dcm", tmp_path / "ct")
    limits = {
        "ISTHMUS_DIMSE_MAX_CONNECTIONS": "200",  # 150 for unknown addresses, 50 kept for the modality's host
        "ISTHMUS_DIMSE_MAX_CONNECTIONS_PER_HOST": "20",
        "ISTHMUS_DIMSE_ARTIM_TIMEOUT": "8",
        "ISTHMUS_DIMSE_PDU_TIMEOUT": "2",
        "ISTHMUS_STORAGE_DIR": str(tmp_path / "storage"),
    }
    with listener_process(port, log, **limits) as listener:
        wait_for_line(log, "DIMSE connections capped at 200 per process (50 kept for 1 address(es)")
        threads_before = proc_status(listener.pid, "Threads")

        silent = Flood(port)  # 300 connections that never send anything
        refused, held = silent.settle()
        assert (len(refused), len(held)) == (150, 150), "per address 20, then 150 in all for unknown addresses"
        assert_modality_served(port, ct)
        silent.poll()
        assert not any(s in silent.closed_at for s in held), "the silent connections were open while it was served"
        silent.wait_all_closed(timeout=8 + 6)
        assert max(silent.closed_at[s] for s in held) - silent.opened > 8 - 1, "held until ARTIM, not before"
        silent.close()

        slow = Flood(port)  # 300 connections that send a byte a second
        stop = threading.Event()
        sender = threading.Thread(target=slow.send_a_byte_a_second, args=(stop,))
        sender.start()
        try:
            refused, held = slow.settle(seconds=0.5)
            assert len(refused) == 150
            assert_modality_served(port, ct)
            slow.wait_all_closed(timeout=2 + 6)
        finally:
            stop.set()
            sender.join()
            slow.close()
        assert max(slow.closed_at[s] for s in held) - slow.opened < 8, "cut by the PDU deadline, before ARTIM"

        deadline = time.monotonic() + 10
        while proc_status(listener.pid, "Threads") > threads_before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc_status(listener.pid, "Threads") <= threads_before + 2, "every attacker's threads are gone"

    output = log.read_text()
    refusals = [line for line in output.splitlines() if "DIMSE connection from 127.0.0." in line]
    assert 2 <= len(refusals) <= 4, "refusals are logged once per flood and cap, not once per connection"
    assert "(ISTHMUS_DIMSE_MAX_CONNECTIONS_PER_HOST)" in output and "(ISTHMUS_DIMSE_MAX_CONNECTIONS)" in output
    assert "sent no association request in time (ISTHMUS_DIMSE_ARTIM_TIMEOUT)" in output
    assert "did not complete a PDU in time (ISTHMUS_DIMSE_PDU_TIMEOUT)" in output
    assert "Traceback" not in output
