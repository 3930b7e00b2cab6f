"""The HL7 listener process: an MLLP server answering with receive.handle_message, with a heartbeat."""

from __future__ import annotations

import logging

from gateway.heartbeat import HeartbeatThread
from worklist.hl7.mllp import MllpServer
from worklist.hl7.receive import handle_message

log = logging.getLogger("isthmus.hl7")
KIND = "hl7"


class Hl7Listener:
    """Serves MLLP connections until stop(); stop() lets messages in flight be applied and acknowledged."""

    def __init__(self, host: str, port: int, *, idle_timeout: float = 300.0, max_connections: int = 50) -> None:
        self.server = MllpServer(host, port, handle_message, idle_timeout=idle_timeout,
                                 max_connections=max_connections)  # fmt: skip
        self.host, self.port = host, self.server.port
        self.heartbeat = HeartbeatThread(KIND)

    @property
    def address(self) -> str:
        return f"MLLP {self.host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        self.heartbeat.start(self.address)
        log.info("HL7 listener %s ready", self.address)

    def stop(self, grace: float) -> None:
        self.server.stop(grace)
        self.heartbeat.stop()
        log.info("HL7 listener stopped")
