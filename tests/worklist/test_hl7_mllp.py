"""MLLP framing and the threaded server, on real loopback sockets (no database involved)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from worklist.hl7.mllp import END, START, FrameReader, FrameTooLarge, MllpServer, frame, send, split_messages


def test_reader_joins_a_message_split_byte_by_byte():
    reader = FrameReader()
    received = []
    for byte in frame(b"MSH|^~\\&|A\rPID|1\r"):
        received += list(reader.feed(bytes([byte])))
    assert received == [b"MSH|^~\\&|A\rPID|1\r"]
    assert not reader.pending


def test_reader_splits_several_messages_in_one_read_and_keeps_the_partial_one():
    reader = FrameReader()
    data = frame(b"one") + frame(b"two") + START + b"thr"
    assert list(reader.feed(data)) == [b"one", b"two"]
    assert reader.pending
    assert list(reader.feed(b"ee" + END)) == [b"three"]


def test_reader_drops_bytes_outside_frames():
    reader = FrameReader()
    assert list(reader.feed(b"noise\r\n" + frame(b"one") + b"\r" + frame(b"two"))) == [b"one", b"two"]
    assert reader.discarded == len(b"noise\r\n") + 1


def test_reader_refuses_a_frame_past_the_limit():
    reader = FrameReader(max_bytes=100)
    with pytest.raises(FrameTooLarge):
        list(reader.feed(START + b"x" * 101))
    with pytest.raises(FrameTooLarge):
        list(FrameReader(max_bytes=10).feed(frame(b"y" * 11)))


def test_split_messages_turns_lf_lines_into_cr_segments():
    data = b"MSH|^~\\&|A|B\nPID|1\n\nMSH|^~\\&|C|D\r\nPV1|1\r\n"
    assert split_messages(data) == [b"MSH|^~\\&|A|B\rPID|1\r", b"MSH|^~\\&|C|D\rPV1|1\r"]


@pytest.fixture
def echo_server():
    """An MLLP server whose handler answers ACK:<message>, recording the peers it saw."""
    seen: list[str] = []

    def handler(message: bytes, peer: str) -> bytes:
        seen.append(peer)
        if message == b"slow":
            time.sleep(0.6)
        return b"ACK:" + message

    server = MllpServer("127.0.0.1", 0, handler, idle_timeout=0.5, max_connections=2)
    server.start()
    server.seen = seen
    yield server
    server.stop(grace=2)


def _read_frames(client: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    reader, frames = FrameReader(), []
    client.settimeout(timeout)
    while len(frames) < count:
        chunk = client.recv(4096)
        if not chunk:
            break
        frames += list(reader.feed(chunk))
    return frames


def test_server_answers_each_frame_whether_split_or_batched(echo_server):
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=5) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        whole = frame(b"MSH|split")
        for cut in range(0, len(whole), 3):
            client.sendall(whole[cut : cut + 3])
            time.sleep(0.01)
        assert _read_frames(client, 1) == [b"ACK:MSH|split"]
        client.sendall(frame(b"a") + frame(b"b"))
        assert _read_frames(client, 2) == [b"ACK:a", b"ACK:b"]
    assert echo_server.seen[0].startswith("127.0.0.1:")


def test_send_helper_waits_for_each_ack(echo_server):
    assert send("127.0.0.1", echo_server.port, [b"one", b"two"]) == [b"ACK:one", b"ACK:two"]


def test_server_closes_an_idle_connection(echo_server):
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=5) as client:
        started = time.monotonic()
        assert client.recv(10) == b""  # closed by the server
        assert 0.4 < time.monotonic() - started < 3


def test_server_closes_a_connection_that_sends_an_oversized_frame():
    server = MllpServer("127.0.0.1", 0, lambda message, peer: b"ACK", max_message_bytes=1000)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
            client.sendall(START + b"x" * 5000)
            assert client.recv(10) == b""
    finally:
        server.stop(grace=1)


def test_server_refuses_connections_past_the_limit(echo_server):
    first = socket.create_connection(("127.0.0.1", echo_server.port), timeout=5)
    second = socket.create_connection(("127.0.0.1", echo_server.port), timeout=5)
    try:
        first.sendall(frame(b"1"))
        second.sendall(frame(b"2"))
        assert _read_frames(first, 1) + _read_frames(second, 1) == [b"ACK:1", b"ACK:2"]
        with socket.create_connection(("127.0.0.1", echo_server.port), timeout=5) as third:
            assert third.recv(10) == b""
    finally:
        first.close()
        second.close()


def test_stop_lets_the_message_in_flight_be_answered_then_refuses_new_connections(echo_server):
    client = socket.create_connection(("127.0.0.1", echo_server.port), timeout=5)
    client.sendall(frame(b"slow"))
    time.sleep(0.2)  # the handler is now working on it
    stopper = threading.Thread(target=echo_server.stop, kwargs={"grace": 5})
    stopper.start()
    try:
        assert _read_frames(client, 1) == [b"ACK:slow"]
        assert client.recv(10) == b""  # then closed
    finally:
        client.close()
        stopper.join(10)
    assert not stopper.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", echo_server.port), timeout=1).close()


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def test_connections_are_capped_per_source_address_while_other_hosts_are_served():
    server = MllpServer("127.0.0.1", 0, lambda message, peer: b"ACK:" + message, max_connections_per_source=2)
    server.start()
    first, second = _connect(server.port), _connect(server.port)
    try:
        first.sendall(frame(b"1"))
        second.sendall(frame(b"2"))
        assert _read_frames(first, 1) + _read_frames(second, 1) == [b"ACK:1", b"ACK:2"]
        with _connect(server.port) as third:
            assert third.recv(10) == b""  # closed at once
        with _connect(server.port, "127.0.0.2") as other_host:
            other_host.sendall(frame(b"3"))
            assert _read_frames(other_host, 1) == [b"ACK:3"]
        first.close()
        deadline = time.monotonic() + 5
        while server.open_connections() > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with _connect(server.port) as again:  # a slot of 127.0.0.1 came free
            again.sendall(frame(b"4"))
            assert _read_frames(again, 1) == [b"ACK:4"]
    finally:
        first.close()
        second.close()
        server.stop(grace=1)


def test_a_sender_trickling_one_byte_a_second_is_closed_at_the_message_deadline():
    seen: list[bytes] = []
    server = MllpServer("127.0.0.1", 0, lambda message, peer: seen.append(message) or b"ACK",
                        idle_timeout=30, message_timeout=2)  # fmt: skip
    server.start()
    try:
        with _connect(server.port) as client:
            started = time.monotonic()
            client.setblocking(False)
            closed_at = None
            for byte in frame(b"MSH|^~\\&|SLOW")[:-1]:  # never the last byte
                try:
                    client.send(bytes([byte]))
                    if client.recv(10) == b"":
                        closed_at = time.monotonic() - started
                        break
                except BlockingIOError:
                    pass
                except OSError:  # reset: also closed
                    closed_at = time.monotonic() - started
                    break
                time.sleep(1)
        assert closed_at is not None and 2 <= closed_at < 4.5, closed_at
        assert seen == []
    finally:
        server.stop(grace=1)


def test_stray_bytes_do_not_keep_an_idle_connection_open():
    server = MllpServer("127.0.0.1", 0, lambda message, peer: b"ACK", idle_timeout=1.0, message_timeout=30)
    server.start()
    try:
        with _connect(server.port) as client:
            started = time.monotonic()
            client.settimeout(0.25)
            while time.monotonic() - started < 5:
                try:
                    client.sendall(b"\r")  # noise outside any frame, every quarter second
                    if client.recv(10) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            assert 1.0 <= time.monotonic() - started < 2.5
    finally:
        server.stop(grace=1)
