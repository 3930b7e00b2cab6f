"""`manage.py dimse`: the DIMSE listener, in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand

from gateway.dimse.server import Listener


class Command(BaseCommand):
    help = "Run the DIMSE listener (C-ECHO and the services of later releases) on ISTHMUS_DIMSE_PORT."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=settings.DIMSE_PORT)
        parser.add_argument("--host", default=settings.DIMSE_HOST)

    def handle(self, *args, host: str, port: int, **options) -> None:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        listener = Listener(host, port)
        try:
            listener.start()
        except OSError as exc:
            self.stderr.write(f"isthmus: cannot listen on {host}:{port}: {exc.strerror or exc}")
            raise SystemExit(1) from exc
        stop.wait()
        self.stdout.write(f"stopping: waiting up to {settings.DIMSE_SHUTDOWN_GRACE:g} s for open associations")
        listener.stop(settings.DIMSE_SHUTDOWN_GRACE)
