"""`manage.py dimse`: the DIMSE listener, in the foreground until SIGTERM or Ctrl-C.

With several processes (ISTHMUS_DIMSE_PROCESSES, one per core by default) this
process starts the others on the same port (SO_REUSEPORT) and stops them with
itself: one Python process receives on one core.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from django.conf import settings
from django.core.management.base import BaseCommand

from gateway.dimse.server import Listener
from gateway.management.commands.run import die_with_parent


class Command(BaseCommand):
    help = "Run the DIMSE listener (verification, storage, Q/R, commitment, worklist, MPPS) on ISTHMUS_DIMSE_PORT."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=settings.DIMSE_PORT)
        parser.add_argument("--host", default=settings.DIMSE_HOST)
        parser.add_argument("--processes", type=int, default=settings.DIMSE_PROCESSES, help="listener processes")
        parser.add_argument("--reuse-port", action="store_true", help="share the port with other listeners")

    def handle(self, *args, host: str, port: int, processes: int, reuse_port: bool, **options) -> None:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        reuse_port = reuse_port or processes > 1
        listener = Listener(host, port, reuse_port=reuse_port)
        try:
            listener.start()
        except OSError as exc:
            self.stderr.write(f"isthmus: cannot listen on {host}:{port}: {exc.strerror or exc}")
            raise SystemExit(1) from exc
        siblings = [self._sibling(host, listener.port) for _ in range(processes - 1)]
        stop.wait()
        self.stdout.write(f"stopping: waiting up to {settings.DIMSE_SHUTDOWN_GRACE:g} s for open associations")
        for sibling in siblings:
            sibling.send_signal(signal.SIGTERM)
        listener.stop(settings.DIMSE_SHUTDOWN_GRACE)
        for sibling in siblings:
            try:
                sibling.wait(timeout=settings.DIMSE_SHUTDOWN_GRACE + 10)
            except subprocess.TimeoutExpired:
                sibling.kill()

    def _sibling(self, host: str, port: int) -> subprocess.Popen:
        command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "dimse", "--host", host, "--port", str(port), "--processes", "1",
                   "--reuse-port"]  # fmt: skip
        return subprocess.Popen(command, preexec_fn=die_with_parent)
