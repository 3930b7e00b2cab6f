"""MLLP (HL7 v2 Minimal Lower Layer Protocol): framing and a threaded TCP server.

A frame is <VT> message <FS><CR> (HL7 v2.5.1 Appendix C, MLLP release 1).
The server answers every frame with the bytes its handler returns, one
connection per thread, and stops gracefully: no new connections, in-flight
messages finish and are acknowledged, then the sockets close. A hostile or
broken peer is bounded: connections are capped in total and per source
address, a frame must complete within `message_timeout` of its first byte and
a connection without a complete message for `idle_timeout` is closed; neither
deadline moves for stray bytes, so one byte now and then holds nothing open.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

from django.db import connection

from gateway.logthrottle import Throttled
from worklist.hl7 import metrics

log = logging.getLogger("isthmus.hl7")
# A flood of refused connections writes one line per cap and source per 10 s; the metric counts them all.
throttled_log = Throttled(log)

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
    read; bytes outside a frame (line noise, a stray CR) are dropped. Holds at
    most one partial frame (`max_bytes` + 2) between reads, and searches each
    byte for the end marker once, however small the reads.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._scanned = 1  # where the search for the end marker resumes in a partial frame
        self.discarded = 0

    @property
    def pending(self) -> bool:
        """True while part of a frame has arrived and its end has not."""
        return bool(self._buffer)  # between reads the buffer is empty or starts with START

    @property
    def buffered(self) -> int:
        return len(self._buffer)

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
                self._scanned = 1
            end = self._buffer.find(END, self._scanned)
            if end < 0:
                content = len(self._buffer) - 1 - (self._buffer[-1] == END[0])  # a last FS may begin the END
                if content > self.max_bytes:
                    self._buffer.clear()
                    raise FrameTooLarge(f"no end of frame within {self.max_bytes} bytes")
                self._scanned = max(1, len(self._buffer) - len(END) + 1)
                return
            message = bytes(self._buffer[1:end])
            del self._buffer[: end + len(END)]
            self._scanned = 1
            if len(message) > self.max_bytes:
                raise FrameTooLarge(f"frame of {len(message)} bytes")
            yield message


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: an ACK is one small write that must leave at once."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


MessageHandler = Callable[[bytes, str], bytes]


class MllpServer:
    """Accepts MLLP connections on a port and answers each message with handler(message, "ip:port")."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: MessageHandler,
        *,
        idle_timeout: float = 300.0,
        message_timeout: float = 60.0,
        max_connections: int = 50,
        max_connections_per_source: int = 10,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.message_timeout = message_timeout
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        self.max_message_bytes = max_message_bytes
        self._socket = socket.create_server((host, port), reuse_port=False, backlog=64)
        self._socket.settimeout(POLL_SECONDS)
        self.host, self.port = host, self._socket.getsockname()[1]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._per_source: Counter[str] = Counter()
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
            thread = self._admit(client, address[0], f"{address[0]}:{address[1]}")
            if thread is not None:
                thread.start()

    def _admit(self, client: socket.socket, source: str, peer: str) -> threading.Thread | None:
        """A thread for the connection, or None when the total or the source's cap is reached (then closed)."""
        with self._lock:
            if len(self._connections) >= self.max_connections:
                refusal, limit = "refused-busy", f"{self.max_connections} connections open"
            elif self._per_source[source] >= self.max_connections_per_source:
                refusal, limit = "refused-per-source", f"{self.max_connections_per_source} open from {source}"
            else:
                thread = threading.Thread(target=self._serve, args=(client, source, peer), name="hl7-conn",
                                          daemon=True)  # fmt: skip
                self._connections[thread] = client
                self._per_source[source] += 1
                return thread
        throttled_log.warning((refusal, source), "HL7 connection from %s refused: %s", source, limit)
        metrics.CONNECTIONS.labels(refusal).inc()
        client.close()
        return None

    def _serve(self, client: socket.socket, source: str, peer: str) -> None:
        reader = FrameReader(self.max_message_bytes)
        outcome = "closed"
        log.info("HL7 connection from %s", peer)
        try:
            set_nodelay(client)
            client.settimeout(self.message_timeout)  # bounds sendall to a peer that never reads its ACKs
            outcome = self._converse(client, reader, peer)
        except FrameTooLarge as exc:
            outcome = "closed-too-large"
            log.warning("HL7 connection from %s closed: %s", peer, exc)
        except (OSError, ValueError) as exc:  # reset by peer, or closed by stop()
            if not self._stopping.is_set():
                log.info("HL7 connection from %s ended: %s", peer, exc)
        finally:
            if reader.discarded:
                log.warning("HL7 connection from %s: %d bytes outside MLLP frames dropped", peer, reader.discarded)
            with self._lock:
                self._connections.pop(threading.current_thread(), None)
                self._per_source[source] -= 1
                if self._per_source[source] <= 0:
                    del self._per_source[source]
            client.close()
            connection.close()  # this thread's Django database connection
            metrics.CONNECTIONS.labels(outcome).inc()
            log.info("HL7 connection from %s closed", peer)

    def _converse(self, client: socket.socket, reader: FrameReader, peer: str) -> str:
        """Answer frames until the peer leaves, a deadline passes or we stop; returns how it ended.

        Deadlines are absolute: idle counts from the last complete message, a
        frame from its first byte; bytes that complete nothing move neither.
        """
        idle_deadline = time.monotonic() + self.idle_timeout
        frame_deadline: float | None = None
        while not (self._stopping.is_set() and not reader.pending):
            now = time.monotonic()
            if frame_deadline is not None and now > frame_deadline:
                log.warning("HL7 connection from %s closed: no complete message within %g s of its first byte",
                            peer, self.message_timeout)  # fmt: skip
                return "closed-message-deadline"
            if frame_deadline is None and now > idle_deadline:
                log.info("HL7 connection from %s idle for %g s: closing", peer, self.idle_timeout)
                return "closed-idle"
            ready, _, _ = select.select([client], [], [], POLL_SECONDS)
            if not ready:
                continue
            chunk = client.recv(RECV_BYTES)
            if not chunk:
                return "closed"
            answered = False
            for message in reader.feed(chunk):
                client.sendall(frame(self.handler(message, peer)))
                answered = True
            now = time.monotonic()
            if answered:
                idle_deadline = now + self.idle_timeout
            if not reader.pending:
                frame_deadline = None
            elif answered or frame_deadline is None:  # a new frame began in this chunk
                frame_deadline = now + self.message_timeout
        return "closed-shutdown"

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


def send(host: str, port: int, messages: list[bytes], timeout: float = 10.0, source: str = "") -> list[bytes]:
    """Send messages over one MLLP connection, each after the previous ACK; returns the ACKs.

    `source` binds the local address (a test playing another host on 127.0.0.0/8)."""
    acks: list[bytes] = []
    bind = (source, 0) if source else None
    with socket.create_connection((host, port), timeout=timeout, source_address=bind) as client:
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
