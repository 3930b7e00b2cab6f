"""`manage.py hl7`: the HL7 v2 MLLP listener, in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand

from worklist.hl7.listener import Hl7Listener


class Command(BaseCommand):
    help = "Run the HL7 v2 listener (MLLP: ORM^O01, OMI^O23, ADT^A01/A04/A08/A40) on ISTHMUS_HL7_PORT."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=settings.HL7_PORT)
        parser.add_argument("--host", default=settings.HL7_HOST)
        parser.add_argument(
            "--idle-timeout",
            type=float,
            default=settings.HL7_IDLE_TIMEOUT,
            help="seconds a connection stays open without a complete message (ISTHMUS_HL7_IDLE_TIMEOUT)",
        )
        parser.add_argument(
            "--max-connections",
            type=int,
            default=settings.HL7_MAX_CONNECTIONS,
            help="connections open at once (ISTHMUS_HL7_MAX_CONNECTIONS)",
        )

    def handle(self, *args, host: str, port: int, idle_timeout: float, max_connections: int, **options) -> None:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        try:
            listener = Hl7Listener(host, port, idle_timeout=idle_timeout, max_connections=max_connections)
        except OSError as exc:
            self.stderr.write(f"isthmus: cannot listen for HL7 on {host}:{port}: {exc.strerror or exc}")
            raise SystemExit(1) from exc
        listener.start()
        stop.wait()
        self.stdout.write(f"stopping: waiting up to {settings.DIMSE_SHUTDOWN_GRACE:g} s for messages in flight")
        listener.stop(settings.DIMSE_SHUTDOWN_GRACE)
