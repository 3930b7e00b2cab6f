"""The HL7 listener process: an MLLP server answering with receive.handle_message, with a heartbeat."""

from __future__ import annotations

import logging

from django.conf import settings

from gateway.heartbeat import HeartbeatThread
from worklist.hl7.mllp import MllpServer
from worklist.hl7.receive import handle_message

log = logging.getLogger("isthmus.hl7")
KIND = "hl7"


class Hl7Listener:
    """Serves MLLP connections until stop(); stop() lets messages in flight be applied and acknowledged.

    Limits default to the ISTHMUS_HL7_* settings; a test passes shorter ones.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        idle_timeout: float | None = None,
        message_timeout: float | None = None,
        max_connections: int | None = None,
        max_connections_per_source: int | None = None,
    ) -> None:
        self.server = MllpServer(
            host,
            port,
            handle_message,
            idle_timeout=idle_timeout or settings.HL7_IDLE_TIMEOUT,
            message_timeout=message_timeout or settings.HL7_MESSAGE_TIMEOUT,
            max_connections=max_connections or settings.HL7_MAX_CONNECTIONS,
            max_connections_per_source=max_connections_per_source or settings.HL7_MAX_CONNECTIONS_PER_SOURCE,
        )
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
