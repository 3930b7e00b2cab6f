"""A small STOW-RS server for tests: records what arrives and when, and answers as the test scripts it."""

from __future__ import annotations

import io
import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydicom import dcmread


@dataclass
class StowRequest:
    started: float
    authorization: str = ""
    ended: float = 0.0
    part_times: list[float] = field(default_factory=list)  # when each part's boundary arrived
    sop_instance_uids: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)  # acknowledged to a client still there to hear it
    abandoned: bool = False  # the client was gone when the answer was ready: nothing stored


# (request number, SOP Instance UIDs) -> (HTTP status, headers, {uid: failure reason or None for stored})
Script = Callable[[int, list[str]], tuple[int, dict, dict[str, int | None]]]


def accept_all(_number: int, uids: list[str]) -> tuple[int, dict, dict[str, int | None]]:
    return 200, {}, dict.fromkeys(uids)


class StowServer:
    """POST /studies: reads the multipart body as it arrives, then answers per `script`."""

    def __init__(self, port: int, script: Script = accept_all, delay: float = 0.0) -> None:
        self.port, self.script, self.delay = port, script, delay
        self.url = f"http://127.0.0.1:{port}/dicom-web"
        self.requests: list[StowRequest] = []
        self.token_requests: list[tuple[str, str]] = []  # (Authorization, form body)
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                server._post(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> StowServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def received(self) -> list[str]:
        return [uid for request in self.requests for uid in request.sop_instance_uids]

    @property
    def stored(self) -> list[str]:
        """What the server keeps: a request's instances count only if its client was there for the answer."""
        return [uid for request in self.requests for uid in request.stored]

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path.endswith("/token"):  # an OAuth2 token endpoint, for the client credentials grant
            self._token(handler)
            return
        request = StowRequest(started=time.monotonic(), authorization=handler.headers.get("Authorization", ""))
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            number = len(self.requests)
            self.requests.append(request)
        try:
            boundary = re.search(r"boundary=\"?([^\";]+)", handler.headers["Content-Type"]).group(1).encode()
            body = self._read(handler, int(handler.headers["Content-Length"]), b"--" + boundary, request)
            request.sop_instance_uids = [self._uid(part) for part in self._parts(body, b"--" + boundary)]
            del request.part_times[len(request.sop_instance_uids) :]  # the closing delimiter is no part
            time.sleep(self.delay)
            status, headers, outcome = self.script(number, request.sop_instance_uids)
            if self._client_gone(handler):  # like a server that commits with its answer
                request.abandoned = True
                handler.close_connection = True
                return
            if status < 300:
                request.stored = [uid for uid, reason in outcome.items() if reason is None]
            payload = json.dumps(self._answer(outcome)).encode() if outcome else b""
            handler.send_response(status)
            for name, value in {"Content-Type": "application/dicom+json", **headers}.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        finally:
            request.ended = time.monotonic()
            with self.lock:
                self.in_flight -= 1

    def _token(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", 0))
        form = handler.rfile.read(length).decode()
        self.token_requests.append((handler.headers.get("Authorization", ""), form))
        payload = json.dumps({"access_token": f"token-{len(self.token_requests)}", "expires_in": 3600}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    @staticmethod
    def _client_gone(handler: BaseHTTPRequestHandler) -> bool:
        """The client closed its end (a killed process): the socket reads end-of-file."""
        connection = handler.connection
        try:
            readable, _, _ = select.select([connection], [], [], 0)
            return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    @staticmethod
    def _read(handler, length: int, marker: bytes, request: StowRequest) -> bytes:
        body, seen = bytearray(), 0
        while len(body) < length:
            chunk = handler.rfile.read1(min(65536, length - len(body)))
            if not chunk:
                break
            body += chunk
            found = body.count(marker)
            request.part_times += [time.monotonic()] * (found - seen)
            seen = found
        return bytes(body)

    @staticmethod
    def _parts(body: bytes, marker: bytes) -> list[bytes]:
        parts = []
        for chunk in body.split(marker)[1:]:
            if chunk.startswith(b"--"):
                break
            parts.append(chunk.split(b"\r\n\r\n", 1)[1][:-2])
        return parts

    @staticmethod
    def _uid(part: bytes) -> str:
        return str(dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)

    @staticmethod
    def _answer(outcome: dict[str, int | None]) -> dict:
        def item(uid: str, reason: int | None) -> dict:
            entry = {"00081155": {"vr": "UI", "Value": [uid]}, "00081150": {"vr": "UI", "Value": ["1.2.3"]}}
            if reason is not None:
                entry["00081197"] = {"vr": "US", "Value": [reason]}
            return entry

        answer = {}
        stored = [item(uid, None) for uid, reason in outcome.items() if reason is None]
        failed = [item(uid, reason) for uid, reason in outcome.items() if reason is not None]
        if stored:
            answer["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        return answer
