"""`manage.py run`: migrate, then run web, DIMSE listener and worker+beat in the foreground.

The embedded way to run Isthmus (what `make run` calls). Ctrl-C or SIGTERM
stops every process; if one dies, the others are stopped too, so a service
manager sees the failure and restarts the whole gateway.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

PR_SET_PDEATHSIG = 1
STOP_GRACE = 40.0


def die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, even by kill -9 (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def process_commands() -> dict[str, list[str]]:
    python = sys.executable
    manage = str(Path(settings.BASE_DIR) / "manage.py")
    return {
        # gunicorn.conf.py: the private access log (gateway/weblog.py) and umask.
        "web": [python, "-m", "gunicorn", "gateway.wsgi", "--config", str(Path(settings.BASE_DIR) / "gunicorn.conf.py"),
                "--bind", f"{settings.HTTP_HOST}:{settings.HTTP_PORT}",
                "--workers", str(settings.WEB_WORKERS), "--threads", "4", "--graceful-timeout", "10",
                "--access-logfile", "-", "--log-level", settings.LOG_LEVEL.lower(), "--no-control-socket"],
        "dimse": [python, manage, "dimse"],
        "hl7": [python, manage, "hl7"],
        "worker": [python, "-m", "celery", "-A", "gateway", "worker", "--beat", "--loglevel", settings.LOG_LEVEL, "--hostname", "isthmus@%h",
                   "--concurrency", str(settings.WORKER_CONCURRENCY), "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME],
    }  # fmt: skip


class Command(BaseCommand):
    help = "Migrate, then run every Isthmus process (web, DIMSE listener, worker with beat) until Ctrl-C."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--skip-migrate", action="store_true")

    def handle(self, *args, skip_migrate: bool, **options) -> None:
        if not skip_migrate:
            call_command("migrate", interactive=False, verbosity=0)
            self.stdout.write("database ready")
        # Counters of processes from an earlier run are stale.
        shutil.rmtree(settings.PROMETHEUS_DIR, ignore_errors=True)
        settings.PROMETHEUS_DIR.mkdir(parents=True, exist_ok=True)

        stopping = False

        def request_stop(signum, _frame) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

        children: dict[str, subprocess.Popen] = {}
        for name, command in process_commands().items():
            children[name] = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)
            self.stdout.write(f"started {name} (pid {children[name].pid})")
        self.stdout.write(
            f"Isthmus {settings.AE_TITLE}: DIMSE on port {settings.DIMSE_PORT}, HL7 on port {settings.HL7_PORT}, "
            f"web on http://{settings.HTTP_HOST}:{settings.HTTP_PORT}/ (admin, /healthz, /metrics); "
            f"data in {settings.DATA_DIR}. Ctrl-C stops."
        )
        exit_code = 0
        while not stopping:
            died = [name for name, child in children.items() if child.poll() is not None]
            if died:
                self.stderr.write(
                    f"isthmus: {', '.join(died)} exited (code {children[died[0]].returncode}); stopping all"
                )
                exit_code = 1
                break
            time.sleep(0.2)
        self._stop(children)
        raise SystemExit(exit_code)

    def _stop(self, children: dict[str, subprocess.Popen]) -> None:
        """SIGTERM each process group, wait, then SIGKILL what is left: nothing outlives us."""
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for name, child in children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"isthmus: {name} did not stop in {STOP_GRACE:g} s; killing it")
        for child in children.values():
            try:
                os.killpg(child.pid, signal.SIGKILL)  # leftovers: pool workers, gunicorn workers
            except ProcessLookupError:
                pass
            child.wait()
        self.stdout.write("all Isthmus processes stopped")
