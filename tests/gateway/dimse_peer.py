"""A raw DICOM peer for hostile tests: PDUs built byte by byte on a plain socket, and a listener in its own process."""

from __future__ import annotations

import contextlib
import shlex
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from tests.conftest import ROOT, peer_env, stop_process, wait_for_port

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 2, 3, 4, 5, 6, 7
RELEASE_RQ = bytes([A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def associate_rq(
    calling: str = "CT1", called: str = "ISTHMUS", abstract_syntaxes: tuple[str, ...] = (Verification,)
) -> bytes:
    """An A-ASSOCIATE-RQ proposing each abstract syntax (context IDs 1, 3, 5 ..., implicit VR little endian), max PDU 16 KB."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [max_length, implementation]
    contexts = []
    for number, abstract_syntax in enumerate(abstract_syntaxes):
        context = build_context(abstract_syntax, ["1.2.840.10008.1.2"])
        context.context_id = 2 * number + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def p_data(*values: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF of presentation data values (context ID, message control header, fragment)."""
    items = b"".join(
        struct.pack(">LBB", len(data) + 2, context_id, control) + data for context_id, control, data in values
    )
    return pdu_header(P_DATA_TF, len(items)) + items


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None at end of stream (a reset counts as an end)."""
    try:
        header = _read_exactly(sock, 6)
        if header is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = _read_exactly(sock, length)
    except (ConnectionResetError, BrokenPipeError):
        return None
    return (pdu_type, body) if body is not None else None


def read_until_closed(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every PDU the listener sends until it closes; a listener that neither answers nor closes raises TimeoutError."""
    pdus = []
    while (pdu := read_pdu(sock)) is not None:
        pdus.append(pdu)
    return pdus


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def established(
    port: int, calling: str = "CT1", source: str = "127.0.0.1", abstract_syntaxes: tuple[str, ...] = (Verification,)
) -> socket.socket:
    """A raw socket on which the listener accepted our association (it answered A-ASSOCIATE-AC)."""
    sock = connect(port, source)
    sock.sendall(associate_rq(calling, abstract_syntaxes=abstract_syntaxes))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == A_ASSOCIATE_AC, f"association not accepted: {answer}"
    return sock


def stream(sock: socket.socket, total: int, chunk: int = 1 << 20) -> int:
    """Send up to `total` zero bytes, stopping when the listener closes; returns how many were sent."""
    block, sent = bytes(chunk), 0
    try:
        while sent < total:
            sent += sock.send(block[: min(chunk, total - sent)])
    except OSError:  # reset or broken pipe: the listener closed the connection
        pass
    return sent


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def listener_process(
    port: int, log: Path, tmpfs: tuple[Path, int] | None = None, **env: str
) -> Iterator[subprocess.Popen]:
    """`manage.py dimse` as its own process (one, not one per core) on `port`, its output in `log`.

    With `tmpfs` (a folder, megabytes) it runs in its own mount namespace with a
    tmpfs of that size on the folder, seen by the test as /proc/PID/root/FOLDER.
    """
    command = [sys.executable, "manage.py", "dimse", "--host", "127.0.0.1", "--port", str(port), "--processes", "1"]
    if tmpfs is not None:
        folder, megabytes = tmpfs
        folder.mkdir(parents=True, exist_ok=True)
        mount = f"mount -t tmpfs -o size={megabytes}m isthmus-test {shlex.quote(str(folder))}"
        command = ["unshare", "--mount", "--map-root-user", "sh", "-c", f"{mount} && exec {shlex.join(command)}"]
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=peer_env(**env),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process=process)
        _wait_ready(log)
        yield process
    finally:
        stop_process(process)


def _wait_ready(log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)


def can_mount_tmpfs() -> bool:
    """Whether this machine lets a process mount a tmpfs in its own namespace (user namespaces enabled)."""
    probe = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", "mount -t tmpfs -o size=1m probe /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and path.name != ".lock"] if root.exists() else []
