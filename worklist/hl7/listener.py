"""The HL7 listener process: an MLLP server answering with receive.handle_message, with a heartbeat."""

from __future__ import annotations

import logging
import threading

from django.conf import settings
from django.db import connection
from django.utils import timezone

from gateway import services as gateway_services
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
        self.started_at = timezone.now()
        self._stopping = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat_forever, name="hl7-heartbeat", daemon=True)

    @property
    def address(self) -> str:
        return f"MLLP {self.host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        self._beat()
        self._heartbeat.start()
        log.info("HL7 listener %s ready", self.address)

    def _beat(self) -> None:
        try:
            gateway_services.beat(kind=KIND, address=self.address, started_at=self.started_at)
        except Exception as exc:  # the database may be down; keep serving and say so
            log.warning("heartbeat not recorded: %s", exc)
        finally:
            connection.close()

    def _beat_forever(self) -> None:
        while not self._stopping.wait(settings.HEARTBEAT_INTERVAL):
            self._beat()

    def stop(self, grace: float) -> None:
        self._stopping.set()
        self.server.stop(grace)
        try:
            gateway_services.stop_beating(kind=KIND)
        except Exception as exc:
            log.warning("heartbeat not removed: %s", exc)
        finally:
            connection.close()
        log.info("HL7 listener stopped")
