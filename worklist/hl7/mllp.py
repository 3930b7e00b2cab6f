"""MLLP (HL7 v2 Minimal Lower Layer Protocol): framing and a threaded TCP server.

A frame is <VT> message <FS><CR> (HL7 v2.5.1 Appendix C, MLLP release 1).
The server answers every frame with the bytes its handler returns, one
connection per thread, and stops gracefully: no new connections, in-flight
messages finish and are acknowledged, then the sockets close.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

from django.db import connection

log = logging.getLogger("isthmus.hl7")

START = b"\x0b"  # <VT>
END = b"\x1c\x0d"  # <FS><CR>
# Larger than any order or ADT message; a sender past it is talking something else.
MAX_MESSAGE_BYTES = 1024 * 1024
RECV_BYTES = 65536
POLL_SECONDS = 0.2


class FrameTooLarge(ValueError):
    """A frame grew past the size limit before its end marker arrived."""


def frame(message: bytes) -> bytes:
    """Wrap one message for the wire."""
    return START + message + END


class FrameReader:
    """Collects bytes from any number of reads and yields complete messages.

    Robust to a message split across reads and to several messages in one
    read; bytes outside a frame (line noise, a stray CR) are dropped.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self.discarded = 0

    @property
    def pending(self) -> bool:
        """True while part of a frame has arrived and its end has not."""
        return START[0] in self._buffer

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buffer += data
        while True:
            start = self._buffer.find(START)
            if start < 0:
                self.discarded += len(self._buffer)
                self._buffer.clear()
                return
            if start:
                self.discarded += start
                del self._buffer[:start]
            end = self._buffer.find(END, 1)
            if end < 0:
                if len(self._buffer) - 1 > self.max_bytes:
                    self._buffer.clear()
                    raise FrameTooLarge(f"no end of frame within {self.max_bytes} bytes")
                return
            message = bytes(self._buffer[1:end])
            del self._buffer[: end + len(END)]
            if len(message) > self.max_bytes:
                raise FrameTooLarge(f"frame of {len(message)} bytes")
            yield message


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: an ACK is one small write that must leave at once."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


MessageHandler = Callable[[bytes, str], bytes]


class MllpServer:
    """Accepts MLLP connections on a port and answers each message with handler(message, peer)."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: MessageHandler,
        *,
        idle_timeout: float = 300.0,
        max_connections: int = 50,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_message_bytes = max_message_bytes
        self._socket = socket.create_server((host, port), reuse_port=False, backlog=64)
        self._socket.settimeout(POLL_SECONDS)
        self.host, self.port = host, self._socket.getsockname()[1]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._acceptor = threading.Thread(target=self._accept_forever, name="hl7-accept", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    def _accept_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                client, address = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(POLL_SECONDS)  # EMFILE and friends: back off, keep serving
                continue
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    thread = threading.Thread(
                        target=self._serve, args=(client, f"{address[0]}:{address[1]}"), name="hl7-conn", daemon=True
                    )
                    self._connections[thread] = client
            if full:
                log.warning("HL7 connection from %s refused: %d connections open", address[0], self.max_connections)
                client.close()
                continue
            thread.start()

    def _serve(self, client: socket.socket, peer: str) -> None:
        me = threading.current_thread()
        reader = FrameReader(self.max_message_bytes)
        last_activity = time.monotonic()
        log.info("HL7 connection from %s", peer)
        try:
            set_nodelay(client)
            while True:
                if self._stopping.is_set() and not reader.pending:
                    break
                ready, _, _ = select.select([client], [], [], POLL_SECONDS)
                if not ready:
                    if time.monotonic() - last_activity > self.idle_timeout:
                        log.info("HL7 connection from %s idle for %g s: closing", peer, self.idle_timeout)
                        break
                    continue
                chunk = client.recv(RECV_BYTES)
                if not chunk:
                    break
                last_activity = time.monotonic()
                for message in reader.feed(chunk):
                    client.sendall(frame(self.handler(message, peer)))
                last_activity = time.monotonic()
        except FrameTooLarge as exc:
            log.warning("HL7 connection from %s closed: %s", peer, exc)
        except (OSError, ValueError) as exc:  # reset by peer, or closed by stop()
            if not self._stopping.is_set():
                log.info("HL7 connection from %s ended: %s", peer, exc)
        finally:
            if reader.discarded:
                log.warning("HL7 connection from %s: %d bytes outside MLLP frames dropped", peer, reader.discarded)
            with self._lock:
                self._connections.pop(me, None)
            client.close()
            connection.close()  # this thread's Django database connection
            log.info("HL7 connection from %s closed", peer)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def stop(self, grace: float) -> None:
        """Stop accepting; let messages being received or applied finish for up to `grace` s; close the rest."""
        self._stopping.set()
        self._socket.close()
        self._acceptor.join(timeout=POLL_SECONDS * 5)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                threads = list(self._connections)
            if not threads:
                break
            time.sleep(0.05)
        with self._lock:
            leftovers = dict(self._connections)
        for thread, client in leftovers.items():
            log.warning("HL7 connection closed at shutdown with a message unfinished")
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(timeout=2)


def split_messages(data: bytes) -> list[bytes]:
    """A file of one or more messages (any line ends, blank lines between) -> messages with CR segment ends."""
    text = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    messages: list[list[bytes]] = []
    for segment in text.split(b"\r"):
        segment = segment.strip(b" \t\x0b\x1c")
        if not segment:
            continue
        if segment.startswith(b"MSH") or not messages:
            messages.append([])
        messages[-1].append(segment)
    return [b"\r".join(segments) + b"\r" for segments in messages]


def send(host: str, port: int, messages: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """Send messages over one MLLP connection, each after the previous ACK; returns the ACKs."""
    acks: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout) as client:
        set_nodelay(client)
        reader = FrameReader()
        for message in messages:
            client.sendall(frame(message))
            acks.append(_read_one(client, reader))
    return acks


def _read_one(client: socket.socket, reader: FrameReader) -> bytes:
    while True:
        chunk = client.recv(RECV_BYTES)
        if not chunk:
            raise ConnectionError("connection closed before the acknowledgement")
        for message in reader.feed(chunk):
            return message
