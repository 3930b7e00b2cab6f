"""A listener's heartbeat: a row /healthz and the dashboard read, refreshed by a thread."""

from __future__ import annotations

import logging
import threading

from django.conf import settings
from django.db import connection
from django.utils import timezone

from gateway import services

log = logging.getLogger("isthmus.heartbeat")


class HeartbeatThread:
    """Beats now, then every HEARTBEAT_INTERVAL until stop(), which removes the row."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.address = ""
        self.started_at = timezone.now()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, name=f"{kind}-heartbeat", daemon=True)

    def start(self, address: str) -> None:
        self.address = address
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        try:
            services.beat(kind=self.kind, address=self.address, started_at=self.started_at)
        except Exception as exc:  # the database may be down; keep serving and say so
            log.warning("%s heartbeat not recorded: %s", self.kind, exc)
        finally:
            connection.close()

    def _beat_forever(self) -> None:
        while not self._stopping.wait(settings.HEARTBEAT_INTERVAL):
            self.beat()

    def stop(self) -> None:
        self._stopping.set()
        try:
            services.stop_beating(kind=self.kind)
        except Exception as exc:
            log.warning("%s heartbeat not removed: %s", self.kind, exc)
        finally:
            connection.close()
